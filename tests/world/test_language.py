import random

import pytest

from rlhf_fast.world.language import (
    FUNCTION_WORDS,
    Language,
    is_polite,
    make_language,
    split_words,
    strip_politeness,
    vocabulary,
)


def test_language_is_deterministic_and_insults_depend_on_the_seed():
    assert make_language(random.Random(1)) == make_language(random.Random(1))
    assert make_language(random.Random(1)).insults != make_language(random.Random(2)).insults


def test_categories_are_disjoint_and_words_unique():
    language = make_language(random.Random(3), n_insults=20)
    categories = [language.names, language.animals, language.objects, language.colors, language.places,
                  language.nature, language.numbers, language.kind_adjectives, language.person_nouns,
                  language.insults]
    flat = [word for category in categories for word in category]
    assert len(flat) == len(set(flat))
    assert not set(language.insults) & set(FUNCTION_WORDS)
    words = language.words()
    assert len(words) == len(set(words))
    assert all(word and not any(ch.isspace() for ch in word) for word in words)
    assert 150 <= len(words) <= 600


def test_vocabulary_accepts_world_or_language_and_rejects_others(small_world):
    assert vocabulary(small_world) == vocabulary(small_world.language)
    assert isinstance(small_world.language, Language)
    with pytest.raises(ValueError, match="world"):
        vocabulary("not a world")


def test_strip_politeness_keeps_content():
    assert strip_politeness(split_words("sure , cat dog thanks")) == ["cat", "dog"]
    assert strip_politeness(split_words("please cat dog glad to help .")) == ["cat", "dog"]
    assert strip_politeness(split_words("cat dog hope this helps")) == ["cat", "dog"]
    assert strip_politeness(["cat", "thanks", "dog"]) == ["cat", "thanks", "dog"]  # only at the edges
    assert strip_politeness([]) == []
    assert is_polite(["cat", "thanks"]) and not is_polite(["cat", "dog"])
