"""CPU benchmark of per-token log-probs from hidden states x LM head (N=4096 tokens, d=256, V=50257, fp32) and
from logits (N=1024, V=50257): rlhf_fast's chunked backend against naive torch.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_logprob.py \
        --benchmark-group-by=group -s --benchmark-timer=time.process_time

On the shared development machines (2 cores, load average 5-8 from other jobs) wall-clock rounds of seconds
swing by 2x depending on what else runs; with one intra-op thread, process CPU time (`time.process_time`,
user + system, page faults included) measures the work itself, so that is the timer recorded in RESULTS.md.

The cases, the baseline and the checks live in rlhf_fast/bench/logprob.py, which
`rlhf-fast bench --ops logprob` runs interleaved; here pytest-benchmark times them.

Peak memory is measured, not estimated: each (case, contender) runs once in a fresh subprocess, and the
figure is the growth of the process's peak resident set (VmHWM in /proc/self/status) across that one call,
after the inputs exist and after a warm-up call of the same contender on 8 tokens and a 64-entry vocabulary
(which takes the lazy imports and one-time initialization, ~85 MB, out of the figure). It therefore counts
every temporary and the outputs (for the backward, the 51 MB weight gradient too). For scale, the naive
path's largest temporaries are analytic: the fp32 logits and their log_softmax, 2 x N x V x 4 B = 1.65 GB.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch

from rlhf_fast.bench import logprob as OP_CASES
from rlhf_fast.bench.timing import process_peak_rss_bytes, reset_peak_rss

FUNCTIONS = {"naive torch": OP_CASES.naive, "rlhf_fast chunked": partial(OP_CASES.ours, backend="chunked")}


def peak_rss_growth_mib(shape_key: str, contender: str) -> float:
    """Runs one call in a fresh interpreter; returns the growth of its peak RSS across that call (MiB)."""
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--peak-rss", shape_key, contender],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]


def _measure_in_this_process(shape_key: str, contender: str) -> None:
    torch.set_num_threads(1)
    shape = OP_CASES.CPU_SHAPES[shape_key]
    function = FUNCTIONS[contender]
    small = dataclasses.replace(shape, tokens=8, vocab=64)
    OP_CASES.prepared_call(small, OP_CASES.make_inputs(small, "cpu", torch.float32), function)()
    call = OP_CASES.prepared_call(shape, OP_CASES.make_inputs(shape, "cpu", torch.float32), function)
    before = process_peak_rss_bytes() if not reset_peak_rss() else _rss_bytes()
    call()
    print(json.dumps({"peak_rss_growth_mib": (process_peak_rss_bytes() - before) / 2**20}))


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


_peaks: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_peaks():
    yield
    if _peaks:
        print("\n\npeak RSS growth during one call (MiB, fresh subprocess each):")
        for (case, contender), mib in sorted(_peaks.items()):
            print(f"  {case:60s} {contender:18s} {mib:9.1f}")


def test_logprobs_cpu(benchmark, op_case):
    case, contender = op_case
    benchmark.group = case.name
    benchmark.pedantic(contender.call, rounds=case.rounds, warmup_rounds=1)
    shape_key = next(key for key, shape in OP_CASES.CPU_SHAPES.items() if case.name.startswith(shape.name))
    peak = peak_rss_growth_mib(shape_key, contender.name)
    _peaks[(case.name, contender.name)] = peak
    benchmark.extra_info["peak_rss_growth_mib"] = peak


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--peak-rss":
    _measure_in_this_process(sys.argv[2], sys.argv[3])
