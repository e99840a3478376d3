"""JSONL data formats, validation, tokenization with a counted truncation policy, collation, statistics.

result = read_demonstrations("demos.jsonl", on_bad_record="skip", tokenizer=tokenizer)
encoded = encode_demonstrations(result, tokenizer, max_length=1024, policy="truncate_prompt")
batch = collate_sft(encoded[:8], pad_id=tokenizer.pad_token_id)
print(format_stats(describe(result, tokenizer, max_length=1024)))
"""

from rlhf_fast.data.collate import (
    collate_pretrain,
    collate_prompts,
    collate_rankings,
    collate_sft,
    pack_sft,
    packed_attention_mask,
    pad_rows,
)
from rlhf_fast.data.encode import (
    EncodedDemonstrations,
    EncodedPretrain,
    EncodedPrompt,
    EncodedPrompts,
    EncodedRanking,
    EncodedRankings,
    SFTExample,
    TruncationPolicy,
    TruncationReport,
    encode_demonstrations,
    encode_pretrain,
    encode_prompts,
    encode_rankings,
)
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
from rlhf_fast.data.stats import DatasetStats, LengthHistogram, describe, format_stats

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
    "TruncationReport",
    "SFTExample",
    "EncodedDemonstrations",
    "EncodedRanking",
    "EncodedRankings",
    "EncodedPrompt",
    "EncodedPrompts",
    "EncodedPretrain",
    "encode_demonstrations",
    "encode_rankings",
    "encode_prompts",
    "encode_pretrain",
    "pad_rows",
    "collate_sft",
    "pack_sft",
    "packed_attention_mask",
    "collate_rankings",
    "collate_prompts",
    "collate_pretrain",
    "DatasetStats",
    "LengthHistogram",
    "describe",
    "format_stats",
]
