"""rlhf_fast: InstructGPT (SFT, K-wise reward model, PPO-ptx) with fused kernels for the hot spots."""

__version__ = "0.1.0"

# The trainers import transformers: load them on first use, so `import rlhf_fast.ops` stays light.
_TRAINER_EXPORTS = ("SFTTrainer", "SFTConfig", "RewardTrainer", "RewardConfig", "PPOTrainer", "PPOConfig")


def __getattr__(name: str):
    if name in _TRAINER_EXPORTS:
        from rlhf_fast import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module 'rlhf_fast' has no attribute {name!r}")
