"""JSONL data formats, validation, tokenization with a counted truncation policy, collation, statistics.

result = read_demonstrations("demos.jsonl", on_bad_record="skip", tokenizer=tokenizer)
encoded = encode_demonstrations(result, tokenizer, max_length=1024, policy="truncate_prompt")
batch = collate_sft(encoded[:8], pad_id=tokenizer.pad_token_id)
print(format_stats(describe(result, tokenizer, max_length=1024)))
"""

from rlhf_fast.data.errors import DataError, SourceLocation
from rlhf_fast.data.jsonl import (
    LoadResult,
    read_demonstrations,
    read_pretrain_text,
    read_prompts,
    read_rankings,
    write_jsonl,
)
from rlhf_fast.data.records import Demonstration, PretrainText, PromptRecord, Ranking
from rlhf_fast.data.truncation import TruncationPolicy

# Tokenization, collation and statistics import torch: loaded on first use, so reading and validating JSONL
# (and the command line's config) stays light.
_LAZY = {
    "collate": (
        "collate_pretrain",
        "collate_prompts",
        "collate_rankings",
        "collate_rankings_shared_prompt",
        "collate_sft",
        "pack_sft",
        "packed_attention_mask",
        "pad_rows",
        "prompt_sharing_pays",
    ),
    "encode": (
        "EncodedDemonstrations",
        "EncodedPretrain",
        "EncodedPrompt",
        "EncodedPrompts",
        "EncodedRanking",
        "EncodedRankings",
        "SFTExample",
        "TruncationReport",
        "encode_demonstrations",
        "encode_pretrain",
        "encode_prompts",
        "encode_rankings",
    ),
    "stats": ("DatasetStats", "LengthHistogram", "describe", "format_stats"),
}
_LAZY_MODULE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _LAZY_MODULE:
        import importlib

        return getattr(importlib.import_module(f"rlhf_fast.data.{_LAZY_MODULE[name]}"), name)
    raise AttributeError(f"module 'rlhf_fast.data' has no attribute {name!r}")


__all__ = [
    "DataError",
    "SourceLocation",
    "Demonstration",
    "Ranking",
    "PromptRecord",
    "PretrainText",
    "LoadResult",
    "read_demonstrations",
    "read_rankings",
    "read_prompts",
    "read_pretrain_text",
    "write_jsonl",
    "TruncationPolicy",
]
__all__ += [name for names in _LAZY.values() for name in names]  # the lazy names, listed once above
