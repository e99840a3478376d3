"""Models: the policy (causal LM exposing hidden states and LM head), value and reward models, tiny GPTs."""

from rlhf_fast.models.masks import (
    causal_mask,
    packed_causal_mask,
    position_ids_from_mask,
    shared_prefix_causal_mask,
)
from rlhf_fast.models.policy import PolicyModel
from rlhf_fast.models.reward import RewardModel, ended_with_eos, last_token_index
from rlhf_fast.models.tiny import SPECIAL_TOKENS, TINY_SIZES, build_word_tokenizer, tiny_causal_lm
from rlhf_fast.models.value import ValueModel

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_SIZES",
    "PolicyModel",
    "RewardModel",
    "ValueModel",
    "build_word_tokenizer",
    "causal_mask",
    "ended_with_eos",
    "last_token_index",
    "packed_causal_mask",
    "position_ids_from_mask",
    "shared_prefix_causal_mask",
    "tiny_causal_lm",
]
