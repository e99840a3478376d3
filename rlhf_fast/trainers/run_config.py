"""`RunConfig`, the settings every trainer shares, and the checks of the trainers' configs."""

from __future__ import annotations

import dataclasses
import math

from rlhf_fast.models.loading import DTYPES, LoRAConfig


def nonfinite_fields(config, prefix: str = "") -> list[str]:
    """`name=value` of every float in a config dataclass (nested dataclasses, tuples and lists included) that
    is NaN or infinite."""
    found = []
    for field in dataclasses.fields(config):
        found += _nonfinite(getattr(config, field.name), prefix + field.name)
    return found


def _nonfinite(value, name: str) -> list[str]:
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{name}={value}"]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return nonfinite_fields(value, name + ".")
    if isinstance(value, (list, tuple)):
        return [found for i, item in enumerate(value) for found in _nonfinite(item, f"{name}[{i}]")]
    return []


@dataclasses.dataclass
class RunConfig:
    """Fields every trainer shares: where the run lives, how it checkpoints and resumes, how it fails."""

    seed: int = 0
    output_dir: str = "runs/rlhf_fast"
    save_every: int = 100  # steps (PPO: iterations) between checkpoints; 0 = only at the end
    resume: bool = False  # continue from <output_dir>/checkpoints/last (or previous) if there is one
    max_bad_steps: int = 10  # consecutive non-finite steps (PPO: iterations) before aborting
    log_every: int = 1
    device: str = "auto"  # "auto": cuda:<local rank> when CUDA is available, else cpu
    fsdp: bool = False  # shard the trained models with FSDP2 (fully_shard per transformer block)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # Models' precision: "auto" = bfloat16 on CUDA, float32 on a CPU; trained weights stay float32 (autocast)
    dtype: str = "auto"
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    lora: LoRAConfig | None = None  # train LoRA adapters (peft) instead of the full weights

    def check(self) -> None:
        bad = nonfinite_fields(self)
        if bad:
            raise ValueError(f"{', '.join(bad)}: every number in the config must be finite")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


def check_epoch_settings(config) -> None:
    """The checks the SFT and reward configs share: batch sizes, epochs and learning rate."""
    for name in ("batch_size", "epochs", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.micro_batch_size is not None and config.micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {config.micro_batch_size}")
    if config.learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {config.learning_rate}")
