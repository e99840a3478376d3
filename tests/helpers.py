"""Shared test utilities: which backends can run here, per-dtype tolerances, ragged/holed masks."""

from __future__ import annotations

import torch

from rlhf_fast.ops._backend import available_backends

# Tolerances for comparing a backend's float32 output with the float64 reference, by input dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def kernel_backends(implemented: tuple[str, ...], device: str = "cpu") -> list[str]:
    """The non-reference backends that can run on `device` here (Triton on a CPU needs TRITON_INTERPRET=1)."""
    return [b for b in available_backends(torch.device(device), implemented) if b != "reference"]


def fresh_generator(device: str = "cpu") -> torch.Generator:
    """A generator seeded from fresh entropy each run; the seed is printed on failure via the repr."""
    generator = torch.Generator(device=device)
    generator.seed()
    return generator


def ragged_mask(batch: int, steps: int, generator: torch.Generator, *, holes: bool = True,
                all_masked_row: bool = True) -> torch.Tensor:
    """A [B, T] bool mask whose rows start and end anywhere, with holes and (for B > 1) one empty row."""
    starts = torch.randint(0, steps, (batch,), generator=generator)
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    positions = torch.arange(steps)
    mask = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    if holes:
        mask &= torch.rand(batch, steps, generator=generator) > 0.2
    if all_masked_row and batch > 1:
        mask[int(torch.randint(0, batch, (1,), generator=generator))] = False
    return mask
