"""Shared test utilities: which backends can run here, per-dtype tolerances, ragged/holed masks, another
process holding an output directory's lock."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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


# Another process holding the lock as `rlhf_fast.trainers.lock.lock_output_dir` does (flock + its pid and host),
# without the package's import time.
_LOCK_HOLDER = (
    "import fcntl, json, os, socket, sys, time\n"
    "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode())\n"
    "print('held', flush=True)\n"
    "time.sleep(60)\n"
)


@contextlib.contextmanager
def lock_held_by_another_process(directory: Path) -> Iterator[subprocess.Popen]:
    """A process that holds `directory`'s output lock until the block ends (then it is killed, SIGKILL)."""
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(directory)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
