"""Metrics output shared by the trainers: JSONL (always), TensorBoard (when importable), a tqdm bar, and the
device-side metrics dict that is read back to the host once per step.

Only rank 0 writes; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

logger = logging.getLogger("rlhf_fast.trainers")


def read_metrics(metrics: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Device tensors (0-d) and floats -> floats, with a single device-to-host transfer."""
    names = list(metrics)
    tensors = [value for value in metrics.values() if isinstance(value, torch.Tensor)]
    if not tensors:
        return {name: float(value) for name, value in metrics.items()}
    device = tensors[0].device
    stacked = torch.stack(
        [
            value.detach().reshape(()).to(device=device, dtype=torch.float32)
            if isinstance(value, torch.Tensor)
            else torch.tensor(float(value), device=device)
            for value in metrics.values()
        ]
    )
    return dict(zip(names, stacked.tolist()))


class MetricsLogger:
    """Appends `{"step": s, **metrics}` lines to `<output_dir>/metrics.jsonl` and mirrors them to TensorBoard.

    `keep_lines=n` (a resumed run: the line count its checkpoint recorded) keeps the first n lines of an
    interrupted run and drops the rest, so the file reads as one uninterrupted run; None starts a new file.
    `lines` counts the lines the file holds.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        keep_lines: int | None = None,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.lines = 0
        self._writer = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_lines is not None and self.path.exists():
            kept = []
            with open(self.path, "rb") as handle:
                for line in handle:
                    if len(kept) >= keep_lines or not line.endswith(b"\n"):  # a line cut short by a kill
                        break
                    kept.append(line)
            if len(kept) < keep_lines:
                logger.warning(
                    "%s holds %d complete lines, fewer than the %d its checkpoint counted",
                    self.path,
                    len(kept),
                    keep_lines,
                )
            _replace(self.path, b"".join(kept))
            self.lines = len(kept)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")  # noqa: SIM115 - held for the whole run, closed by close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self._writer = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        for name, value in metrics.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else str(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(name, float(value), step)

    def sync(self) -> None:
        """Makes the lines written so far durable (before a checkpoint counts them)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _replace(path: Path, content: bytes) -> None:
    """Writes `content` to `path` atomically (a temporary file beside it, renamed over it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class ProgressBar:
    """A tqdm bar (rank 0, when tqdm is importable) showing a few key metrics."""

    def __init__(
        self, total: int, *, initial: int = 0, desc: str = "", keys: Sequence[str] = (), enabled: bool = True
    ):
        self.keys = keys
        self._bar = None
        if enabled and os.environ.get("RLHF_FAST_NO_PROGRESS", "0") != "1":
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
            except ImportError:
                self._bar = None

    def update(self, metrics: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        shown = {key.split("/")[-1]: f"{metrics[key]:.4g}" for key in self.keys if key in metrics}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
