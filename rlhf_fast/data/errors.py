"""Where a record came from, and the one error type for bad input data.

Every problem with a user's data is reported as a `DataError` whose message names the file, the line and
the field, so a user can open the file at that line and fix it:

    data/demos.jsonl:7: field 'response': empty after stripping whitespace
"""

from __future__ import annotations

from dataclasses import dataclass

# Field name used when the problem is not tied to one field (a malformed line, an empty file).
WHOLE_RECORD = "-"


@dataclass(frozen=True)
class SourceLocation:
    """A 1-based line in a JSONL file (line 0 means the file as a whole)."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


IN_MEMORY = "<memory>"


class DataError(ValueError):
    """Bad input data. `kind` is a short stable key (e.g. "empty_text") used to count skipped records."""

    def __init__(self, path: str, line: int, field: str, reason: str, *, kind: str = "invalid") -> None:
        self.path = str(path)
        self.line = int(line)
        self.field = field
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}:{self.line}: field '{field}': {reason}")

    @classmethod
    def at(
        cls, source: SourceLocation | None, field: str, reason: str, *, kind: str = "invalid"
    ) -> DataError:
        source = source or SourceLocation(IN_MEMORY, 0)
        return cls(source.path, source.line, field, reason, kind=kind)

    def __reduce__(self):  # keeps the error picklable (DataLoader workers send exceptions across processes)
        return (_rebuild_data_error, (self.path, self.line, self.field, self.reason, self.kind))


def _rebuild_data_error(path: str, line: int, field: str, reason: str, kind: str) -> DataError:
    return DataError(path, line, field, reason, kind=kind)
