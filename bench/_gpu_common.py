"""Timing helpers the standalone GPU benchmarks (bench/gpu_*.py) share.

The scripts put bench/ on sys.path, so `from _gpu_common import ...` works when they run as
`python bench/gpu_<name>.py` from the repository root.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# Device-copy rate measured on an H200 (shared/ANCHORS.md): the bandwidth floor of a memory-bound op.
COPY_BYTES_PER_SECOND = 4.25e12


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of `function`, after one untimed warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_replay_ms(function: Callable[[], object]) -> float | None:
    """Median ms of replaying a CUDA graph that holds `function` (`do_bench_cudagraph`), or None (with the
    reason printed) when the call cannot be captured, so the other rows of a table are still printed."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(function, rep=100, return_mode="median")
    except Exception as error:  # noqa: BLE001 (capture unsupported for this call: report it, keep the other rows)
        print(f"graph capture failed: {type(error).__name__}: {error}".splitlines()[0])
        return None
