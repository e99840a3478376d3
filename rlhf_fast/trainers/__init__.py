"""The three InstructGPT training stages: SFT, the K-wise reward model, PPO / PPO-ptx.

Each trainer runs on one process or under `torchrun` (DDP; FSDP2 with `fsdp=True`), checkpoints atomically,
resumes exactly (`resume=True`), and skips non-finite steps up to `max_bad_steps` in a row.
"""

from rlhf_fast.trainers._common import NonFiniteError
from rlhf_fast.trainers.ppo import AdaptiveKLController, FixedKLController, PPOConfig, PPOTrainer
from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer
from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "NonFiniteError",
    "PPOConfig",
    "PPOTrainer",
    "RewardConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
]
