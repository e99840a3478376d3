"""GPU benchmark of the PPO losses at B=256, T=1024: clipped surrogate + clipped value loss + diagnostics,
forward only and forward + backward, fp32 and bf16 inputs, a ragged right-padded mask.

    python3 bench/gpu_ppo_loss.py        (bench/gpu_check.sh runs it on the GPU machine)

Prints markdown rows: case | ours (µs) | baseline (µs) | ratio | floor (µs). "ours" is the median of
`triton.testing.do_bench` over the public `ppo_losses()` call (with `torch.autograd.grad` into logprobs and
values for fwd+bwd) with the backend forced, and for the CUDA kernel also the replay of a CUDA graph holding
the call (launch cost without the Python dispatch). The baseline is the naive torch composition TRL's PPO
trainer runs (`naive_ppo_losses` in bench/bench_ppo_loss.py: one op per step, masked means, diagnostics under
no_grad), measured in the same run on the same GPU. The floor is the bytes one pass must move at the
4.25 TB/s device-copy rate measured on an H200 (shared/ANCHORS.md): the forward reads the six [B, T] float
inputs and the bool mask once; fwd+bwd reads them twice and writes the two gradients.

Without a GPU it times the C++ CPU kernel against the same composition on the CPU (one thread, wall clock),
so the script can be checked anywhere.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpu_common import COPY_BYTES_PER_SECOND, graph_replay_ms, median_seconds
from bench_ppo_loss import CLIP_COEF, VALUE_CLIP, decided_tokens, naive_ppo_losses, ppo_batch  # noqa: E402

from rlhf_fast.ops import ppo_losses, ppo_losses_reference, use_backend  # noqa: E402

BATCH, STEPS = 256, 1024
HEADER = "| case | ours (µs) | baseline (µs) | ratio | floor (µs) |\n|---|---|---|---|---|"


def batch_in(dtype: torch.dtype, device: str):
    """ppo_batch's inputs cast to `dtype` (log-probs and values stay leaves that require grad)."""
    inputs = list(ppo_batch(BATCH, STEPS, device))
    for index, tensor in enumerate(inputs):
        if tensor.is_floating_point():
            inputs[index] = tensor.detach().to(dtype).requires_grad_(tensor.requires_grad)
    return inputs


def ours(inputs, backend: str):
    with use_backend(backend):
        return ppo_losses(*inputs, clip_coef=CLIP_COEF, value_clip=VALUE_CLIP)


def forward_backward(function, inputs):
    losses = function(inputs)
    objective = losses["policy_loss"] + losses["value_loss"]
    return losses, *torch.autograd.grad(objective, (inputs[0], inputs[4]))


def forward_only(function, inputs):
    with torch.no_grad():
        return (function(inputs),)


PASSES = {"fwd": forward_only, "fwd+bwd": forward_backward}
CONTENDERS = {
    "cuda": functools.partial(ours, backend="cuda"),
    "triton": functools.partial(ours, backend="triton"),
}


def naive(inputs):
    return naive_ppo_losses(*inputs)


def floor_us(inputs, pass_name: str) -> float:
    read = sum(t.numel() * t.element_size() for t in inputs)
    if pass_name == "fwd":
        return read / COPY_BYTES_PER_SECOND * 1e6
    written = 2 * inputs[0].numel() * inputs[0].element_size()
    return (2 * read + written) / COPY_BYTES_PER_SECOND * 1e6


def check_same(got, inputs) -> None:
    """`got` (a PASSES result) agrees with the float64 reference on the same inputs."""
    reference_inputs = [t.detach().cpu().double().requires_grad_(t.requires_grad) for t in inputs]
    want = forward_backward(lambda x: ppo_losses_reference(*x, clip_coef=CLIP_COEF, value_clip=VALUE_CLIP),
                            reference_inputs)
    tolerance = dict(atol=1e-4, rtol=1e-4) if inputs[0].dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for key, value in want[0].items():
        torch.testing.assert_close(got[0][key].cpu().double(), value.detach(), **tolerance, msg=key)
    decided = decided_tokens(inputs)
    for got_gradient, want_gradient in zip(got[1:], want[1:]):
        scale = want_gradient.abs().max().item()
        torch.testing.assert_close(got_gradient.double().cpu()[decided], want_gradient[decided],
                                   rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)


def case_name(contender: str, pass_name: str, dtype: torch.dtype, device: str) -> str:
    return f"ppo_losses {contender}, {pass_name}, B={BATCH} T={STEPS} {str(dtype).removeprefix('torch.')} ({device})"


def run_gpu() -> None:
    import triton
    import triton.testing

    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, median of do_bench")
    print(HEADER)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = batch_in(dtype, "cuda")
        for pass_name, run_pass in PASSES.items():
            baseline = functools.partial(run_pass, naive, inputs)
            if pass_name == "fwd+bwd" and dtype == torch.float32:
                # In bf16 the composition rounds every intermediate (the ratio too) to bf16, which moves clip
                # decisions well beyond the kinks; it is the same code as in fp32, checked there.
                check_same(baseline(), inputs)
            baseline_ms = triton.testing.do_bench(baseline, return_mode="median")
            floor = floor_us(inputs, pass_name)
            rows = []
            for contender, function in CONTENDERS.items():
                run_ours = functools.partial(run_pass, function, inputs)
                if pass_name == "fwd+bwd":
                    check_same(run_ours(), inputs)
                rows.append((contender, triton.testing.do_bench(run_ours, return_mode="median")))
            replay_ms = graph_replay_ms(functools.partial(run_pass, CONTENDERS["cuda"], inputs))
            if replay_ms is not None:
                rows.append(("cuda, CUDA-graph replay", replay_ms))
            for contender, ms in rows:
                print(
                    f"| {case_name(contender, pass_name, dtype, device)} | {ms * 1e3:.1f} | "
                    f"{baseline_ms * 1e3:.1f} | {baseline_ms / ms:.1f}x | {floor:.2f} |"
                )


def run_cpu_fallback() -> None:
    from rlhf_fast import _extension

    torch.set_num_threads(1)
    print("no CUDA device: CPU fallback, C++ kernel vs the same composition, one thread, median wall clock")
    if not _extension.has_cpp_kernels():
        print("rlhf_fast._C is not built: nothing to time")
        return
    print(HEADER)
    inputs = batch_in(torch.float32, "cpu")
    cpp = functools.partial(ours, backend="cpp")
    for pass_name, run_pass in PASSES.items():
        run_ours = functools.partial(run_pass, cpp, inputs)
        baseline = functools.partial(run_pass, naive, inputs)
        if pass_name == "fwd+bwd":
            check_same(run_ours(), inputs)
            check_same(baseline(), inputs)
        baseline_s = median_seconds(baseline, 20)
        ours_s = median_seconds(run_ours, 20)
        print(
            f"| {case_name('cpp', pass_name, torch.float32, 'CPU fallback')} | {ours_s * 1e6:.1f} | "
            f"{baseline_s * 1e6:.1f} | {baseline_s / ours_s:.1f}x | n/a |"
        )


if __name__ == "__main__":
    run_gpu() if torch.cuda.is_available() else run_cpu_fallback()
