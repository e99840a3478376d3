"""The trainable forward passes the trainers run, each one `nn.Module` so DDP / FSDP2 can wrap it whole.

Every model call goes through an explicit 4-D additive attention mask built here. That keeps transformers'
mask preparation off its data-dependent branch (with a 2-D mask it checks `padding_mask.all()` on the host,
a device synchronization every forward) and it is what sequence packing needs anyway (block-diagonal causal).

- `PolicyLogprobs`: hidden states of the policy, then the fused log-prob op on the LM head; the [B, T, V]
  logits are never materialized. The log-prob is computed inside `forward`, so under DDP/FSDP2 the LM head
  is used while the wrapper manages it (gathered, gradient-synced).
- `ValueScores`: the value model's per-position values.
- `RewardScores`: the reward model's score at each row's last real token (normalization offset included).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_fast.ops import linear_token_logprobs


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] mask -> [B, L] positions counted over real tokens (a left-padded row starts at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, L] bool (query, key) -> [B, 1, L, L] additive mask: 0 where allowed, else the dtype's minimum."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] bool/int real-token mask (any padding side) -> [B, 1, L, L] additive causal mask
    (`rlhf_fast.models.causal_mask`: a query sees the real keys at or before it, a padding query only itself)."""
    from rlhf_fast.models import causal_mask

    return causal_mask(attention_mask, dtype)


def packed_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] document ids (-1 = padding) -> [B, 1, L, L] additive block-diagonal causal mask."""
    from rlhf_fast.data import packed_attention_mask

    return additive_mask(packed_attention_mask(document_ids), dtype)


def _model_dtype(module: nn.Module) -> torch.dtype:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def run_backbone(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Final hidden states [B, L, d]. attention_mask: [B, L] (real tokens) or a prepared [B, 1, L, L] additive
    mask (then `position_ids` must be given)."""
    if attention_mask.dim() == 2:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        attention_mask = causal_padding_mask(attention_mask, dtype)
    elif position_ids is None:
        raise ValueError("position_ids are required with a 4-D attention_mask")
    output = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return output.last_hidden_state


class PolicyLogprobs(nn.Module):
    """Log-probs of the last `T` tokens of each row under the policy (a `PolicyModel`).

    `forward(input_ids [B, L], attention_mask, targets [B, T], *, mask, position_ids, temperature,
    ref_logprobs, return_entropy)`: the hidden states at positions L-1-T .. L-2 predict `targets` (for a
    sequence `prompt | response` with a T-token response, targets = response; for SFT, targets =
    input_ids[:, 1:]). Returns the op's `TokenLogprobs(logprobs, entropy, kl)`, each [B, T] float32.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        temperature: float = 1.0,
        ref_logprobs: torch.Tensor | None = None,
        return_entropy: bool = False,
    ):
        hidden = run_backbone(
            self.policy.backbone, input_ids, attention_mask, position_ids, _model_dtype(self.policy)
        )
        steps = targets.shape[1]
        length = input_ids.shape[1]
        predicting = hidden[:, length - 1 - steps : length - 1]
        return linear_token_logprobs(
            predicting,
            self.policy.lm_head_weight,
            targets,
            bias=self.policy.lm_head_bias,
            ref_logprobs=ref_logprobs,
            mask=mask,
            temperature=temperature,
            return_entropy=return_entropy,
        )


class ValueScores(nn.Module):
    """Values [B, T] float32 of the states before each of the last `steps` tokens: positions L-1-T .. L-2."""

    def __init__(self, value_model: nn.Module):
        super().__init__()
        self.value_model = value_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
        hidden = run_backbone(
            self.value_model.backbone, input_ids, attention_mask, None, _model_dtype(self.value_model)
        )
        length = input_ids.shape[1]
        return self.value_model.score(hidden[:, length - 1 - steps : length - 1])


class RewardScores(nn.Module):
    """Scores [B] float32 at each row's last real token, the reward model's normalization offset included."""

    def __init__(self, reward_model: nn.Module):
        super().__init__()
        self.reward_model = reward_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from rlhf_fast.models import last_token_index

        hidden = run_backbone(
            self.reward_model.backbone, input_ids, attention_mask, None, _model_dtype(self.reward_model)
        )
        last = last_token_index(attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.reward_model.score(hidden[rows, last]) + self.reward_model.normalization_bias
