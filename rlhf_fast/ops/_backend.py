"""Backend selection shared by every op.

Each op has up to five implementations of the same function: `reference` (plain torch, the ground truth),
`cpp` (C++ CPU kernel), `cuda` (CUDA C++ kernel), `triton`, and `chunked` (plain torch over bounded-memory
chunks, where an op has one). Which one runs is decided per call from the
tensor's device:

- `RLHF_FAST_BACKEND=<name>` in the environment, or `with use_backend("<name>"):`, forces one everywhere
  (`auto` restores the default). A forced backend that an op cannot run on that device is an error, never a
  silent fallback.
- Otherwise CPU tensors take `cpp` (or `reference` where the extension is not built) and CUDA tensors take
  the op's measured-faster GPU variant, then the other, then `reference`.

Triton runs CPU tensors only under `TRITON_INTERPRET=1` (how the tests exercise it without a GPU).

Each op keeps one table {backend name: implementation} (or one per direction) and asks `pick` for the entry
to run; `lazy` defers importing a Triton module until its first call, `compiled` names a kernel of the
extension (cpp and cuda share one compiled op: the dispatcher picks the kernel from the device).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch

from rlhf_fast import _extension

BACKENDS = ("reference", "cpp", "cuda", "triton", "chunked")
Implementation = TypeVar("Implementation")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("rlhf_fast_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend for every op called inside the block (`"auto"` for the default choice)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    name = _forced.get() or os.environ.get("RLHF_FAST_BACKEND") or "auto"
    if name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"RLHF_FAST_BACKEND must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device, implemented: tuple[str, ...]) -> list[str]:
    """The backends of `implemented` that can run on `device` in this process."""
    usable = []
    for name in implemented:
        if name == "reference":
            usable.append(name)
        elif name == "cpp" and device.type == "cpu" and _extension.has_cpp_kernels():
            usable.append(name)
        elif name == "chunked":  # plain torch in bounded-memory chunks: runs anywhere
            usable.append(name)
        elif name == "cuda" and device.type == "cuda" and _extension.has_cuda_kernels():
            usable.append(name)
        elif name == "triton" and triton_importable():
            if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
                usable.append(name)
    return usable


def select_backend(
    op_name: str, device: torch.device, implemented: tuple[str, ...], gpu_order: tuple[str, ...]
) -> str:
    """The backend that runs `op_name` on `device`; `gpu_order` lists the GPU variants fastest first."""
    # Called on every op invocation: the answer depends only on these keys, so it is cached.
    return _select_cached(
        op_name, device.type, implemented, gpu_order, forced_backend(), triton_interpreting()
    )


@functools.lru_cache(maxsize=256)
def _select_cached(
    op_name: str,
    device_type: str,
    implemented: tuple[str, ...],
    gpu_order: tuple[str, ...],
    forced: str | None,
    interpreting: bool,
) -> str:
    usable = available_backends(torch.device(device_type), implemented)
    if forced is not None:
        if forced not in usable:
            raise RuntimeError(
                f"rlhf_fast: backend {forced!r} was forced but cannot run {op_name} on {device_type} "
                f"(usable here: {usable})"
            )
        return forced
    preference = ("cpp", "chunked") if device_type == "cpu" else gpu_order
    for name in preference:
        if name in usable:
            return name
    return "reference"


def pick(
    op_name: str, device: torch.device, table: Mapping[str, Implementation], gpu_order: tuple[str, ...]
) -> Implementation:
    """The entry of `table` (keyed by backend name) that runs `op_name` on `device`."""
    return table[select_backend(op_name, device, tuple(table), gpu_order)]


def lazy(module: str, name: str) -> Callable:
    """`module.name`, imported at its first call (Triton modules import triton, which a CPU run may lack)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = f"{module}.{name}"
    return call


def compiled(name: str) -> Callable:
    """The extension's kernel `torch.ops.rlhf_fast_C.<name>`, looked up at call time (the build may lack it)."""

    def call(*args):
        return getattr(_extension.kernels(), name)(*args)

    call.__qualname__ = f"rlhf_fast_C.{name}"
    return call


def kernel_table(reference: Callable, compiled_name: str, triton_module: str, triton_name: str) -> dict:
    """The usual table of an op direction: plain torch, the extension's kernel for both cpp and cuda, Triton."""
    kernel = compiled(compiled_name)
    return {"reference": reference, "cpp": kernel, "cuda": kernel, "triton": lazy(triton_module, triton_name)}
