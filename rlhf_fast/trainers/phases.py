"""Named phases of a training step, for profiling (`rlhf-fast profile`, bench/bench_trainers_trl.py).

Trainers mark where each phase of a step runs:

    with phase("rollout"):
        out = sample(...)

A phase costs one global read when no recorder listens, so the marks stay in the training code. A recorder
(anything with `begin(name)` and `end(name)`) installed with `recording(recorder)` hears every phase of this
process; phases may nest (`"score"` around `"score/reference"`), and the recorder decides what to do with
them (wall time with a device synchronization at each edge, a `torch.profiler.record_function` range, ...).

Phase names used by the trainers:
    PPO:      rollout, score/reference, score/policy, score/value, score/reward, rewards_gae, update
    SFT, RM:  data, forward, backward, optimizer
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


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


__all__ = ["PhaseRecorder", "phase", "recording"]
