"""End-to-end pipelines: `run_demo` runs the InstructGPT miniature (world → SFT → RM → PPO/PPO-ptx → eval)."""

from rlhf_fast.pipeline.threads import bound_openmp_spinning

bound_openmp_spinning()  # before torch loads OpenMP (rlhf_fast.pipeline.demo imports torch)

from rlhf_fast.pipeline.demo import run_demo
from rlhf_fast.pipeline.presets import PRESETS, DemoPreset, get_preset
from rlhf_fast.pipeline.targets import check_targets

__all__ = ["PRESETS", "DemoPreset", "check_targets", "get_preset", "run_demo"]
