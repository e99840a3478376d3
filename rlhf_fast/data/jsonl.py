"""Reading and writing the JSONL formats, one record per line.

Formats (one JSON object per line; blank lines are ignored):

- demonstrations: ``{"prompt": str, "response": str}``, or a chat record (below)
- rankings: ``{"prompt": str, "completions": [str, ...], "ranks": [int, ...]}`` with K = 2..9 completions,
  rank 0 = best, ties allowed; or a preference pair ``{"prompt": str, "chosen": str, "rejected": str}``,
  read as K = 2 with ranks (0, 1)
- prompts: ``{"prompt": str}``, or a chat record
- pretraining text: ``{"text": str}``

A chat record ``{"messages": [{"role": str, "content": str}, ...]}`` is rendered through the tokenizer's
chat template (``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``), so reading one
needs `tokenizer=`. For a demonstration the last message must be the assistant's: it is the response, and
the messages before it are rendered as the prompt. For a prompt all messages are rendered; a trailing
assistant message is dropped, so a demonstrations file also serves as a prompts file (likewise a plain
demonstration's "response" is just an unknown field to `read_prompts`).

Unknown extra fields are allowed and ignored, and counted in `LoadResult.extra_fields` so a typo such as
"respones" shows up in `--dry-run` statistics.

Bad input raises `DataError` naming file, line and field: besides a record that breaks its format's rules,
a line longer than `max_record_bytes` (checked before it is parsed), a key named twice in one object, and
text that is not valid Unicode (a lone surrogate escape such as ``"\\ud800"``). With ``on_bad_record="skip"`` a bad record is
skipped instead and counted in `LoadResult.skipped` by reason (`DataError.kind`); a file with no records at
all, or none that survive, is an error either way.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from rlhf_fast.data.errors import WHOLE_RECORD, DataError, SourceLocation
from rlhf_fast.data.records import (
    Demonstration,
    PretrainText,
    PromptRecord,
    Ranking,
    _json_type,
    check_unicode,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DataError",
    "LoadResult",
    "read_demonstrations",
    "read_pretrain_text",
    "read_prompts",
    "read_rankings",
    "write_jsonl",
]

RecordT = TypeVar("RecordT")
ON_BAD_RECORD_CHOICES = ("error", "skip")
# The longest line read as a record. Checked before decoding, parsing or tokenizing, so a runaway line (a
# whole corpus without newlines) costs neither the memory nor the tokenizer time it would otherwise.
MAX_RECORD_BYTES = 16 * 2**20


@dataclass
class LoadResult(Generic[RecordT]):
    """The records read from one file, with what was skipped and which unknown fields were ignored.

    Behaves as a sequence of its records (``len``, iteration, indexing).
    """

    records: list[RecordT]
    skipped: collections.Counter[str]
    path: str
    extra_fields: collections.Counter[str] = field(default_factory=collections.Counter)
    # The first skipped record's error for each reason, so a summary can show where to look.
    first_skipped: dict[str, DataError] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[RecordT]:
        return iter(self.records)

    def __getitem__(self, index):
        return self.records[index]

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


# --------------------------------------------------------------------------------------------- reading


class _BadKey(ValueError):
    """A key of a JSON object that appears twice, or is not valid Unicode."""

    def __init__(self, key: str, reason: str, kind: str):
        super().__init__(reason)
        self.key, self.reason, self.kind = key, reason, kind


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for `json.loads`: a JSON object without duplicate keys (JSON lets the last one
    silently win; a record naming a field twice is more likely a mistake than meant)."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadKey(
                ascii(key)[1:-1], "a key that is not valid Unicode (a lone surrogate)", "invalid_text"
            ) from None
        if key in value:
            raise _BadKey(key, "appears twice in one object (duplicate JSON key)", "duplicate_key")
        value[key] = item
    return value


def _lines(file, max_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, bytes) for each line of a binary file, or (line number, its length) for a line longer
    than `max_bytes`, which is skipped without being held in memory."""
    line_number = 0
    while True:
        raw = file.readline(max_bytes + 1)
        if not raw:
            return
        line_number += 1
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield line_number, raw
            continue
        length = len(raw)
        while not raw.endswith(b"\n"):
            raw = file.readline(1 << 20)
            if not raw:
                break
            length += len(raw)
        yield line_number, length - raw.endswith(b"\n")


def _iter_json_objects(
    path: str, max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[tuple[SourceLocation, dict[str, Any] | DataError]]:
    """Yields (location, object) for each non-blank line, or (location, DataError) for a line that is longer
    than `max_record_bytes`, not valid UTF-8, not JSON, not a JSON object, or names a key twice. Raises
    DataError for a file with no non-blank line."""
    saw_record = False
    with open(path, "rb") as file:
        for line_number, raw in _lines(file, max_record_bytes):
            source = SourceLocation(path, line_number)
            record = _json_object(source, raw, max_record_bytes)
            if record is not None:
                saw_record = True
                yield source, record
    if not saw_record:
        raise DataError(path, 0, WHOLE_RECORD, "the file is empty (no JSON records)", kind="empty_file")


def _json_object(
    source: SourceLocation, raw: bytes | int, max_record_bytes: int
) -> dict[str, Any] | DataError | None:
    """The JSON object on one line (`raw`: its bytes, or its length when over the limit), the DataError that
    says why it is not one, or None for a blank line."""

    def bad(message: str, kind: str) -> DataError:
        return DataError.at(source, WHOLE_RECORD, message, kind=kind)

    if isinstance(raw, int):
        return bad(
            f"the record is {raw} bytes, more than the limit of {max_record_bytes} (data.max_record_bytes)",
            "record_too_large",
        )
    if source.line == 1 and raw.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 byte-order mark
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return bad(
            f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})", "invalid_utf8"
        )
    if not text.strip():
        return None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except _BadKey as error:
        return DataError.at(source, error.key, error.reason, kind=error.kind)
    except json.JSONDecodeError as error:
        return bad(f"malformed JSON: {error.msg} at column {error.colno}", "malformed_json")
    except RecursionError:
        return bad("JSON nested too deeply", "malformed_json")
    if not isinstance(value, dict):
        return bad(f"expected a JSON object, got {_json_type(value)}", "not_an_object")
    return value


def _read(
    path: str | os.PathLike,
    parse: Callable[[dict[str, Any], SourceLocation], RecordT],
    known_fields: frozenset[str],
    on_bad_record: str,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> LoadResult[RecordT]:
    if on_bad_record not in ON_BAD_RECORD_CHOICES:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD_CHOICES}, got {on_bad_record!r}")
    path = os.fspath(path)
    result: LoadResult[RecordT] = LoadResult([], collections.Counter(), path)
    if max_record_bytes < 1:
        raise ValueError(f"max_record_bytes must be >= 1, got {max_record_bytes}")
    for source, value in _iter_json_objects(path, max_record_bytes):
        try:
            if isinstance(value, DataError):
                raise value
            record = parse(value, source)
        except DataError as error:
            if on_bad_record == "error":
                raise
            result.skipped[error.kind] += 1
            result.first_skipped.setdefault(error.kind, error)
            continue
        result.extra_fields.update(name for name in value if name not in known_fields)
        result.records.append(record)
    if not result.records:
        summary = ", ".join(f"{count} {kind}" for kind, count in result.skipped.most_common())
        raise DataError(path, 0, WHOLE_RECORD, f"no valid records (skipped: {summary})", kind="no_records")
    return result


def _require(value: dict[str, Any], name: str, source: SourceLocation, expected: type, what: str) -> Any:
    if name not in value:
        raise DataError.at(source, name, f"missing (expected {what})", kind="missing_field")
    item = value[name]
    if not isinstance(item, expected) or isinstance(item, bool):
        raise DataError.at(source, name, f"expected {what}, got {_json_type(item)}", kind="wrong_type")
    return item


def _refuse_both(value: dict[str, Any], first: str, second: str, source: SourceLocation) -> None:
    if first in value and second in value:
        raise DataError.at(
            source,
            second,
            f"a record has either '{first}' or '{second}', not both",
            kind="conflicting_fields",
        )


def _check_messages(value: dict[str, Any], source: SourceLocation) -> list[dict[str, Any]]:
    messages = _require(value, "messages", source, list, "an array of {role, content} objects")
    if not messages:
        raise DataError.at(
            source, "messages", "empty array (expected at least one message)", kind="bad_messages"
        )
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataError.at(
                source,
                name,
                f"expected an object with 'role' and 'content', got {_json_type(message)}",
                kind="wrong_type",
            )
        for key in ("role", "content"):
            if key not in message:
                raise DataError.at(source, f"{name}.{key}", "missing", kind="missing_field")
            if not isinstance(message[key], str):
                raise DataError.at(
                    source,
                    f"{name}.{key}",
                    f"expected a string, got {_json_type(message[key])}",
                    kind="wrong_type",
                )
            check_unicode(source, f"{name}.{key}", message[key])
    return messages


def _render_chat(messages: list[dict[str, Any]], tokenizer, source: SourceLocation) -> str:
    """The prompt text for `messages`, ending with the template's assistant-turn header."""
    if tokenizer is None:
        raise DataError.at(
            source,
            "messages",
            "a chat record needs a tokenizer with a chat template to render it (pass tokenizer=...)",
            kind="no_chat_template",
        )
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError.at(
            source,
            "messages",
            f"the tokenizer {name!r} has no chat template; set "
            "tokenizer.chat_template or use plain 'prompt' records",
            kind="no_chat_template",
        )
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template may raise anything (e.g. "roles must alternate")
        raise DataError.at(
            source, "messages", f"the chat template failed: {error}", kind="chat_template_failed"
        ) from error
    if not isinstance(rendered, str):
        raise DataError.at(
            source,
            "messages",
            f"the chat template returned {type(rendered).__name__}, not a string",
            kind="chat_template_failed",
        )
    return rendered


DEMONSTRATION_FIELDS = frozenset({"prompt", "response", "messages"})
RANKING_FIELDS = frozenset({"prompt", "completions", "ranks", "chosen", "rejected"})
PROMPT_FIELDS = frozenset({"prompt", "messages"})
PRETRAIN_FIELDS = frozenset({"text"})
PAIR_FIELD_NAMES = {"completions[0]": "chosen", "completions[1]": "rejected"}


def _parse_demonstration(value: dict[str, Any], source: SourceLocation, tokenizer) -> Demonstration:
    _refuse_both(value, "prompt", "messages", source)
    if "messages" in value:
        messages = _check_messages(value, source)
        last = len(messages) - 1
        if messages[last]["role"] != "assistant":
            raise DataError.at(
                source,
                f"messages[{last}].role",
                f"the last message of a demonstration must "
                f"be the assistant's response, got role {messages[last]['role']!r}",
                kind="bad_messages",
            )
        if last == 0:
            raise DataError.at(
                source,
                "messages",
                "a demonstration needs at least one message before the assistant's response",
                kind="bad_messages",
            )
        response = messages[last]["content"]
        if not response.strip():
            raise DataError.at(
                source, f"messages[{last}].content", "empty after stripping whitespace", kind="empty_text"
            )
        prompt = _render_chat(messages[:last], tokenizer, source)
        return Demonstration(prompt, response, source)
    prompt = _require(value, "prompt", source, str, "a string")
    response = _require(value, "response", source, str, "a string")
    return Demonstration(prompt, response, source)


def _parse_ranking(value: dict[str, Any], source: SourceLocation, tokenizer=None) -> Ranking:
    prompt = _require(value, "prompt", source, str, "a string")
    if "chosen" in value or "rejected" in value:
        for ranked_field in ("completions", "ranks"):
            if ranked_field in value:
                raise DataError.at(
                    source,
                    ranked_field,
                    "a record is either a pair ('chosen', 'rejected') or "
                    "a ranking ('completions', 'ranks'), not both",
                    kind="conflicting_fields",
                )
        chosen = _require(value, "chosen", source, str, "a string")
        rejected = _require(value, "rejected", source, str, "a string")
        try:
            return Ranking(prompt, (chosen, rejected), (0, 1), source)
        except DataError as error:  # name the pair's own fields, not the ranking they became
            field_name = PAIR_FIELD_NAMES.get(error.field, error.field)
            reason = error.reason.replace("completions[0]", "chosen")
            raise DataError.at(source, field_name, reason, kind=error.kind) from None
    completions = _require(value, "completions", source, list, "an array of strings")
    ranks = _require(value, "ranks", source, list, "an array of integers")
    return Ranking(prompt, tuple(completions), tuple(ranks), source)


def _parse_prompt(value: dict[str, Any], source: SourceLocation, tokenizer) -> PromptRecord:
    _refuse_both(value, "prompt", "messages", source)
    if "messages" in value:
        messages = _check_messages(value, source)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError.at(
                source,
                "messages",
                "a prompt needs at least one message that is not the assistant's",
                kind="bad_messages",
            )
        return PromptRecord(_render_chat(messages, tokenizer, source), source)
    return PromptRecord(_require(value, "prompt", source, str, "a string"), source)


def _parse_pretrain(value: dict[str, Any], source: SourceLocation, tokenizer=None) -> PretrainText:
    return PretrainText(_require(value, "text", source, str, "a string"), source)


def _reader(parse: Callable[..., RecordT], fields: frozenset[str], name: str, doc: str):
    """One public reader per format: the same keyword arguments, its own parser and field set."""

    def read(
        path: str | os.PathLike,
        *,
        on_bad_record: str = "error",
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> LoadResult[RecordT]:
        return _read(
            path,
            lambda value, source: parse(value, source, tokenizer),
            fields,
            on_bad_record,
            max_record_bytes,
        )

    read.__name__ = read.__qualname__ = name
    read.__doc__ = doc
    return read


read_demonstrations = _reader(
    _parse_demonstration,
    DEMONSTRATION_FIELDS,
    "read_demonstrations",
    "Reads SFT demonstrations. `tokenizer` is needed only for chat records (its chat template).",
)
read_rankings = _reader(
    _parse_ranking,
    RANKING_FIELDS,
    "read_rankings",
    "Reads K-wise rankings and preference pairs. `tokenizer` is accepted for symmetry and unused.",
)
read_prompts = _reader(
    _parse_prompt,
    PROMPT_FIELDS,
    "read_prompts",
    "Reads prompts. `tokenizer` is needed only for chat records (its chat template).",
)
read_pretrain_text = _reader(
    _parse_pretrain,
    PRETRAIN_FIELDS,
    "read_pretrain_text",
    "Reads pretraining documents. `tokenizer` is accepted for symmetry and unused.",
)


# --------------------------------------------------------------------------------------------- writing


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any] | Any]) -> int:
    """Writes one JSON object per line, atomically: a reader sees the old file or the whole new one.

    `records` holds dicts, or record objects with a `to_dict()` (their source location is not written).
    Parent folders are created. Returns the number of records written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    # The temporary file sits beside the target so the final rename stays on one filesystem (atomic).
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as file:
            for record in records:
                if not isinstance(record, Mapping):
                    to_dict = getattr(record, "to_dict", None)
                    if to_dict is None:
                        raise ValueError(
                            f"records[{count}] must be a dict or a record with to_dict(), got "
                            f"{type(record).__name__}"
                        )
                    record = to_dict()
                file.write(json.dumps(record, ensure_ascii=False))
                file.write("\n")
                count += 1
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file private (0600); give it the mode an ordinary new file would have.
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return count
