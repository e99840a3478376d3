"""On-device batched sampling: static KV cache, temperature / top-k / top-p, EOS handling, no host sync."""

from rlhf_fast.rollout.sampler import (
    SampleOutput,
    TokenSelector,
    clear_graphs,
    entropy_of_logits,
    filter_logits,
    prepare,
    sample,
)

__all__ = [
    "SampleOutput",
    "TokenSelector",
    "clear_graphs",
    "entropy_of_logits",
    "filter_logits",
    "prepare",
    "sample",
]
