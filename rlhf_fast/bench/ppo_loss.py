"""The PPO losses: clipped surrogate + clipped value loss + diagnostics, forward only and forward + backward,
over a ragged right-padded mask.

Baseline (`naive_ppo_losses`): the same outputs op by op as TRL's `PPOTrainer.train` writes them: `masked_fill`
of the new log-probs and values at padding, `torch.clamp` with tensor bounds for the clipped value, the two
squared errors and their `torch.max`, ratio = `exp(new − old)`, the two surrogate terms and their `torch.max`,
`masked_mean(x, mask) = (x * mask).sum() / mask.sum()` for each loss and each diagnostic (clip fractions under
`no_grad` as TRL; approx_kl as CleanRL's (ratio − 1) − log ratio, and the mean ratio, which rlhf_fast returns
too), then `torch.autograd.grad` of policy_loss + value_loss. Every contender is checked against the float64
reference before it is timed (gradients where no clip decision sits at a kink).

Inputs: fresh random, ratios exp(N(0, 0.3)) and old values off by N(0, 0.3), so both clips are active on a
fair share of tokens. CPU: B=64, T=512 fp32; GPU: B=256, T=1024, fp32 and bf16. The GPU floor is the bytes one
pass must move at the H200's device-copy rate: the forward reads the six [B, T] inputs and the mask once;
fwd+bwd reads them twice and writes the two gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, partial

import torch

from rlhf_fast.bench.case import Case, Contender, ours_contenders
from rlhf_fast.bench.timing import COPY_BYTES_PER_SECOND
from rlhf_fast.ops import ppo_losses, ppo_losses_reference, use_backend

CLIP_COEF, VALUE_CLIP = 0.2, 0.2
INVALID_LOGPROB = 1.0  # TRL's fill value for log-probs at padding
SHAPES = {"cpu": (64, 512), "cuda": (256, 1024)}


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def naive_ppo_losses(logprobs, old_logprobs, advantages, mask, values, old_values, returns,
                     clip_coef=CLIP_COEF, value_clip=VALUE_CLIP):  # fmt: skip
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


def ppo_batch(batch: int, steps: int, device: torch.device | str = "cpu", dtype=torch.float32):
    """Fresh random [B, T] inputs (log-probs and values are leaves that require grad) and a right-padded bool
    mask with lengths 1..T."""
    generator = torch.Generator()
    generator.seed()

    def normal(scale=1.0):
        return torch.randn(batch, steps, generator=generator) * scale

    mask = torch.arange(steps) < torch.randint(1, steps + 1, (batch, 1), generator=generator)
    old_logprobs = -2 * normal().abs()
    logprobs = old_logprobs + normal(0.3)
    values = normal()
    tensors = (logprobs, old_logprobs, normal(), mask, values, values + normal(0.3), normal())
    out = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tensors]
    out[0].requires_grad_()
    out[4].requires_grad_()
    return out


def decided_tokens(inputs, margin: float = 1e-4) -> torch.Tensor:
    """[B, T] bool: tokens whose clip decisions rounding cannot flip (away from the clip bounds and from ties of
    the two squared value errors). Gradients are compared there only: at a kink the derivative jumps, and
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


def forward_backward(function, inputs):
    losses = function(*inputs)
    objective = losses["policy_loss"] + losses["value_loss"]
    return (losses, *torch.autograd.grad(objective, (inputs[0], inputs[4])))


def forward_only(function, inputs):
    with torch.no_grad():
        return (function(*inputs),)


PASSES = {"fwd": forward_only, "fwd+bwd": forward_backward}


def _ours(backend: str, *inputs):
    with use_backend(backend):
        return ppo_losses(*inputs, clip_coef=CLIP_COEF, value_clip=VALUE_CLIP)


def _reference(*inputs):
    return ppo_losses_reference(*inputs, clip_coef=CLIP_COEF, value_clip=VALUE_CLIP)


def checker(inputs, pass_name: str):
    """Compares with the float64 reference, computed at the first check."""
    low_precision = inputs[0].dtype != torch.float32
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if low_precision else {"atol": 1e-4, "rtol": 1e-4}

    @cache
    def reference():
        reference_inputs = [t.detach().cpu().double().requires_grad_(t.requires_grad) for t in inputs]
        return forward_backward(_reference, reference_inputs), decided_tokens(inputs)

    def check(output) -> None:
        want, decided = reference()
        for key, value in want[0].items():
            torch.testing.assert_close(output[0][key].detach().cpu().double(), value.detach(), **tolerance)
        for got, expected in zip(output[1:], want[1:]):
            scale = expected.abs().max().item()
            torch.testing.assert_close(got.double().cpu()[decided], expected[decided],
                                       rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)  # fmt: skip

    return check


def floor_seconds(inputs, pass_name: str) -> float:
    read = sum(t.numel() * t.element_size() for t in inputs)
    if pass_name == "fwd":
        return read / COPY_BYTES_PER_SECOND
    written = 2 * inputs[0].numel() * inputs[0].element_size()
    return (2 * read + written) / COPY_BYTES_PER_SECOND


def cases(device: torch.device) -> Iterator[Case]:
    on_gpu = device.type == "cuda"
    batch, steps = SHAPES["cuda" if on_gpu else "cpu"]
    for dtype in (torch.float32, torch.bfloat16) if on_gpu else (torch.float32,):
        inputs = ppo_batch(batch, steps, device, dtype)
        for pass_name, run_pass in PASSES.items():
            contenders = ours_contenders(
                device,
                lambda backend, run_pass=run_pass, inputs=inputs: partial(
                    run_pass, partial(_ours, backend), inputs
                ),
            )
            # In bf16 the naive composition rounds every intermediate (the ratio too) to bf16, which moves clip
            # decisions well beyond the kinks: its values are checked in fp32 (the same code).
            naive = partial(run_pass, naive_ppo_losses, inputs)
            contenders.append(
                Contender("naive torch (TRL)", naive, "baseline", checked=dtype == torch.float32)
            )
            if not on_gpu:
                contenders.append(
                    Contender("rlhf_fast reference", partial(run_pass, _reference, inputs), "reference")
                )
            yield Case(
                op="ppo_loss",
                name=f"ppo_losses B={batch} T={steps} {str(dtype).removeprefix('torch.')} {pass_name}",
                contenders=contenders,
                check=checker(inputs, pass_name),
                floor_s=floor_seconds(inputs, pass_name) if on_gpu else None,
                floor_basis="bytes moved at the H200 device-copy rate",
                rounds=10,
            )


__all__ = ["CLIP_COEF", "VALUE_CLIP", "cases", "decided_tokens", "naive_ppo_losses", "ppo_batch"]
