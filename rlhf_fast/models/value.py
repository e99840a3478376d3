"""The value function: a transformer backbone with a scalar head at every token."""

from __future__ import annotations

import copy

import torch

from rlhf_fast.models._scalar_head import ScalarHeadModel


class ValueModel(ScalarHeadModel):
    """``forward(input_ids, attention_mask) -> values [B, L] float32``, one value per position."""

    head_file = "value_head.safetensors"
    config_file = "value_config.json"
    format_name = "rlhf_fast.value_model"

    @classmethod
    def from_reward_model(cls, reward_model) -> ValueModel:
        """A copy of the reward model's backbone and head (InstructGPT initializes the value function from the
        RM). The normalization offset is not carried over: values start from the raw head."""
        from rlhf_fast.models.reward import RewardModel

        if not isinstance(reward_model, RewardModel):
            raise ValueError(f"reward_model must be a RewardModel, got {type(reward_model).__name__}")
        return cls(copy.deepcopy(reward_model.backbone), copy.deepcopy(reward_model.head))

    @classmethod
    def from_policy(cls, policy_model_or_path, **kwargs) -> ValueModel:
        """Backbone from a causal LM, zero-initialized head (values start at 0). See ``from_causal_lm``."""
        return cls.from_causal_lm(policy_model_or_path, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: [B, L] int64; attention_mask: [B, L] bool/int, or a prepared [B, 1, L, L] mask
        (``rlhf_fast.models.causal_mask``; additive or bool) with ``position_ids`` [B, L]. Returns values [B, L]
        float32."""
        return self.score(self.hidden_states(input_ids, attention_mask, position_ids))
