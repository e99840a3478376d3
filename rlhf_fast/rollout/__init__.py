"""On-device batched sampling: static KV cache, temperature / top-k / top-p, EOS handling, no host sync."""

from rlhf_fast.rollout.decode import SampleOutput
from rlhf_fast.rollout.sampler import clear_graphs, prepare, sample
from rlhf_fast.rollout.selection import TokenSelector, entropy_of_logits, filter_logits

__all__ = [
    "SampleOutput",
    "TokenSelector",
    "clear_graphs",
    "entropy_of_logits",
    "filter_logits",
    "prepare",
    "sample",
]
