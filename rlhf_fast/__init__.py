"""rlhf_fast: InstructGPT (SFT, K-wise reward model, PPO-ptx) with fused kernels for the hot spots."""

__version__ = "0.1.0"
