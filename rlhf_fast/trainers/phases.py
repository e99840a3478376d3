"""Named phases of a training step, for profiling (`rlhf-fast profile`, bench/bench_trainers_trl.py).

Trainers mark where each phase of a step runs:

    with phase("rollout"):
        out = sample(...)

A phase costs one global read when no recorder listens, so the marks stay in the training code. A recorder
(anything with `begin(name)` and `end(name)`) installed with `recording(recorder)` hears every phase of this
process; phases may nest (`"score"` around `"score/reference"`), and the recorder decides what to do with
them (wall time with a device synchronization at each edge, a `torch.profiler.record_function` range, ...).

Phase names used by the trainers:
    PPO:      rollout, score (around score/reference, score/policy, score/value, score/reward), rewards_gae,
              update
    SFT, RM:  data, forward, backward, optimizer
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Protocol

import torch


class PhaseRecorder(Protocol):
    def begin(self, name: str) -> None: ...

    def end(self, name: str) -> None: ...


_recorder: PhaseRecorder | None = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Marks the enclosed code as phase `name` for the installed recorder, if any."""
    recorder = _recorder
    if recorder is None:
        yield
        return
    recorder.begin(name)
    try:
        yield
    finally:
        recorder.end(name)


@contextlib.contextmanager
def recording(recorder: PhaseRecorder) -> Iterator[PhaseRecorder]:
    """Installs `recorder` for the enclosed code (one recorder at a time)."""
    global _recorder
    if _recorder is not None:
        raise RuntimeError("a phase recorder is already installed")
    _recorder = recorder
    try:
        yield recorder
    finally:
        _recorder = None


class PhaseTimer:
    """Wall time per phase, summed over the calls since the last `reset()`.

    `synchronize` waits for the device at each phase edge, so queued GPU work is charged to the phase that
    queued it (a profiling run accepts those syncs; a training run installs no recorder). `trace=True` also
    opens a `torch.profiler.record_function` range per phase, so phases show in a profiler trace.
    """

    def __init__(
        self, device: torch.device | str | None = None, *, synchronize: bool = True, trace: bool = False
    ):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._sync = torch.cuda.synchronize if synchronize and device.type == "cuda" else None
        self._trace = trace
        self._open: list[tuple[str, float, contextlib.AbstractContextManager | None]] = []
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def begin(self, name: str) -> None:
        if self._sync is not None:
            self._sync()
        scope = None
        if self._trace:
            scope = torch.profiler.record_function(name)
            scope.__enter__()
        self._open.append((name, time.perf_counter(), scope))

    def end(self, name: str) -> None:
        if self._sync is not None:
            self._sync()
        opened, started, scope = self._open.pop()
        if opened != name:
            raise RuntimeError(f"phase {name!r} ended while {opened!r} was open")
        self.seconds[name] += time.perf_counter() - started
        self.calls[name] += 1
        if scope is not None:
            scope.__exit__(None, None, None)

    def top_level(self) -> dict[str, float]:
        """Seconds of the phases that are not nested in another (names without a '/' or whose parent was
        never opened), so they add up to at most the wall time of the code they cover."""
        return {
            name: t
            for name, t in self.seconds.items()
            if name.split("/")[0] not in self.seconds or "/" not in name
        }

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


__all__ = ["PhaseRecorder", "PhaseTimer", "phase", "recording"]
