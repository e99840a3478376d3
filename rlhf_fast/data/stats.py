"""Dataset statistics for `--dry-run`: counts, token-length histograms, K distribution, what the truncation
policy would do, and what the reader skipped, printable as plain text with ASCII bars."""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlhf_fast.data.encode import (
    EncodedDemonstrations,
    EncodedPretrain,
    EncodedPrompts,
    EncodedRankings,
    TruncationPolicy,
    TruncationReport,
    plan_fit,
    tokenize_texts,
)
from rlhf_fast.data.errors import DataError, SourceLocation
from rlhf_fast.data.jsonl import LoadResult
from rlhf_fast.data.records import Demonstration, PretrainText, PromptRecord, Ranking

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["LengthHistogram", "DatasetStats", "describe", "format_stats"]

BAR_WIDTH = 40


def _nice_width(span: int, num_buckets: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that covers `span` in at most `num_buckets` buckets."""
    target = max(1, math.ceil(span / num_buckets))
    magnitude = 10 ** int(math.floor(math.log10(target)))
    for step in (1, 2, 5, 10):
        if step * magnitude >= target:
            return step * magnitude
    return 10 * magnitude


@dataclass
class LengthHistogram:
    """Token lengths in equal-width buckets: bucket i counts lengths in [edges[i], edges[i] + width)."""

    name: str
    edges: list[int]
    width: int
    counts: list[int]
    count: int
    minimum: int
    maximum: int
    mean: float
    p50: int
    p95: int

    @classmethod
    def of(cls, name: str, lengths: Sequence[int], num_buckets: int = 10) -> LengthHistogram:
        if not lengths:
            return cls(name, [], 1, [], 0, 0, 0, 0.0, 0, 0)
        ordered = sorted(lengths)
        low, high = ordered[0], ordered[-1]
        width = _nice_width(high - low + 1, num_buckets)
        start = (low // width) * width
        num = (high - start) // width + 1
        counts = [0] * num
        for length in ordered:
            counts[(length - start) // width] += 1
        return cls(
            name=name,
            edges=[start + i * width for i in range(num)],
            width=width,
            counts=counts,
            count=len(ordered),
            minimum=low,
            maximum=high,
            mean=sum(ordered) / len(ordered),
            p50=ordered[(len(ordered) - 1) // 2],
            p95=ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
        )

    def format(self, bar_width: int = BAR_WIDTH) -> str:
        lines = [
            f"{self.name}: n={self.count} min={self.minimum} mean={self.mean:.1f} p50={self.p50} "
            f"p95={self.p95} max={self.maximum} tokens"
        ]
        peak = max(self.counts, default=0)
        label_width = len(str(self.edges[-1] + self.width - 1)) if self.edges else 1
        for edge, count in zip(self.edges, self.counts):
            bar = "#" * (round(bar_width * count / peak) if peak else 0)
            if count and not bar:
                bar = "."  # a non-empty bucket is always visible
            label = f"{edge:>{label_width}}-{edge + self.width - 1:<{label_width}}"
            lines.append(f"  {label} |{bar:<{bar_width}} {count}")
        return "\n".join(lines)


@dataclass
class DatasetStats:
    kind: str  # "demonstrations" | "rankings" | "prompts" | "pretrain"
    path: str | None
    num_records: int
    histograms: dict[str, LengthHistogram]
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    first_skipped: dict[str, DataError] = field(default_factory=dict)
    extra_fields: collections.Counter[str] = field(default_factory=collections.Counter)
    k_distribution: collections.Counter[int] = field(default_factory=collections.Counter)
    # Under `max_length` and `policy`: how many records would fit, be truncated, skipped, or raise an error.
    max_length: int | None = None
    policy: str | None = None
    fit_outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    first_unfit: dict[str, DataError] = field(default_factory=dict)
    # For already-encoded input: what encoding did.
    truncation: TruncationReport | None = None
    # Pretraining: tokens in the concatenation (eos included) and whole blocks of `max_length` (= block size).
    num_tokens: int | None = None
    num_blocks: int | None = None


def _kind_of(item: Any) -> str:
    for kind, types in (
        ("demonstrations", Demonstration),
        ("rankings", Ranking),
        ("prompts", PromptRecord),
        ("pretrain", PretrainText),
    ):
        if isinstance(item, types):
            return kind
    raise ValueError(
        f"data must hold Demonstration, Ranking, PromptRecord or PretrainText records, got "
        f"{type(item).__name__}"
    )


def describe(
    data: Any,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    max_length: int | None = None,
    policy: str | TruncationPolicy = TruncationPolicy.ERROR,
    num_buckets: int = 10,
) -> DatasetStats:
    """Statistics of a `LoadResult`, a list of records, or an encoded result (`encode_*`'s return value).

    Records are tokenized with `tokenizer` (as `encode_*` would: separately, no special tokens). With
    `max_length`, the stats count what `policy` would do to each record (for prompts it is the maximum prompt
    length; for pretraining text, the block size). Encoded input needs no tokenizer and reports what encoding
    did.
    """
    policy = TruncationPolicy.parse(policy)
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    if isinstance(data, (EncodedDemonstrations, EncodedRankings, EncodedPrompts, EncodedPretrain)):
        return _describe_encoded(data, num_buckets)
    path = None
    stats_from_reader: dict[str, Any] = {}
    if isinstance(data, LoadResult):
        path = data.path
        stats_from_reader = dict(
            skipped=collections.Counter(data.skipped),
            first_skipped=dict(data.first_skipped),
            extra_fields=collections.Counter(data.extra_fields),
        )
        records = list(data.records)
    else:
        records = list(data)
    if not records:
        raise ValueError("data has no records to describe")
    kind = _kind_of(records[0])
    for index, record in enumerate(records):
        if _kind_of(record) != kind:
            raise ValueError(
                f"data[{index}] is a {type(record).__name__} but data[0] is a {type(records[0]).__name__}"
            )
    if tokenizer is None:
        raise ValueError("tokenizer is required to describe records (token lengths); pass tokenizer=...")
    stats = DatasetStats(
        kind,
        path,
        len(records),
        {},
        max_length=max_length,
        policy=policy.value if max_length is not None else None,
        **stats_from_reader,
    )
    sources = [record.source or SourceLocation("<memory>", index + 1) for index, record in enumerate(records)]

    def count_fit(
        source: SourceLocation,
        prompt_length: int,
        targets: list[int],
        names: list[str],
        limit_name: str = "max_length",
    ) -> None:
        if max_length is None:
            return
        fit = plan_fit(prompt_length, targets, max_length, policy, names, limit_name=limit_name)
        stats.fit_outcomes[fit.outcome] += 1
        if fit.outcome != "fits" and fit.outcome not in stats.first_unfit:
            stats.first_unfit[fit.outcome] = DataError.at(source, fit.field, fit.reason, kind="too_long")

    if kind == "demonstrations":
        prompts = [len(ids) for ids in tokenize_texts(tokenizer, [r.prompt for r in records])]
        responses = [len(ids) for ids in tokenize_texts(tokenizer, [r.response for r in records])]
        for source, prompt, response in zip(sources, prompts, responses):
            count_fit(source, prompt, [response], ["response"])
        stats.histograms = {
            "prompt": LengthHistogram.of("prompt", prompts, num_buckets),
            "response": LengthHistogram.of("response", responses, num_buckets),
            "total": LengthHistogram.of(
                "total (prompt + response + eos)",
                [p + r + 1 for p, r in zip(prompts, responses)],
                num_buckets,
            ),
        }
    elif kind == "rankings":
        prompts = [len(ids) for ids in tokenize_texts(tokenizer, [r.prompt for r in records])]
        flat = [len(ids) for ids in tokenize_texts(tokenizer, [c for r in records for c in r.completions])]
        rows, offset = [], 0
        for record, source, prompt in zip(records, sources, prompts):
            completions = flat[offset : offset + record.k]
            offset += record.k
            stats.k_distribution[record.k] += 1
            rows.extend(prompt + length + 1 for length in completions)
            count_fit(source, prompt, completions, [f"completions[{i}]" for i in range(record.k)])
        stats.histograms = {
            "prompt": LengthHistogram.of("prompt", prompts, num_buckets),
            "completion": LengthHistogram.of("completion", flat, num_buckets),
            "sequence": LengthHistogram.of(
                "sequence (prompt + completion + eos), one per completion", rows, num_buckets
            ),
        }
    elif kind == "prompts":
        prompts = [len(ids) for ids in tokenize_texts(tokenizer, [r.prompt for r in records])]
        for source, prompt in zip(sources, prompts):
            count_fit(source, prompt, [], [], limit_name="max_prompt_length")
        stats.histograms = {"prompt": LengthHistogram.of("prompt", prompts, num_buckets)}
    else:
        texts = [len(ids) + 1 for ids in tokenize_texts(tokenizer, [r.text for r in records])]
        stats.histograms = {"text": LengthHistogram.of("document (text + eos)", texts, num_buckets)}
        stats.num_tokens = sum(texts)
        if max_length is not None:
            stats.num_blocks = stats.num_tokens // max_length
            stats.policy = None  # blocks are cut, never truncated per record
    return stats


def _describe_encoded(encoded: Any, num_buckets: int) -> DatasetStats:
    if isinstance(encoded, EncodedPretrain):
        num_blocks, block_size = encoded.blocks.shape
        return DatasetStats(
            "pretrain",
            None,
            encoded.report.kept,
            {},
            truncation=encoded.report,
            num_tokens=encoded.num_tokens,
            num_blocks=num_blocks,
            max_length=block_size,
        )
    items = list(encoded)
    sources = [item.source for item in items if item.source is not None]
    path = sources[0].path if sources and all(s.path == sources[0].path for s in sources) else None
    if isinstance(encoded, EncodedDemonstrations):
        prompts = [item.prompt_length for item in items]
        totals = [len(item.input_ids) for item in items]
        histograms = {
            "prompt": LengthHistogram.of("prompt", prompts, num_buckets),
            "response": LengthHistogram.of(
                "response (+ eos)", [t - p for t, p in zip(totals, prompts)], num_buckets
            ),
            "total": LengthHistogram.of("total (prompt + response + eos)", totals, num_buckets),
        }
        return DatasetStats("demonstrations", path, len(items), histograms, truncation=encoded.report)
    if isinstance(encoded, EncodedRankings):
        prompts = [len(item.prompt_ids) for item in items]
        completions = [len(ids) for item in items for ids in item.completion_ids]
        rows = [len(item.prompt_ids) + len(ids) for item in items for ids in item.completion_ids]
        histograms = {
            "prompt": LengthHistogram.of("prompt", prompts, num_buckets),
            "completion": LengthHistogram.of("completion (+ eos)", completions, num_buckets),
            "sequence": LengthHistogram.of(
                "sequence (prompt + completion + eos), one per completion", rows, num_buckets
            ),
        }
        return DatasetStats(
            "rankings",
            path,
            len(items),
            histograms,
            truncation=encoded.report,
            k_distribution=collections.Counter(item.k for item in items),
        )
    prompts = [len(item.input_ids) for item in items]
    return DatasetStats(
        "prompts",
        path,
        len(items),
        {"prompt": LengthHistogram.of("prompt", prompts, num_buckets)},
        truncation=encoded.report,
    )


def format_stats(stats: DatasetStats) -> str:
    """A multi-line, human-readable summary of `stats` (ASCII bars, no color)."""
    lines = [f"{stats.kind}" + (f": {stats.path}" if stats.path else "")]
    lines.append(f"  records: {stats.num_records}")
    if stats.skipped:
        total = sum(stats.skipped.values())
        lines.append(f"  skipped while reading: {total}")
        for reason, count in stats.skipped.most_common():
            first = stats.first_skipped.get(reason)
            lines.append(f"    {count:>6} {reason}" + (f"  e.g. {first}" if first else ""))
    if stats.extra_fields:
        fields = ", ".join(f"'{name}' ({count})" for name, count in stats.extra_fields.most_common())
        lines.append(f"  unknown fields (ignored): {fields}")
    if stats.k_distribution:
        peak = max(stats.k_distribution.values())
        lines.append("  completions per ranking (K):")
        for k in sorted(stats.k_distribution):
            count = stats.k_distribution[k]
            bar = "#" * max(1, round(BAR_WIDTH * count / peak))
            lines.append(f"    K={k} |{bar:<{BAR_WIDTH}} {count}")
    if stats.num_tokens is not None:
        line = f"  tokens: {stats.num_tokens}"
        if stats.num_blocks is not None and stats.max_length:
            tail = stats.num_tokens - stats.num_blocks * stats.max_length
            line += f" -> {stats.num_blocks} blocks of {stats.max_length} ({tail} tail tokens dropped)"
        lines.append(line)
    for histogram in stats.histograms.values():
        if histogram.count:
            lines.extend("  " + line for line in histogram.format().splitlines())
    if stats.fit_outcomes:
        limit = "max_prompt_length" if stats.kind == "prompts" else "max_length"
        lines.append(f"  under {limit} {stats.max_length} with policy '{stats.policy}':")
        labels = {
            "fits": "fit",
            "truncate": "would have the prompt truncated",
            "skip": "would be skipped",
            "error": "would raise an error",
        }
        for outcome in ("fits", "truncate", "skip", "error"):
            count = stats.fit_outcomes.get(outcome, 0)
            if count:
                first = stats.first_unfit.get(outcome)
                lines.append(f"    {count:>6} {labels[outcome]}" + (f"  e.g. {first}" if first else ""))
    if stats.truncation is not None:
        lines.append(f"  encoding: {stats.truncation.format()}")
    return "\n".join(lines)
