"""On-device batched sampling: static KV cache, temperature / top-k / top-p, EOS handling, no host sync."""

from rlhf_fast.rollout.sampler import SampleOutput, TokenSelector, sample

__all__ = ["SampleOutput", "TokenSelector", "sample"]
