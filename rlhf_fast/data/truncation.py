"""The truncation policy: what happens to a record longer than the length limit (see `rlhf_fast.data.encode`).

Kept apart from the tokenization code (and torch) so the command line can name it in its config.
"""

from __future__ import annotations

import enum

__all__ = ["TruncationPolicy"]


class TruncationPolicy(str, enum.Enum):
    """``"error"``: fail naming the record; ``"skip"``: drop it (counted); ``"truncate_prompt"``: drop prompt
    tokens from the left (counted). Compares equal to, and prints as, its value."""

    ERROR = "error"
    SKIP = "skip"
    TRUNCATE_PROMPT = "truncate_prompt"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, policy: str | TruncationPolicy, name: str = "policy") -> TruncationPolicy:
        try:
            return cls(policy)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in cls)
            raise ValueError(f"{name} must be one of {choices}, got {policy!r}") from None
