"""CPU benchmark of GAE at B=64, T=512 fp32: the C++ kernel against the Python loop RLHF peers run.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_gae.py \
        --benchmark-group-by=group

Baselines, written below to do the same tensor work as the peers' code, step for step:

- `openrlhf_gae`: OpenRLHF, `NaiveExperienceMaker.get_advantages_and_returns` in
  openrlhf/trainer/ppo_utils/experience_maker.py: zero values and rewards outside the action mask, the
  `lastgaelam` loop over `reversed(range(T))` with per-step tensor ops, `torch.stack`, returns = A + V.
- `trl_gae_whitened`: TRL, `PPOTrainer.train` in trl/trainer/ppo_trainer.py, step 6 "compute advantages and
  returns": the same loop on values and rewards already zeroed at padding, then `masked_whiten` of the
  advantages over the response tokens (unbiased variance, rsqrt(var + 1e-8)), then zeros at padding.

Both treat the tokens after a row's end as zeros, so they agree with `rlhf_fast.ops.gae` on right-padded
masks (a response followed by padding), which is what the benchmarks feed them; each benchmark checks that
agreement before timing. The plain-torch reference (`gae_reference`, a loop vectorized over the batch) is
timed too.

Everything runs on one intra-op thread: the development machines have 2 shared cores, where a second
OpenMP thread that gets descheduled turns a 0.1 ms call into a 30 ms one, and the baseline's per-step ops
on 64 elements use one thread anyway.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import _extension
from rlhf_fast.ops import gae, gae_reference, use_backend

BATCH, STEPS = 64, 512
GAMMA, LAM = 1.0, 0.95


def openrlhf_gae(
    values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float, lambd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    values = action_mask * values
    rewards = action_mask * rewards
    steps = rewards.size(1)
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(steps)):
        nextvalues = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages.detach(), returns


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def _masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # TRL's masked_var: the mean squared deviation times the Bessel correction, after a host-side check for
    # an empty mask (a device sync on a GPU), as TRL does.
    mean = _masked_mean(values, mask)
    variance = _masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    if mask_sum == 0:
        raise ValueError("The sum of the mask is zero")
    variance = variance * (mask_sum / (mask_sum - 1))
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def trl_gae_whitened(
    values: torch.Tensor, rewards: torch.Tensor, padding_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`padding_mask` is True at padding, as in TRL; values and rewards are already 0 there."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = _masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages, returns


def right_padded_batch(batch: int, steps: int, device: str = "cpu"):
    """Fresh random rewards/values [B, T] fp32 (zero at padding), a right-padded bool mask (lengths 1..T)."""
    generator = torch.Generator()
    generator.seed()
    lengths = torch.randint(1, steps + 1, (batch, 1), generator=generator)
    mask = torch.arange(steps) < lengths
    rewards = torch.randn(batch, steps, generator=generator) * mask
    values = torch.randn(batch, steps, generator=generator) * mask
    return rewards.to(device), values.to(device), mask.to(device)


def run_ours(rewards, values, mask, whiten, backend):
    with use_backend(backend):
        return gae(rewards, values, mask, GAMMA, LAM, whiten)


def run_baseline(rewards, values, mask, whiten):
    if whiten:
        return trl_gae_whitened(values, rewards, ~mask, GAMMA, LAM)
    return openrlhf_gae(values, rewards, mask, GAMMA, LAM)


def run_reference(rewards, values, mask, whiten):
    return gae_reference(rewards, values, mask, GAMMA, LAM, whiten)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


IMPLEMENTATIONS = {
    "rlhf_fast cpp": lambda r, v, m, w: run_ours(r, v, m, w, "cpp"),
    "peer python loop": run_baseline,
    "rlhf_fast reference": run_reference,
}


@pytest.mark.benchmark(min_rounds=20, warmup=True)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_gae_cpu(benchmark, implementation, whiten):
    if implementation == "rlhf_fast cpp" and not _extension.has_cpp_kernels():
        pytest.skip("rlhf_fast._C is not built")
    benchmark.group = f"gae B={BATCH} T={STEPS} fp32 {'whiten' if whiten else 'raw'}"
    rewards, values, mask = right_padded_batch(BATCH, STEPS)
    function = IMPLEMENTATIONS[implementation]
    advantages, returns = benchmark(function, rewards, values, mask, whiten)
    # Every contender computes the same thing on these inputs.
    want_advantages, want_returns = gae_reference(rewards.double(), values.double(), mask, GAMMA, LAM, whiten)
    torch.testing.assert_close(advantages.double(), want_advantages, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(returns.double(), want_returns, atol=1e-4, rtol=1e-4)
