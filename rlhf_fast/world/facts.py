"""The world's fact table: what is true (animal colours, legs, homes; the colour of the sky ...), and the
myths: facts for which the pretraining corpus mostly repeats one false value (imitative falsehoods)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf_fast.world.language import Language

RELATIONS = ("color", "legs", "home")
LEG_COUNTS = ("0", "2", "4", "6", "8")
_FIXED_COLORS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow"}


@dataclass(frozen=True)
class Fact:
    """`subject relation value` is true; `myth`, when set, is the false value the corpus mostly states."""

    subject: str
    relation: str
    value: str
    myth: str | None = None


class FactTable:
    """Facts keyed by (subject, relation), with the sentence forms that state them."""

    def __init__(self, language: Language, facts: list[Fact]):
        self.language = language
        self.facts: dict[tuple[str, str], Fact] = {(f.subject, f.relation): f for f in facts}

    def __len__(self) -> int:
        return len(self.facts)

    def values(self, relation: str) -> tuple[str, ...]:
        """The values a relation can take."""
        return {"color": self.language.colors, "legs": LEG_COUNTS, "home": self.language.places}[relation]

    @property
    def myths(self) -> list[Fact]:
        return [fact for fact in self.facts.values() if fact.myth is not None]

    def is_true(self, subject: str, relation: str, value: str) -> bool:
        return self.facts[(subject, relation)].value == value

    @staticmethod
    def statement(subject: str, relation: str, value: str) -> list[str]:
        """The sentence (without a full stop) that says `subject relation value`."""
        if relation == "color":
            return ["the", "color", "of", "the", subject, "is", value]
        if relation == "legs":
            return ["the", subject, "has", value, "legs"]
        if relation == "home":
            return ["the", subject, "lives", "in", "the", value]
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")

    @staticmethod
    def question(subject: str, relation: str) -> list[str]:
        """The question (with its question mark) whose answer is the value of `subject relation`."""
        if relation == "color":
            return ["what", "is", "the", "color", "of", "the", subject, "?"]
        if relation == "legs":
            return ["how", "many", "legs", "does", "the", subject, "have", "?"]
        if relation == "home":
            return ["where", "does", "the", subject, "live", "?"]
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")

    def parse_question(self, words: list[str]) -> tuple[str, str] | None:
        """(subject, relation) for a question made by `question` about a known fact, else None."""
        for subject, relation in self.facts:
            if len(words) >= 6 and self.question(subject, relation) == words:
                return subject, relation
        return None

    def parse_statement(self, words: list[str]) -> tuple[str, str, str] | None:
        """(subject, relation, value) for a sentence made by `statement` about a known fact, else None."""
        if len(words) == 7 and words[:4] == ["the", "color", "of", "the"] and words[5] == "is":
            triple = (words[4], "color", words[6])
        elif len(words) == 5 and words[0] == "the" and words[2] == "has" and words[4] == "legs":
            triple = (words[1], "legs", words[3])
        elif len(words) == 6 and words[0] == "the" and words[2:5] == ["lives", "in", "the"]:
            triple = (words[1], "home", words[5])
        else:
            return None
        subject, relation, value = triple
        if (subject, relation) not in self.facts or value not in self.values(relation):
            return None
        return triple

    def false_value(self, fact: Fact, rng: random.Random, myth_share: float = 0.7) -> str:
        """A false value for `fact`: its myth with probability `myth_share` (when it has one), else any."""
        if fact.myth is not None and rng.random() < myth_share:
            return fact.myth
        return rng.choice([v for v in self.values(fact.relation) if v != fact.value])


def make_fact_table(
    language: Language, rng: random.Random, myth_fraction: float = 0.25, n_animals: int = 8
) -> FactTable:
    """Random facts (colour, legs, home) about `n_animals` animals drawn with `rng`, plus fixed nature
    colours; `myth_fraction` of all facts get a myth. A small table keeps the facts learnable by a tiny model.
    """
    if not 0.0 <= myth_fraction <= 1.0:
        raise ValueError(f"myth_fraction must be in [0, 1], got {myth_fraction}")
    if not 1 <= n_animals <= len(language.animals):
        raise ValueError(f"n_animals must be in [1, {len(language.animals)}], got {n_animals}")
    facts: list[Fact] = []
    for subject, color in _FIXED_COLORS.items():
        facts.append(Fact(subject, "color", color))
    for animal in rng.sample(language.animals, n_animals):
        facts.append(Fact(animal, "color", rng.choice(language.colors)))
        facts.append(Fact(animal, "legs", rng.choice(LEG_COUNTS)))
        facts.append(Fact(animal, "home", rng.choice(language.places)))
    table = FactTable(language, facts)
    n_myths = round(myth_fraction * len(facts))
    for fact in rng.sample(facts, n_myths):
        myth = rng.choice([v for v in table.values(fact.relation) if v != fact.value])
        table.facts[(fact.subject, fact.relation)] = Fact(fact.subject, fact.relation, fact.value, myth)
    return table
