"""Tokenization of records, with an explicit, counted truncation policy.

Tokenization: the prompt and each response / completion are tokenized separately, with
``tokenizer(text, add_special_tokens=False)``, and concatenated, so the prompt/response boundary is exact
(tokenizing the joined text could merge tokens across it). No BOS or other special token is added: a chat
template writes its own (its rendered text starts with e.g. ``<|begin_of_text|>``, which tokenizes to the BOS
id); a base model that wants a BOS on plain-text prompts should have it in the prompt text. Each response and
completion ends with ``tokenizer.eos_token_id`` so the policy learns to stop and the reward model reads its
score at a fixed token. For a chat model, make sure ``tokenizer.eos_token`` is the end-of-turn token.

A record longer than `max_length` is handled by the `TruncationPolicy`:

- ``"error"`` (default): raise a `DataError` naming file, line and field ('prompt', 'response' or
  'completions[i]') with the token lengths;
- ``"skip"``: drop the record (counted);
- ``"truncate_prompt"``: drop prompt tokens from the left, keeping the whole response and at least one prompt
  token (counted); a response that does not fit alone is still an error. Note that left truncation can drop
  the start of a chat template (its BOS and system message).

Every function returns its items with a `TruncationReport` that counts what was truncated or skipped.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rlhf_fast.data.errors import IN_MEMORY, DataError, SourceLocation
from rlhf_fast.data.records import Demonstration, PretrainText, PromptRecord, Ranking
from rlhf_fast.data.truncation import TruncationPolicy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TruncationPolicy",
    "TruncationReport",
    "Fit",
    "plan_fit",
    "tokenize_texts",
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
]

# A response needs at least one prompt token before it: its first token is predicted from the position before.
MIN_PROMPT_TOKENS = 1
TOKENIZE_CHUNK = 1024  # texts per tokenizer call: batched for speed, chunked to bound memory


# Report keys.
TRUNCATED_PROMPT = "truncated_prompt"
SKIPPED_TOO_LONG = "skipped_too_long"
DROPPED_TAIL = "dropped_tail"


@dataclass
class TruncationReport:
    """What tokenization did to the records: counts by reason, and where each reason first happened.

    ``counts`` keys: "truncated_prompt" (records whose prompt lost tokens from the left), "skipped_too_long"
    (records dropped by the "skip" policy), "dropped_tail" (pretraining: the final partial block was dropped).
    """

    total: int = 0  # records in
    kept: int = 0  # records (or, for pretraining, documents) out
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens_dropped: int = 0
    first_source: dict[str, SourceLocation] = field(default_factory=dict)

    def add(self, reason: str, source: SourceLocation | None, tokens_dropped: int = 0) -> None:
        self.counts[reason] += 1
        self.tokens_dropped += tokens_dropped
        if source is not None:
            self.first_source.setdefault(reason, source)

    def format(self) -> str:
        """One line for a log: ``1000 records: 996 kept, 3 truncated_prompt (first at a.jsonl:17), ...``."""
        parts = [f"{self.total} records: {self.kept} kept"]
        for reason, count in sorted(self.counts.items()):
            where = f" (first at {self.first_source[reason]})" if reason in self.first_source else ""
            parts.append(f"{count} {reason}{where}")
        if self.tokens_dropped:
            parts.append(f"{self.tokens_dropped} tokens dropped")
        return ", ".join(parts)

    __str__ = format


@dataclass(frozen=True)
class Fit:
    """How a record fits `max_length` under a policy (see `plan_fit`)."""

    outcome: str  # "fits" | "truncate" | "skip" | "error"
    prompt_keep: int  # prompt tokens kept (from the right) when the outcome is "fits" or "truncate"
    field: str = ""  # the field to blame when it does not fit
    reason: str = ""


def plan_fit(
    prompt_length: int,
    target_lengths: Sequence[int],
    max_length: int,
    policy: TruncationPolicy,
    target_names: Sequence[str] = (),
    *,
    limit_name: str = "max_length",
) -> Fit:
    """Decides how a prompt followed by each target (response or completion, + eos) fits in `max_length`.

    `target_lengths` are token counts without the eos, which is added here. With no targets (a bare prompt)
    the prompt alone must fit. The blamed field is a target that cannot fit even after the prompt is cut to
    one token, else 'prompt'.
    """
    if target_lengths:
        longest_index = max(range(len(target_lengths)), key=target_lengths.__getitem__)
        target_total = target_lengths[longest_index] + 1
        target_name = target_names[longest_index] if target_names else "response"
        minimum_prompt = MIN_PROMPT_TOKENS
    else:
        target_total, target_name, minimum_prompt = 0, "", 1
    total = prompt_length + target_total
    if total <= max_length:
        return Fit("fits", prompt_length)
    if target_lengths:
        sizes = f"prompt {prompt_length} + {target_name} {target_total - 1} + eos 1 = {total} tokens"
    else:
        sizes = f"prompt has {prompt_length} tokens"
    target_alone_too_long = target_total + minimum_prompt > max_length
    if target_alone_too_long:
        reason = (
            f"{sizes} > {limit_name} {max_length}, and the {target_name} + eos alone ({target_total}) leaves "
            f"no room for a prompt token; raise {limit_name} or drop the record"
        )
        blamed = target_name
    else:
        keep = max_length - target_total
        reason = (
            f"{sizes} > {limit_name} {max_length} (policy 'truncate_prompt' would keep the last {keep} "
            "prompt tokens; 'skip' would drop the record)"
        )
        blamed = "prompt"
    if policy is TruncationPolicy.SKIP:
        return Fit("skip", 0, blamed, reason)
    if policy is TruncationPolicy.TRUNCATE_PROMPT and not target_alone_too_long:
        return Fit("truncate", max_length - target_total, blamed, reason)
    return Fit("error", 0, blamed, reason)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: set tokenizer.eos_token (responses end with it)")
    return int(eos)


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, batched in chunks."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start : start + TOKENIZE_CHUNK])
        ids.extend(
            list(row) for row in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        )
    return ids


def _sources(records: Sequence) -> list[SourceLocation]:
    """Each record's source; records built in memory without one are named by their 1-based index."""
    return [record.source or SourceLocation(IN_MEMORY, index + 1) for index, record in enumerate(records)]


def _check_records(records: Iterable, expected: type, name: str = "records") -> list:
    records = list(records)
    for index, record in enumerate(records):
        if not isinstance(record, expected):
            raise ValueError(f"{name}[{index}] must be a {expected.__name__}, got {type(record).__name__}")
    return records


def _checked(
    records: Iterable, expected: type, policy: str | TruncationPolicy, limit_name: str, limit: int
) -> tuple[TruncationPolicy, list, list[SourceLocation], TruncationReport]:
    """An encoder's checked inputs: (the policy, the records as a list, their sources, an empty report)."""
    policy = TruncationPolicy.parse(policy)
    _check_positive(limit_name, limit)
    records = _check_records(records, expected)
    return policy, records, _sources(records), TruncationReport(total=len(records))


def _fit_prompt(
    prompt_ids: list[int],
    targets: Mapping[str, list[int]],
    limit: int,
    policy: TruncationPolicy,
    report: TruncationReport,
    source: SourceLocation,
    limit_name: str = "max_length",
) -> list[int] | None:
    """The prompt ids a record keeps under `policy` (None: skipped, counted in `report`).

    Raises `DataError` for a record that does not fit under "error", and for a prompt or target (named by
    its field) that tokenizes to nothing.
    """
    names = list(targets)
    fit = plan_fit(
        len(prompt_ids), [len(ids) for ids in targets.values()], limit, policy, names, limit_name=limit_name
    )
    if fit.outcome == "error":
        raise DataError.at(source, fit.field, fit.reason, kind="too_long")
    if fit.outcome == "skip":
        report.add(SKIPPED_TOO_LONG, source)
        return None
    if fit.outcome == "truncate":
        report.add(TRUNCATED_PROMPT, source, len(prompt_ids) - fit.prompt_keep)
        prompt_ids = prompt_ids[len(prompt_ids) - fit.prompt_keep :]
    for name, ids in {"prompt": prompt_ids, **targets}.items():
        if not ids:
            raise DataError.at(source, name, "tokenizes to no tokens", kind="empty_text")
    return prompt_ids


class _Items:
    """Sequence behaviour over the `items` of an encoded result."""

    items: list

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator:
        return iter(self.items)

    def __getitem__(self, index):
        return self.items[index]


# ------------------------------------------------------------------------------------------ demonstrations


@dataclass(frozen=True)
class SFTExample:
    """`input_ids` = prompt ids + response ids + eos; the first `prompt_length` ids are the prompt."""

    input_ids: list[int]
    prompt_length: int
    source: SourceLocation | None = None


@dataclass
class EncodedDemonstrations(_Items):
    items: list[SFTExample]
    report: TruncationReport

    @property
    def examples(self) -> list[SFTExample]:
        return self.items


def encode_demonstrations(
    records: Iterable[Demonstration],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    policy: str | TruncationPolicy = TruncationPolicy.ERROR,
) -> EncodedDemonstrations:
    """Tokenizes demonstrations into SFT examples of at most `max_length` tokens (response + eos whole)."""
    policy, records, sources, report = _checked(records, Demonstration, policy, "max_length", max_length)
    eos = _eos_id(tokenizer)
    prompts = tokenize_texts(tokenizer, [record.prompt for record in records])
    responses = tokenize_texts(tokenizer, [record.response for record in records])
    examples = []
    for prompt_ids, response_ids, source in zip(prompts, responses, sources):
        prompt_ids = _fit_prompt(prompt_ids, {"response": response_ids}, max_length, policy, report, source)
        if prompt_ids is None:
            continue
        examples.append(SFTExample(prompt_ids + response_ids + [eos], len(prompt_ids), source))
    report.kept = len(examples)
    return EncodedDemonstrations(examples, report)


# ------------------------------------------------------------------------------------------------ rankings


@dataclass(frozen=True)
class EncodedRanking:
    """One ranking: the prompt's ids once, each completion's ids (ending with eos), the ranks (0 = best)."""

    prompt_ids: list[int]
    completion_ids: tuple[list[int], ...]
    ranks: tuple[int, ...]
    source: SourceLocation | None = None

    @property
    def k(self) -> int:
        return len(self.completion_ids)


@dataclass
class EncodedRankings(_Items):
    items: list[EncodedRanking]
    report: TruncationReport


def encode_rankings(
    records: Iterable[Ranking],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    policy: str | TruncationPolicy = TruncationPolicy.ERROR,
) -> EncodedRankings:
    """Tokenizes rankings so that prompt + each completion + eos fits in `max_length`.

    A ranking is kept or skipped whole (dropping one completion would change what the labeler ranked); under
    "truncate_prompt" the prompt is cut to fit the longest completion.
    """
    policy, records, sources, report = _checked(records, Ranking, policy, "max_length", max_length)
    eos = _eos_id(tokenizer)
    prompts = tokenize_texts(tokenizer, [record.prompt for record in records])
    flat_completions = tokenize_texts(tokenizer, [text for record in records for text in record.completions])
    items = []
    offset = 0
    for record, prompt_ids, source in zip(records, prompts, sources):
        completions = flat_completions[offset : offset + record.k]
        offset += record.k
        targets = {f"completions[{index}]": ids for index, ids in enumerate(completions)}
        prompt_ids = _fit_prompt(prompt_ids, targets, max_length, policy, report, source)
        if prompt_ids is None:
            continue
        items.append(
            EncodedRanking(prompt_ids, tuple(ids + [eos] for ids in completions), record.ranks, source)
        )
    report.kept = len(items)
    return EncodedRankings(items, report)


# ------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]
    source: SourceLocation | None = None


@dataclass
class EncodedPrompts(_Items):
    items: list[EncodedPrompt]
    report: TruncationReport


def encode_prompts(
    records: Iterable[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    policy: str | TruncationPolicy = TruncationPolicy.ERROR,
) -> EncodedPrompts:
    """Tokenizes prompts to at most `max_prompt_length` tokens ("truncate_prompt" keeps the last ones)."""
    policy, records, sources, report = _checked(
        records, PromptRecord, policy, "max_prompt_length", max_prompt_length
    )
    items = []
    for prompt_ids, source in zip(tokenize_texts(tokenizer, [record.prompt for record in records]), sources):
        prompt_ids = _fit_prompt(
            prompt_ids, {}, max_prompt_length, policy, report, source, limit_name="max_prompt_length"
        )
        if prompt_ids is None:
            continue
        items.append(EncodedPrompt(prompt_ids, source))
    report.kept = len(items)
    return EncodedPrompts(items, report)


# --------------------------------------------------------------------------------------------- pretraining


@dataclass
class EncodedPretrain:
    """`blocks`: [num_blocks, block_size] int64, the documents concatenated (each followed by eos) and cut."""

    blocks: torch.Tensor
    report: TruncationReport
    num_tokens: int  # tokens in the concatenation, eos included, before the tail was dropped

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.blocks)

    def __getitem__(self, index):
        return self.blocks[index]


def encode_pretrain(
    records: Iterable[PretrainText],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
) -> EncodedPretrain:
    """Concatenates the documents, each followed by eos, and cuts the stream into blocks of `block_size`.

    Blocks span document boundaries (the usual GPT pretraining layout). The final partial block is dropped and
    counted in the report ("dropped_tail", `tokens_dropped`). Fewer tokens than one block is an error.
    """
    _check_positive("block_size", block_size)
    records = _check_records(records, PretrainText)
    if not records:
        raise ValueError("records is empty: no pretraining text to encode")
    eos = _eos_id(tokenizer)
    stream: list[int] = []
    for ids in tokenize_texts(tokenizer, [record.text for record in records]):
        stream.extend(ids)
        stream.append(eos)
    num_blocks = len(stream) // block_size
    report = TruncationReport(total=len(records), kept=len(records))
    if num_blocks == 0:
        source = records[0].source or SourceLocation(IN_MEMORY, 0)
        raise DataError(
            source.path,
            0,
            "text",
            f"the corpus has {len(stream)} tokens (eos included), fewer than "
            f"one block of block_size {block_size}",
            kind="too_short",
        )
    tail = len(stream) - num_blocks * block_size
    if tail:
        report.add(DROPPED_TAIL, None, tail)
    blocks = torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)
    return EncodedPretrain(blocks, report, len(stream))
