"""The trainable forward passes the trainers run, each one `nn.Module` so DDP / FSDP2 can wrap it whole.

Attention masks, position ids and the backbone call belong to `rlhf_fast.models` (the models take a [B, L]
padding mask, or a prepared 4-D mask for packing): nothing here builds a mask.

- `PolicyLogprobs`: hidden states of the policy, then the fused log-prob op on the LM head; the [B, T, V]
  logits are never materialized (except with top-k / top-p, whose filtered distribution needs them). The
  log-prob is computed inside `forward`, so under DDP/FSDP2 the LM head is used while the wrapper manages it
  (gathered, gradient-synced).
- `ValueScores`: the value model's per-position values.
The reward model is called as it is (`RewardModel.forward`: the score at each row's last real token).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_fast.ops import TokenLogprobs, linear_token_logprobs
from rlhf_fast.rollout import entropy_of_logits, filter_logits


class PolicyLogprobs(nn.Module):
    """Log-probs of the last `T` tokens of each row under the policy (a `PolicyModel`).

    `forward(input_ids [B, L], attention_mask, targets [B, T], *, mask, position_ids, temperature, top_k,
    top_p, ref_logprobs, return_entropy)`: the hidden states at positions L-1-T .. L-2 predict `targets` (for a
    sequence `prompt | response` with a T-token response, targets = response; for SFT, targets =
    input_ids[:, 1:]). Returns the op's `TokenLogprobs(logprobs, entropy, kl)`, each [B, T] float32.
    With `top_k` / `top_p` the distribution is the filtered, renormalized one the sampler draws from (the
    target token always stays in it), so the PPO ratio, the KL and the entropy are those of the sampling
    distribution.
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
        top_k: int = 0,
        top_p: float = 1.0,
        ref_logprobs: torch.Tensor | None = None,
        return_entropy: bool = False,
    ) -> TokenLogprobs:
        steps = targets.shape[1]
        length = input_ids.shape[1]
        predicting = self.policy(
            input_ids, attention_mask, position_ids, outputs_at=slice(length - 1 - steps, length - 1)
        )
        if top_k > 0 or top_p < 1.0:
            return _filtered_logprobs(
                self.policy,
                predicting,
                targets,
                mask,
                temperature,
                top_k,
                top_p,
                ref_logprobs,
                return_entropy,
            )
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


def _filtered_logprobs(
    policy, hidden, targets, mask, temperature, top_k, top_p, ref_logprobs, return_entropy
):
    """Log-probs (entropy, k1 KL) under the top-k / top-p filtered distribution; zeros where `mask` is False."""
    logits = policy.logits(hidden).float() / temperature
    with torch.no_grad():
        kept = torch.isfinite(filter_logits(logits.detach(), top_k, top_p, keep=targets))
    filtered = logits.masked_fill(~kept, float("-inf"))
    log_normalizer = torch.logsumexp(filtered, dim=-1)
    logprobs = filtered.gather(-1, targets[..., None]).squeeze(-1) - log_normalizer
    entropy = entropy_of_logits(filtered, log_normalizer) if return_entropy else None
    kl = logprobs - ref_logprobs if ref_logprobs is not None else None
    if mask is not None:
        logprobs = torch.where(mask, logprobs, 0.0)
        entropy = torch.where(mask, entropy, 0.0) if entropy is not None else None
        kl = torch.where(mask, kl, 0.0) if kl is not None else None
    return TokenLogprobs(logprobs, entropy, kl)


class ValueScores(nn.Module):
    """Values [B, T] float32 of the states before each of the last `steps` tokens: positions L-1-T .. L-2."""

    def __init__(self, value_model: nn.Module):
        super().__init__()
        self.value_model = value_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
        length = input_ids.shape[1]
        reading = slice(length - 1 - steps, length - 1)
        return self.value_model.score(
            self.value_model.hidden_states(input_ids, attention_mask, outputs_at=reading)
        )
