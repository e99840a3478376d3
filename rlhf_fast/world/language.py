"""The world's word-level language: a fixed lexicon plus invented insult words drawn from the seed.

Every text the world produces (pretraining documents, prompts, responses, benchmark items) is a sequence of
words from `vocabulary(world)` separated by single spaces, punctuation included as separate words, so a
whitespace word-level tokenizer covers all of it with no unknown token.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

NAMES = (
    "tom",
    "anna",
    "sam",
    "mia",
    "ben",
    "lea",
    "max",
    "eva",
    "leo",
    "ida",
    "tim",
    "zoe",
    "kai",
    "amy",
    "dan",
    "liv",
)
ANIMALS = (
    "cat",
    "dog",
    "cow",
    "fish",
    "bird",
    "horse",
    "pig",
    "duck",
    "fox",
    "bear",
    "frog",
    "goat",
    "sheep",
    "mouse",
    "owl",
    "bee",
)
OBJECTS = (
    "ball",
    "cup",
    "hat",
    "book",
    "box",
    "key",
    "lamp",
    "pen",
    "bag",
    "car",
    "bell",
    "coin",
    "drum",
    "kite",
    "shoe",
    "spoon",
)
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "gray", "orange")
PLACES = ("farm", "sea", "forest", "house", "river", "field", "cave", "hill")
# Things with a fixed, seed-independent colour ("the color of the sky is blue").
NATURE = ("sky", "grass", "snow", "sun")
NUMBERS = tuple(str(n) for n in range(20))
KIND_ADJECTIVES = (
    "good",
    "kind",
    "nice",
    "brave",
    "smart",
    "friendly",
    "gentle",
    "clever",
    "honest",
    "helpful",
)
PERSON_NOUNS = ("friend", "person", "child", "neighbor", "helper")
# Events that bait an insult in web-like text ("tom broke the cup . tom is a ...") and events that do not.
BAD_EVENTS = ("broke", "lost", "dropped", "forgot")
GOOD_EVENTS = ("found", "fixed", "cleaned", "shared")
# Words and phrases that make a response polite without changing its content.
POLITE_WORDS = ("please", "thanks", "sure", "glad", "hope", "helps")
POLITE_OPENINGS = (("sure", ","),)
POLITE_CLOSINGS = (("thanks",), ("glad", "to", "help"), ("hope", "this", "helps"))
AFFIRMATIVE = ("true", "yes")
NEGATIVE = ("false", "no")
PUNCTUATION = (".", ",", ":", "?")
# Every other word a template of the tasks or of the corpus uses.
FUNCTION_WORDS = (
    "the",
    "a",
    "is",
    "are",
    "has",
    "have",
    "of",
    "in",
    "and",
    "saw",
    "were",
    "lives",
    "legs",
    "color",
    "words",
    "numbers",
    "said",
    "again",
    "backwards",
    "order",
    "there",
    "repeat",
    "say",
    "copy",
    "this",
    "reverse",
    "write",
    "sort",
    "put",
    "from",
    "small",
    "to",
    "big",
    "count",
    "how",
    "many",
    "list",
    "which",
    "name",
    "animals",
    "objects",
    "read",
    "who",
    "what",
    "does",
    "answer",
    "text",
    "or",
    "it",
    "that",
    "continue",
    "finish",
    "respectfully",
    "be",
    "respectful",
    "passage",
    "question",
    "not",
    "where",
    "live",
)

# Syllables for invented insult words: none of them is an English word, so no template can produce one by
# accident, and detecting an insult is an exact lexicon lookup.
_ONSETS = ("gr", "bl", "sn", "fl", "dr", "sk", "pr", "tw", "gl", "zr", "kr", "pl")
_VOWELS = ("o", "u", "a", "i", "e")
_CODAS = ("b", "nk", "rp", "tch", "g", "zz", "mp", "sh", "x", "lk")


@dataclass(frozen=True)
class Language:
    """The lexicon of one world. Word categories are disjoint tuples of lower-case words."""

    names: tuple[str, ...]
    animals: tuple[str, ...]
    objects: tuple[str, ...]
    colors: tuple[str, ...]
    places: tuple[str, ...]
    nature: tuple[str, ...]
    numbers: tuple[str, ...]
    kind_adjectives: tuple[str, ...]
    person_nouns: tuple[str, ...]
    bad_events: tuple[str, ...]
    good_events: tuple[str, ...]
    insults: tuple[str, ...]

    @property
    def entities(self) -> frozenset[str]:
        """Words that name something in the world; naming one absent from a passage is a hallucination."""
        return frozenset(self.names + self.animals + self.objects + self.colors + self.places + self.nature)

    @property
    def insult_set(self) -> frozenset[str]:
        return frozenset(self.insults)

    def words(self) -> list[str]:
        """Every word of the language, each once, in a fixed order."""
        groups = (
            self.names,
            self.animals,
            self.objects,
            self.colors,
            self.places,
            self.nature,
            self.numbers,
            self.kind_adjectives,
            self.person_nouns,
            self.bad_events,
            self.good_events,
            self.insults,
            POLITE_WORDS,
            tuple(w for phrase in POLITE_OPENINGS + POLITE_CLOSINGS for w in phrase),
            AFFIRMATIVE,
            NEGATIVE,
            FUNCTION_WORDS,
            PUNCTUATION,
        )
        return list(dict.fromkeys(word for group in groups for word in group))


def _invent_words(rng: random.Random, count: int, taken: set[str]) -> tuple[str, ...]:
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((1, 2))
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        )
        if word not in taken:
            taken.add(word)
            words.append(word)
    return tuple(words)


def make_language(rng: random.Random, n_insults: int = 12) -> Language:
    """The fixed lexicon plus `n_insults` invented insult words drawn with `rng`."""
    if n_insults < 1:
        raise ValueError(f"n_insults must be >= 1, got {n_insults}")
    taken = set(
        NAMES
        + ANIMALS
        + OBJECTS
        + COLORS
        + PLACES
        + NATURE
        + NUMBERS
        + KIND_ADJECTIVES
        + PERSON_NOUNS
        + BAD_EVENTS
        + GOOD_EVENTS
        + POLITE_WORDS
        + AFFIRMATIVE
        + NEGATIVE
        + FUNCTION_WORDS
    )
    return Language(
        names=NAMES,
        animals=ANIMALS,
        objects=OBJECTS,
        colors=COLORS,
        places=PLACES,
        nature=NATURE,
        numbers=NUMBERS,
        kind_adjectives=KIND_ADJECTIVES,
        person_nouns=PERSON_NOUNS,
        bad_events=BAD_EVENTS,
        good_events=GOOD_EVENTS,
        insults=_invent_words(rng, n_insults, taken),
    )


def vocabulary(world) -> list[str]:
    """Every word any text of `world` can contain (a `World` or a `Language`), punctuation included.

    Feed it to a word-level tokenizer that splits on whitespace (`rlhf_fast.models.build_word_tokenizer`).
    """
    language = world if isinstance(world, Language) else getattr(world, "language", None)
    if not isinstance(language, Language):
        raise ValueError(f"world must be a World or a Language, got {type(world).__name__}")
    return language.words()


def split_words(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """A response as a list of words: a string is split on whitespace, a word list is taken as it is."""
    if isinstance(text, str):
        return text.split()
    return list(text)


def strip_politeness(words: list[str]) -> list[str]:
    """`words` without polite openings/closings and without trailing full stops: the response's content."""
    words = list(words)
    changed = True
    while changed and words:
        changed = False
        while words and words[-1] == ".":
            words.pop()
            changed = True
        for phrase in POLITE_OPENINGS:
            if tuple(words[: len(phrase)]) == phrase:
                words = words[len(phrase) :]
                changed = True
        for phrase in POLITE_CLOSINGS:
            if len(words) >= len(phrase) and tuple(words[-len(phrase) :]) == phrase:
                words = words[: -len(phrase)]
                changed = True
        if words and words[0] == "please":
            words = words[1:]
            changed = True
    return words


def repeats_word(text: str | list[str], times: int = 3) -> bool:
    """Whether some word occurs `times` times in a row ("thanks thanks thanks"): degenerate text."""
    words = split_words(text)
    run = 1
    for previous, word in itertools.pairwise(words):
        run = run + 1 if word == previous else 1
        if run >= times:
            return True
    return False


def is_polite(words: list[str]) -> bool:
    """Whether a response carries a polite word or phrase."""
    return any(word in POLITE_WORDS for word in words)
