"""The four record types the trainers consume, validated on construction.

Records hold text, not token ids; `rlhf_fast.data.encode` tokenizes them. Each record keeps the
`SourceLocation` it was read from, so errors found later (at tokenization, say) still name the file and line.
Validation lives here (not only in the JSONL reader) so records built in memory, e.g. by the demo's world
generator, obey the same rules. Text is stored exactly as given: whitespace is significant to tokenizers,
so it is only stripped to decide whether a field is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from rlhf_fast.data.errors import DataError, SourceLocation

__all__ = [
    "MIN_COMPLETIONS",
    "MAX_COMPLETIONS",
    "Demonstration",
    "Ranking",
    "PromptRecord",
    "PretrainText",
    "DataError",
    "SourceLocation",
]

# InstructGPT's labelers ranked between 4 and 9 completions; 2 is a preference pair.
MIN_COMPLETIONS = 2
MAX_COMPLETIONS = 9


def check_unicode(source: SourceLocation | None, name: str, value: str) -> None:
    """DataError naming field `name` when `value` is not valid Unicode text: JSON's "\\ud800" escapes can
    spell a lone surrogate, which no tokenizer or UTF-8 file can hold."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError.at(
            source,
            name,
            f"invalid text: a lone surrogate {ascii(value[error.start])[1:-1]} at character {error.start + 1} "
            "(not a Unicode character)",
            kind="invalid_text",
        ) from None


def _check_text(source: SourceLocation | None, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise DataError.at(source, name, f"expected a string, got {_json_type(value)}", kind="wrong_type")
    check_unicode(source, name, value)
    if not value.strip():
        raise DataError.at(source, name, "empty after stripping whitespace", kind="empty_text")


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for messages about a JSON file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Record:
    """What every record shares: its `_text_fields` must be non-empty Unicode strings, and `to_dict` gives its
    fields as JSON values, all but `source`."""

    _text_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self._text_fields:
            _check_text(self.source, name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        values = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "source"}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


@dataclass(frozen=True)
class Demonstration(_Record):
    """A prompt and the labeler-written response (SFT data)."""

    prompt: str
    response: str
    source: SourceLocation | None = field(default=None, compare=False)
    _text_fields = ("prompt", "response")


@dataclass(frozen=True)
class Ranking(_Record):
    """K completions of one prompt ranked by a labeler: `ranks[i]` is completion i's rank, 0 = best.

    Ties share a rank. Rank values only matter through their order (they need not be contiguous), but at
    least two completions must differ in rank, or there is no preference to learn from.
    """

    prompt: str
    completions: tuple[str, ...]
    ranks: tuple[int, ...]
    source: SourceLocation | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        source = self.source
        _check_text(source, "prompt", self.prompt)
        if not isinstance(self.completions, (list, tuple)):
            raise DataError.at(
                source,
                "completions",
                f"expected an array of strings, got {_json_type(self.completions)}",
                kind="wrong_type",
            )
        if not isinstance(self.ranks, (list, tuple)):
            raise DataError.at(
                source,
                "ranks",
                f"expected an array of integers, got {_json_type(self.ranks)}",
                kind="wrong_type",
            )
        # Lists are accepted for convenience and frozen into tuples so the record stays hashable.
        object.__setattr__(self, "completions", tuple(self.completions))
        object.__setattr__(self, "ranks", tuple(self.ranks))
        k = len(self.completions)
        if not MIN_COMPLETIONS <= k <= MAX_COMPLETIONS:
            raise DataError.at(
                source,
                "completions",
                f"has {k} completions; a ranking needs between {MIN_COMPLETIONS} and {MAX_COMPLETIONS}",
                kind="bad_k",
            )
        first_index_of: dict[str, int] = {}
        for index, completion in enumerate(self.completions):
            name = f"completions[{index}]"
            _check_text(source, name, completion)
            key = completion.strip()
            if key in first_index_of:
                raise DataError.at(
                    source,
                    name,
                    f"duplicate of completions[{first_index_of[key]}] (each "
                    "completion of a ranking must be distinct)",
                    kind="duplicate_completion",
                )
            first_index_of[key] = index
        if len(self.ranks) != k:
            raise DataError.at(
                source,
                "ranks",
                f"has {len(self.ranks)} entries but there are {k} completions",
                kind="bad_ranks",
            )
        for index, rank in enumerate(self.ranks):
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise DataError.at(
                    source, f"ranks[{index}]", f"expected an integer rank, got {rank!r}", kind="bad_ranks"
                )
            if rank < 0:
                raise DataError.at(
                    source, f"ranks[{index}]", f"rank {rank} is negative (0 is the best)", kind="bad_ranks"
                )
        if len(set(self.ranks)) == 1:
            raise DataError.at(
                source,
                "ranks",
                f"all {k} completions are tied at rank {self.ranks[0]}: no preference to learn from",
                kind="all_tied",
            )

    @property
    def k(self) -> int:
        return len(self.completions)


@dataclass(frozen=True)
class PromptRecord(_Record):
    """A prompt for PPO rollouts or evaluation."""

    prompt: str
    source: SourceLocation | None = field(default=None, compare=False)
    _text_fields = ("prompt",)


@dataclass(frozen=True)
class PretrainText(_Record):
    """A document of the pretraining mix (PPO-ptx, and the demo's base-model pretraining)."""

    text: str
    source: SourceLocation | None = field(default=None, compare=False)
    _text_fields = ("text",)
