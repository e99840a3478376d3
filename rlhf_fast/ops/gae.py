"""Generalized advantage estimation over masked, ragged response tokens.

    δ_t = r_t + γ·V_next − V_t,    A_t = δ_t + γλ·A_next,    R_t = A_t + V_t

"next" is the row's next *valid* token (mask != 0): a masked position inside a row is skipped without
resetting the recurrence, and after a row's last valid token the value and advantage are 0. Masked positions
get advantage 0 and return 0. `whiten=True` whitens the advantages over all valid tokens of the batch,
(A − mean) / sqrt(var + WHITEN_EPS) with the unbiased variance; returns are computed before whitening.
WHITEN_EPS (1e-8, in rlhf_fast/ops/_contract.py) is passed to every backend.

Backends: `reference` (below), `cpp` (csrc/cpu/gae.cpp), `cuda` (csrc/kernels/gae.cu), `triton`
(rlhf_fast/ops/triton/gae.py). Outputs are float32 (float64 for float64 inputs). GAE is not differentiable:
advantages and returns are targets.
"""

from __future__ import annotations

import torch

from rlhf_fast.ops._backend import kernel_table, pick
from rlhf_fast.ops._checks import check_mask, check_same_device, check_same_shape, check_tensor
from rlhf_fast.ops._contract import WHITEN_EPS, output_dtype

GPU_ORDER = ("cuda", "triton")


def whiten_masked(x: torch.Tensor, valid: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """(x − mean) / sqrt(unbiased var + eps) over the valid entries; invalid entries become 0."""
    count = valid.sum()
    mean = torch.where(valid, x, 0).sum() / count.clamp(min=1)
    centered = torch.where(valid, x - mean, 0)
    var = (centered * centered).sum() / (count - 1).clamp(min=1)
    return centered * torch.rsqrt(var + eps)


def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch GAE, vectorized over the batch and looping over time: the ground truth."""
    dtype = output_dtype(rewards.dtype)
    rewards, values, valid = rewards.to(dtype), values.to(dtype), mask.bool()
    batch, steps = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(batch)
    next_advantage = rewards.new_zeros(batch)
    for t in reversed(range(steps)):
        is_valid = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(is_valid, advantage, 0)
        next_advantage = torch.where(is_valid, advantage, next_advantage)
        next_value = torch.where(is_valid, values[:, t], next_value)
    returns = torch.where(valid, advantages + values, 0)
    if whiten:
        advantages = whiten_masked(advantages, valid)
    return advantages, returns


def _gae_reference_backend(rewards, values, mask, gamma, lam, whiten, whiten_eps):
    advantages, returns = gae_reference(rewards, values, mask, gamma, lam, whiten=False)
    return (whiten_masked(advantages, mask.bool(), whiten_eps) if whiten else advantages), returns


# {backend: (rewards, values, mask, gamma, lam, whiten, whiten_eps) -> (advantages, returns)}
_KERNELS = kernel_table(_gae_reference_backend, "gae_forward", "rlhf_fast.ops.triton.gae", "gae_triton")
IMPLEMENTED = tuple(_KERNELS)


@torch.library.custom_op("rlhf_fast::gae", mutates_args=())
def _gae_op(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, whiten: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return pick("gae", rewards.device, _KERNELS, GPU_ORDER)(
        rewards, values, mask, gamma, lam, whiten, WHITEN_EPS
    )


@_gae_op.register_fake
def _(rewards, values, mask, gamma, lam, whiten):
    dtype = output_dtype(rewards.dtype)
    return torch.empty_like(rewards, dtype=dtype), torch.empty_like(rewards, dtype=dtype)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, each [B, T] float32 (float64 for float64 inputs).

    rewards, values: [B, T] float32/bfloat16/float16/float64; mask: [B, T] bool or integer, nonzero marks a
    response token. Rows may be ragged and holed (see the module docstring).
    """
    check_tensor("rewards", rewards, ndim=2, floating=True)
    check_tensor("values", values, floating=True)
    check_same_shape("rewards", rewards, values=values)
    check_mask("mask", mask, rewards.shape)
    check_same_device("rewards", rewards, values=values, mask=mask)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if values.dtype != rewards.dtype:
        values = values.to(torch.promote_types(values.dtype, rewards.dtype))
        rewards = rewards.to(values.dtype)
    return _gae_op(rewards, values, mask, float(gamma), float(lam), bool(whiten))
