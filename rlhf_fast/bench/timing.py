"""How the packaged benchmarks time and measure: contenders interleaved (A B A B ...), min and median per call.

Interleaving puts a burst of load from other processes on every contender alike, so the ratio of medians
measured in one run is the figure to read; absolute times are only meaningful on an idle machine.

On a CUDA device each call is timed with CUDA events after a write of 256 MB that evicts the L2 cache (as
`triton.testing.do_bench` does), so a memory-bound op is timed reading from HBM, comparable with its floor.
On a CPU each round times a burst of calls with `time.perf_counter`.

Floors come from the ceilings measured on one H200 (shared/ANCHORS.md): 4.25 TB/s device-to-device copy (read
+ write counted) and 696 TFLOP/s bf16 matmul. On another GPU they are the H200's floors, named as such.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping

import torch

# Ceilings measured on one NVIDIA H200 (shared/ANCHORS.md).
COPY_BYTES_PER_SECOND = 4.25e12
MATMUL_FLOPS_PER_SECOND = 696e12
FLOOR_MACHINE = "H200"

_L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass
class Timing:
    """Seconds per call over the rounds of one interleaved run."""

    min_s: float
    median_s: float
    rounds: int
    calls_per_round: int


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    calls: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int = 10,
    round_seconds: float = 0.02,
    max_calls_per_round: int = 1000,
) -> dict[str, Timing]:
    """Times every call of `calls` in turn, `rounds` times over (A B A B ...); each round of a contender is a
    burst of calls lasting about `round_seconds` (at least one call). One untimed call of each comes first."""
    per_round = {}
    for name, call in calls.items():
        call()  # warm-up: lazy initialization, autotuning, allocator growth
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        once = time.perf_counter() - started
        per_round[name] = max(1, min(max_calls_per_round, int(round_seconds / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    timer = _cuda_seconds if device.type == "cuda" else _cpu_seconds
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if device.type == "cuda" else None
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name].append(timer(call, per_round[name], flush))
    return {
        name: Timing(min(times), statistics.median(times), rounds, per_round[name])
        for name, times in samples.items()
    }


def _cpu_seconds(call: Callable[[], object], count: int, _flush) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - started) / count


def _cuda_seconds(call: Callable[[], object], count: int, flush: torch.Tensor) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.mean(start.elapsed_time(end) for start, end in zip(starts, ends)) / 1e3


def peak_extra_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """CUDA memory allocated at the peak of one call beyond what was allocated before it (temporaries,
    outputs, gradients); None on a CPU, where a process-wide high-water mark cannot be reset per call."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def graph_replay(call: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """A call that replays a CUDA graph holding `call` (the GPU work without Python or launch overhead).
    Raises when `call` cannot be captured."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as capture requires
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def process_peak_rss_bytes() -> int | None:
    """This process's resident-set high-water mark (VmHWM), or None where /proc is absent."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current resident set where the kernel allows it (Linux `clear_refs` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


__all__ = [
    "COPY_BYTES_PER_SECOND",
    "FLOOR_MACHINE",
    "MATMUL_FLOPS_PER_SECOND",
    "Timing",
    "device_name",
    "graph_replay",
    "interleaved",
    "peak_extra_bytes",
    "process_peak_rss_bytes",
    "reset_peak_rss",
    "synchronize",
]


def _busy_loop() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_cores(count: int, settle_seconds: float = 0.2) -> Iterator[None]:
    """`count` other processes, each keeping a core busy, for the duration of the block: a machine under load."""
    others = [multiprocessing.Process(target=_busy_loop, daemon=True) for _ in range(count)]
    for other in others:
        other.start()
    try:
        if others:
            time.sleep(settle_seconds)  # let the scheduler place them before anything is timed
        yield
    finally:
        for other in others:
            other.kill()
            other.join()
