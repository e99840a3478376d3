"""Argument checks shared by the ops. Each raises ValueError naming the argument and what was expected."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, value, *, ndim: int | None = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32/bfloat16/float16/float64, got {value.dtype}")
    return value


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but {reference_name} has shape {tuple(reference.shape)}"
            )


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def check_mask(name: str, mask, shape: torch.Size) -> torch.Tensor:
    """A mask is a bool or integer tensor of the given shape (nonzero = valid token).

    Floating masks are refused: a float tensor is ambiguous between a 0/1 mask and per-token weights.
    """
    check_tensor(name, mask)
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(
            f"{name} must be a bool or integer 0/1 tensor, got dtype {mask.dtype} (use {name}.bool())"
        )
    return mask


_value_checks = True


def set_value_checks(enabled: bool) -> bool:
    """Turns the checks that read tensor values (NaN, index ranges) on or off; returns the old setting.

    They are on by default. Each one reads a value back to the host, so the trainers turn them off to keep
    a training step free of host synchronization.
    """
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    return previous


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turns the value checks on or off inside the block (`with value_checks(False):` keeps a training step
    free of the host syncs they cost), restoring the previous setting on exit."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def value_checks_enabled() -> bool:
    return _value_checks and not torch.compiler.is_compiling()


def check_finite(name: str, value: torch.Tensor) -> None:
    """Rejects NaN/inf (a host sync; skipped when value checks are off)."""
    if value_checks_enabled() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
