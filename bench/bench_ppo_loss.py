"""CPU benchmark of the PPO losses at B=64, T=512 fp32: forward + backward of the clipped surrogate and the
clipped value loss with their diagnostics, the fused C++ kernel against the naive torch composition.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_ppo_loss.py \
        --benchmark-group-by=group

Baseline (`naive_ppo_losses`), written to do the same tensor work as TRL's `PPOTrainer.train`
(trl/trainer/ppo_trainer.py, the minibatch loop): `masked_fill` of the new log-probs and value predictions at
padding, then one op each for the clipped value (`torch.clamp` with tensor bounds), the two squared errors,
their `torch.max`, ratio = `exp(new − old)`, the two surrogate terms, their `torch.max`, and
`masked_mean(x, mask) = (x * mask).sum() / mask.sum()` for each loss and for each diagnostic (clip fractions
under `torch.no_grad()`, as TRL computes them; approx_kl as CleanRL's (ratio − 1) − log ratio and the mean
ratio, the two other diagnostics rlhf_fast returns). Then `backward()` of policy_loss + value_loss. Each
benchmark checks that the contender agrees with the float64 reference before timing. The plain-torch
reference (`ppo_losses_reference`) is timed too.

Inputs: fresh random each run, a ragged right-padded mask, ratios exp(N(0, 0.3)) and old values off by
N(0, 0.3), so both clips are active on a fair share of tokens. One intra-op thread, as in bench_gae.py: the
development machines have 2 shared cores.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import _extension
from rlhf_fast.ops import ppo_losses, ppo_losses_reference, use_backend

BATCH, STEPS = 64, 512
CLIP_COEF, VALUE_CLIP = 0.2, 0.2
INVALID_LOGPROB = 1.0  # TRL's fill value for log-probs at padding


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def naive_ppo_losses(logprobs, old_logprobs, advantages, mask, values, old_values, returns,
                     clip_coef=CLIP_COEF, value_clip=VALUE_CLIP):
    """The PPO losses op by op, as TRL's PPO trainer writes them (see the module docstring)."""
    padding = ~mask
    logprobs = torch.masked_fill(logprobs, padding, INVALID_LOGPROB)
    values = torch.masked_fill(values, padding, 0)
    values_clipped = torch.clamp(values, old_values - value_clip, old_values + value_clip)
    vf_losses1 = torch.square(values - returns)
    vf_losses2 = torch.square(values_clipped - returns)
    value_loss = 0.5 * _masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    logprobs_diff = logprobs - old_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    policy_loss = _masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        diagnostics = {
            "clipfrac": _masked_mean((pg_losses2 > pg_losses).float(), mask),
            "approx_kl": _masked_mean((ratio - 1) - logprobs_diff, mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "value_clipfrac": _masked_mean((vf_losses2 > vf_losses1).float(), mask),
        }
    return {"policy_loss": policy_loss, "value_loss": value_loss, **diagnostics}


def ppo_batch(batch: int, steps: int, device: str = "cpu"):
    """Fresh random [B, T] fp32 inputs (log-probs and values are leaves that require grad) and a
    right-padded bool mask with lengths 1..T."""
    generator = torch.Generator()
    generator.seed()

    def normal(scale=1.0):
        return torch.randn(batch, steps, generator=generator) * scale

    mask = torch.arange(steps) < torch.randint(1, steps + 1, (batch, 1), generator=generator)
    old_logprobs = -2 * normal().abs()
    logprobs = old_logprobs + normal(0.3)
    values = normal()
    tensors = (logprobs, old_logprobs, normal(), mask, values, values + normal(0.3), normal())
    logprobs, old_logprobs, advantages, mask, values, old_values, returns = (t.to(device) for t in tensors)
    return logprobs.requires_grad_(), old_logprobs, advantages, mask, values.requires_grad_(), old_values, returns


def decided_tokens(inputs, margin: float = 1e-4) -> torch.Tensor:
    """[B, T] bool: tokens whose clip decisions rounding cannot flip (away from the clip bounds and from ties
    of the two squared value errors). Gradients are compared there only: at a kink the derivative jumps, and
    float32 and float64 may land on different sides of it, which is no error of either."""
    logprobs, old_logprobs, _, _, values, old_values, returns = (t.detach().cpu().double() for t in inputs)

    def near(x, bound):
        return (x - bound).abs() <= margin * (1 + torch.as_tensor(bound).abs())

    ratio = torch.exp(logprobs - old_logprobs)
    low, high = old_values - VALUE_CLIP, old_values + VALUE_CLIP
    clipped_values = torch.minimum(torch.maximum(values, low), high)
    kinked = near(ratio, 1 - CLIP_COEF) | near(ratio, 1 + CLIP_COEF) | near(values, low) | near(values, high)
    kinked |= (clipped_values != values) & near(values + clipped_values, 2 * returns)
    return ~kinked


def run_ours(*inputs, backend="cpp"):
    with use_backend(backend):
        return ppo_losses(*inputs, clip_coef=CLIP_COEF, value_clip=VALUE_CLIP)


def run_reference(*inputs):
    return ppo_losses_reference(*inputs, clip_coef=CLIP_COEF, value_clip=VALUE_CLIP)


IMPLEMENTATIONS = {
    "rlhf_fast cpp": run_ours,
    "naive torch (TRL)": naive_ppo_losses,
    "rlhf_fast reference": run_reference,
}


def forward_backward(function, inputs):
    logprobs, values = inputs[0], inputs[4]
    logprobs.grad = values.grad = None
    losses = function(*inputs)
    (losses["policy_loss"] + losses["value_loss"]).backward()
    return losses, logprobs.grad, values.grad


def forward_only(function, inputs):
    with torch.no_grad():
        return function(*inputs), None, None


PASSES = {"fwd+bwd": forward_backward, "fwd": forward_only}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.benchmark(min_rounds=50, warmup=True)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("pass_name", list(PASSES))
def test_ppo_losses_cpu(benchmark, implementation, pass_name):
    if implementation == "rlhf_fast cpp" and not _extension.has_cpp_kernels():
        pytest.skip("rlhf_fast._C is not built")
    benchmark.group = f"ppo_losses B={BATCH} T={STEPS} fp32 {pass_name}"
    inputs = ppo_batch(BATCH, STEPS)
    losses, grad_logprobs, grad_values = benchmark(PASSES[pass_name], IMPLEMENTATIONS[implementation], inputs)
    # Every contender computes the same thing on these inputs.
    want, want_grad_logprobs, want_grad_values = forward_backward(
        run_reference, [t.detach().double().requires_grad_(t.requires_grad) for t in inputs])
    for key, value in want.items():
        torch.testing.assert_close(losses[key].double(), value.detach(), atol=1e-4, rtol=1e-4, msg=key)
    if grad_logprobs is not None:
        decided = decided_tokens(inputs)
        for got, want_gradient in ((grad_logprobs, want_grad_logprobs), (grad_values, want_grad_values)):
            torch.testing.assert_close(got.double()[decided], want_gradient[decided], atol=1e-8, rtol=1e-4)
