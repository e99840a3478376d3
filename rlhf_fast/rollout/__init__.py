"""On-device batched sampling: static KV cache, temperature / top-k / top-p, EOS handling, no host sync."""

from rlhf_fast.rollout.sampler import SampleOutput, TokenSelector, clear_graphs, prepare, sample

__all__ = ["SampleOutput", "TokenSelector", "clear_graphs", "prepare", "sample"]
