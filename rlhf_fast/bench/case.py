"""A benchmark case: contenders doing the same work on the same inputs, one of them the baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch

from rlhf_fast.ops import use_backend

# A contender's role: "ours" (rlhf_fast), "baseline" (naive torch, what the ratios are against), "peer" (another
# library, when importable), "reference" (rlhf_fast's plain-torch reference).
ROLES = ("ours", "baseline", "peer", "reference")


@dataclasses.dataclass
class Contender:
    name: str
    call: Callable[[], object]
    role: str = "ours"
    graph: bool = False  # on a GPU, also time the replay of a CUDA graph holding the call
    checked: bool = True  # its output is checked against the reference before timing


@dataclasses.dataclass
class Case:
    """`check(output)` raises when a contender's output disagrees with the reference; a contender that fails
    it (or raises) is left out of the timing with the reason."""

    op: str
    name: str
    contenders: list[Contender]
    check: Callable[[object], None] | None = None
    floor_s: float | None = None  # the physical lower bound of one call on this device, if known
    floor_basis: str = ""  # what the floor counts
    rounds: int = 10
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def backend_call(backend: str, function: Callable[..., object], *args, **kwargs) -> Callable[[], object]:
    """A no-argument call of `function(*args, **kwargs)` with `backend` forced."""

    def call():
        with use_backend(backend):
            return function(*args, **kwargs)

    return call


def ours_contenders(
    device: torch.device,
    make_call: Callable[[str], Callable[[], object]],
    *,
    cpu_backends: Iterable[str] = ("cpp",),
    gpu_backends: Iterable[str] = ("cuda", "triton"),
) -> list[Contender]:
    """rlhf_fast on each backend it has for `device` (`make_call(backend)` builds the call); a backend this
    installation lacks fails its first call and is reported as skipped."""
    backends = tuple(gpu_backends) if device.type == "cuda" else tuple(cpu_backends)
    return [
        Contender(f"rlhf_fast {backend}", make_call(backend), graph=backend == "cuda") for backend in backends
    ]


__all__ = ["ROLES", "Case", "Contender", "backend_call", "ours_contenders"]
