"""GAE (advantages and returns, optionally whitened) over right-padded ragged masks, fp32, γ=1, λ=0.95.

Baselines, written to do the same tensor work as the peers' code, step for step:

- `openrlhf_gae`: OpenRLHF, `NaiveExperienceMaker.get_advantages_and_returns`: zero values and rewards outside
  the action mask, the `lastgaelam` loop over `reversed(range(T))` with per-step tensor ops, `torch.stack`,
  returns = A + V.
- `trl_gae_whitened`: TRL, `PPOTrainer.train` step 6: the same loop on values and rewards already zeroed at
  padding, then `masked_whiten` of the advantages over the response tokens (unbiased variance,
  rsqrt(var + 1e-8)), then zeros at padding.

Both treat the tokens after a row's end as zeros, so they agree with `rlhf_fast.ops.gae` on right-padded masks;
every contender is checked against the float64 reference before it is timed. CPU: B=64, T=512; GPU: B=256,
T=1024. The GPU floor is the bytes one pass must move (rewards, values and mask read; advantages and returns
written) at the H200's device-copy rate.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, partial

import torch

from rlhf_fast.bench.case import Case, Contender, backend_call, ours_contenders
from rlhf_fast.bench.timing import COPY_BYTES_PER_SECOND
from rlhf_fast.ops import gae, gae_reference

GAMMA, LAM = 1.0, 0.95
SHAPES = {"cpu": (64, 512), "cuda": (256, 1024)}


def _lastgaelam_loop(values, rewards, gamma: float, lam: float):
    """The loop both peers run: per-step tensor ops over `reversed(range(T))`, then `torch.stack`."""
    steps = rewards.shape[1]
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(steps)):
        nextvalues = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    return torch.stack(advantages_reversed[::-1], dim=1)


def openrlhf_gae(values, rewards, action_mask, gamma: float, lambd: float):
    values = action_mask * values
    rewards = action_mask * rewards
    advantages = _lastgaelam_loop(values, rewards, gamma, lambd)
    returns = advantages + values
    return advantages.detach(), returns


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _masked_whiten(values, mask):
    # TRL's masked_var: mean squared deviation times the Bessel correction, after a host-side check for an
    # empty mask (a device sync on a GPU), as TRL does.
    mean = _masked_mean(values, mask)
    variance = _masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    if mask_sum == 0:
        raise ValueError("The sum of the mask is zero")
    variance = variance * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def trl_gae_whitened(values, rewards, padding_mask, gamma: float, lam: float):
    """`padding_mask` is True at padding, as in TRL; values and rewards are already 0 there."""
    advantages = _lastgaelam_loop(values, rewards, gamma, lam)
    returns = advantages + values
    advantages = _masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages, returns


def right_padded_batch(batch: int, steps: int, device: torch.device | str = "cpu"):
    """Fresh random rewards/values [B, T] fp32 (zero at padding), a right-padded bool mask (lengths 1..T)."""
    generator = torch.Generator()
    generator.seed()
    lengths = torch.randint(1, steps + 1, (batch, 1), generator=generator)
    mask = torch.arange(steps) < lengths
    rewards = torch.randn(batch, steps, generator=generator) * mask
    values = torch.randn(batch, steps, generator=generator) * mask
    return rewards.to(device), values.to(device), mask.to(device)


def peer_loop(rewards, values, mask, whiten: bool):
    if whiten:
        return trl_gae_whitened(values, rewards, ~mask, GAMMA, LAM)
    return openrlhf_gae(values, rewards, mask, GAMMA, LAM)


def floor_seconds(rewards, values, mask) -> float:
    read = sum(t.numel() * t.element_size() for t in (rewards, values, mask))
    written = 2 * rewards.numel() * 4
    return (read + written) / COPY_BYTES_PER_SECOND


def checker(rewards, values, mask, whiten: bool):
    """Compares with the float64 reference, computed at the first check."""
    want = cache(lambda: gae_reference(rewards.double(), values.double(), mask, GAMMA, LAM, whiten))

    def check(output) -> None:
        for got, expected in zip(output, want(), strict=True):
            torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)

    return check


def _ours(inputs, whiten: bool, backend: str):
    return backend_call(backend, gae, *inputs, GAMMA, LAM, whiten)


def cases(device: torch.device) -> Iterator[Case]:
    batch, steps = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    for whiten in (False, True):
        inputs = right_padded_batch(batch, steps, device)
        loop = "TRL loop + masked_whiten" if whiten else "OpenRLHF loop"
        contenders = ours_contenders(device, partial(_ours, inputs, whiten))
        contenders.append(Contender(f"naive torch ({loop})", partial(peer_loop, *inputs, whiten), "baseline"))
        if device.type == "cpu":
            reference = partial(gae_reference, *inputs, GAMMA, LAM, whiten)
            contenders.append(Contender("rlhf_fast reference", reference, "reference"))
        yield Case(
            op="gae",
            name=f"gae B={batch} T={steps} fp32 {'whiten' if whiten else 'raw'}",
            contenders=contenders,
            check=checker(*inputs, whiten),
            floor_s=floor_seconds(*inputs) if device.type == "cuda" else None,
            floor_basis="bytes moved at the H200 device-copy rate",
            rounds=10,
        )


__all__ = ["GAMMA", "LAM", "cases", "openrlhf_gae", "right_padded_batch", "trl_gae_whitened"]
