"""End-to-end pipelines: `run_demo` runs the InstructGPT miniature (world → SFT → RM → PPO/PPO-ptx → eval)."""

from rlhf_fast.pipeline.demo import check_targets, evaluate_models, run_demo
from rlhf_fast.pipeline.presets import PRESETS, DemoPreset, get_preset

__all__ = ["PRESETS", "DemoPreset", "check_targets", "evaluate_models", "get_preset", "run_demo"]
