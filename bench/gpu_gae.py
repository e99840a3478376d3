"""GPU benchmark of GAE at B=256, T=1024 fp32, right-padded ragged masks, with and without whitening.

    python3 bench/gpu_gae.py        (bench/gpu_check.sh runs it on the GPU machine)

Prints markdown rows: case | ours (µs) | baseline (ms) | ratio | floor (µs). "ours" is the median of
`triton.testing.do_bench` over the public `gae()` call with the backend forced (L2 flushed before each call),
and, for the fused CUDA kernel, the replay of a CUDA graph holding the call (launch cost without the Python
dispatch). The baseline is the peers' Python loop over time steps (bench/bench_gae.py: OpenRLHF's loop for
raw advantages, TRL's loop + masked_whiten with whitening), measured in the same run on the same GPU. The
floor is the bytes one pass must move (rewards, values and mask read, advantages and returns written) at the
4.25 TB/s device-copy rate measured on an H200 (shared/ANCHORS.md).

Without a GPU it times the C++ CPU kernel against the same loops on the CPU (one thread, wall clock), so the
script can be checked anywhere.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gpu_common import COPY_BYTES_PER_SECOND, graph_replay_ms, median_seconds
from bench_gae import GAMMA, LAM, openrlhf_gae, right_padded_batch, trl_gae_whitened  # noqa: E402

from rlhf_fast.ops import gae, use_backend  # noqa: E402

BATCH, STEPS = 256, 1024
HEADER = "| case | ours (µs) | baseline (ms) | ratio | floor (µs) |\n|---|---|---|---|---|"


def baseline(rewards, values, mask, whiten):
    if whiten:
        return trl_gae_whitened(values, rewards, ~mask, GAMMA, LAM)
    return openrlhf_gae(values, rewards, mask, GAMMA, LAM)


def ours(rewards, values, mask, whiten, backend):
    with use_backend(backend):
        return gae(rewards, values, mask, GAMMA, LAM, whiten)


def floor_us(rewards, values, mask) -> float:
    read = sum(t.numel() * t.element_size() for t in (rewards, values, mask))
    written = 2 * rewards.numel() * 4
    return (read + written) / COPY_BYTES_PER_SECOND * 1e6


def check_same(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-4)


def case_name(backend: str, whiten: bool, device: str) -> str:
    masks = "ragged mask + whiten" if whiten else "ragged mask"
    return f"gae {backend}, B={BATCH} T={STEPS} fp32, {masks} ({device})"


def run_gpu() -> None:
    import triton
    import triton.testing

    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, median of do_bench")
    print(HEADER)
    for whiten in (True, False):
        inputs = right_padded_batch(BATCH, STEPS, "cuda")
        run_baseline = functools.partial(baseline, *inputs, whiten)
        want = run_baseline()
        baseline_ms = triton.testing.do_bench(run_baseline, warmup=100, rep=1000, return_mode="median")
        floor = floor_us(*inputs)
        for backend in ("cuda", "triton"):
            run_ours = functools.partial(ours, *inputs, whiten, backend)
            check_same(run_ours(), want)
            ms = triton.testing.do_bench(run_ours, return_mode="median")
            print(
                f"| {case_name(backend, whiten, device)} | {ms * 1e3:.1f} | {baseline_ms:.1f} | "
                f"{baseline_ms / ms:.0f}x | {floor:.2f} |"
            )
        replay_ms = graph_replay_ms(functools.partial(ours, *inputs, whiten, "cuda"))
        if replay_ms is not None:
            print(
                f"| {case_name('cuda, CUDA-graph replay', whiten, device)} | {replay_ms * 1e3:.1f} | "
                f"{baseline_ms:.1f} | {baseline_ms / replay_ms:.0f}x | {floor:.2f} |"
            )


def run_cpu_fallback() -> None:
    from rlhf_fast import _extension

    torch.set_num_threads(1)
    print("no CUDA device: CPU fallback, C++ kernel vs the same loops, one thread, median wall clock")
    if not _extension.has_cpp_kernels():
        print("rlhf_fast._C is not built: nothing to time")
        return
    print(HEADER)
    for whiten in (True, False):
        inputs = right_padded_batch(BATCH, STEPS)
        run_baseline = functools.partial(baseline, *inputs, whiten)
        run_ours = functools.partial(ours, *inputs, whiten, "cpp")
        check_same(run_ours(), run_baseline())
        baseline_s = median_seconds(run_baseline, 5)
        ours_s = median_seconds(run_ours, 50)
        print(
            f"| {case_name('cpp', whiten, 'CPU fallback')} | {ours_s * 1e6:.1f} | {baseline_s * 1e3:.1f} | "
            f"{baseline_s / ours_s:.0f}x | n/a |"
        )


if __name__ == "__main__":
    run_gpu() if torch.cuda.is_available() else run_cpu_fallback()
