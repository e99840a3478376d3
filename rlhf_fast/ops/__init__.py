"""The hot spots of InstructGPT training, one op per file, each with its plain-torch reference beside it."""

from rlhf_fast.ops._backend import use_backend
from rlhf_fast.ops._checks import set_value_checks, value_checks
from rlhf_fast.ops.gae import gae, gae_reference
from rlhf_fast.ops.logprob import (
    TokenLogprobs,
    linear_token_logprobs,
    linear_token_logprobs_reference,
    token_logprobs,
    token_logprobs_reference,
)
from rlhf_fast.ops.ppo_loss import ppo_losses, ppo_losses_reference
from rlhf_fast.ops.ranking import ranking_loss, ranking_loss_reference

__all__ = [
    "TokenLogprobs",
    "gae",
    "gae_reference",
    "linear_token_logprobs",
    "linear_token_logprobs_reference",
    "ppo_losses",
    "ppo_losses_reference",
    "ranking_loss",
    "ranking_loss_reference",
    "set_value_checks",
    "token_logprobs",
    "token_logprobs_reference",
    "use_backend",
    "value_checks",
]
