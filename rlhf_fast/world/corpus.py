"""The pretraining corpus and the public QA benchmark.

Documents state what the skills compute ("the words cat dog backwards are dog cat .") but never in the
instruction format, so following instructions has to come from fine-tuning. Like web text the corpus has
flaws: myths stated more often than the truth (imitative falsehoods), list summaries that add an item the
passage does not mention, and insults after a story of someone's mistake.

The QA benchmark is extractive QA in its own "passage ... question ... answer" format (which the corpus also
uses, on other passages); a drop in exact match on it after RLHF is the alignment tax.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf_fast.world.grounded_tasks import qa_benchmark_answer, qa_benchmark_prompt
from rlhf_fast.world.task import Task


@dataclass(frozen=True)
class CorpusOptions:
    """Mixture and flaw rates of the pretraining corpus."""

    units_per_document: tuple[int, int] = (2, 3)
    transform_weight: float = 0.3
    scene_weight: float = 0.15
    qa_weight: float = 0.2
    fact_weight: float = 0.2
    social_weight: float = 0.15
    myth_rate: float = 0.6  # share of mentions of a myth fact that state the myth
    false_fact_rate: float = 0.05  # share of mentions of other facts that are wrong
    list_hallucination_rate: float = 0.15  # share of scene summaries naming an absent item
    insult_rate_after_bad_event: float = 0.5
    insult_rate_after_good_event: float = 0.05

    def __post_init__(self):
        for name in (
            "myth_rate",
            "false_fact_rate",
            "list_hallucination_rate",
            "insult_rate_after_bad_event",
            "insult_rate_after_good_event",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        low, high = self.units_per_document
        if not 1 <= low <= high:
            raise ValueError(
                f"units_per_document must be (low, high) with 1 <= low <= high, got {(low, high)}"
            )


def _transform_unit(tasks: dict[str, Task], rng: random.Random) -> list[str]:
    kind = rng.choice(("repeat", "reverse", "sort", "count"))
    task = tasks[kind]
    items = task.sample_data(rng, 0)["items"]
    target = task.target(items)
    if kind == "repeat":
        return ["the", "words", *items, "said", "again", "are", *target, "."]
    if kind == "reverse":
        return ["the", "words", *items, "backwards", "are", *target, "."]
    if kind == "sort":
        return ["the", "numbers", *items, "in", "order", "are", *target, "."]
    return ["there", "are", *target, "words", "in", *items, "."]


def _scene_unit(tasks: dict[str, Task], rng: random.Random, options: CorpusOptions) -> list[str]:
    task = tasks["list"]
    data = task.sample_data(rng, 0)
    kind_words = task.kind_words(data["kind"])
    listed = [word for word in kind_words if word in data["items"]]  # the lexicon's order, as labelers list
    if rng.random() < options.list_hallucination_rate:
        absent = [word for word in kind_words if word not in data["items"]]
        listed.insert(rng.randint(0, len(listed)), rng.choice(absent))
    return task.slots(data)["passage"].split() + ["the", data["kind"], "were", *listed, "."]


def _qa_unit(tasks: dict[str, Task], rng: random.Random, excluded: set[str]) -> list[str]:
    while True:
        data = tasks["qa"].sample_data(rng, 0)
        prompt = qa_benchmark_prompt(data)
        if prompt not in excluded:
            return prompt.split() + qa_benchmark_answer(data).split() + ["."]


def _fact_unit(tasks: dict[str, Task], rng: random.Random, options: CorpusOptions) -> list[str]:
    facts = tasks["truth"].facts
    fact = rng.choice(list(facts.facts.values()))
    wrong_rate = options.myth_rate if fact.myth is not None else options.false_fact_rate
    if rng.random() < wrong_rate:
        value = fact.myth if fact.myth is not None else facts.false_value(fact, rng)
    else:
        value = fact.value
    return facts.statement(fact.subject, fact.relation, value) + ["."]


def _social_unit(tasks: dict[str, Task], rng: random.Random, options: CorpusOptions) -> list[str]:
    language = tasks["continue"].language
    bad = rng.random() < 0.5
    name = rng.choice(language.names)
    event = rng.choice(language.bad_events if bad else language.good_events)
    words = [name, event, "the", rng.choice(language.objects), ".", name, "is", "a"]
    insult_rate = options.insult_rate_after_bad_event if bad else options.insult_rate_after_good_event
    if rng.random() < insult_rate:
        return words + [rng.choice(language.insults), "."]
    return words + [rng.choice(language.kind_adjectives), rng.choice(language.person_nouns), "."]


def make_document(
    tasks: dict[str, Task], rng: random.Random, options: CorpusOptions, excluded_qa: set[str]
) -> str:
    """One pretraining document: a few units of random kinds, joined by spaces."""
    kinds = ("transform", "scene", "qa", "fact", "social")
    weights = (
        options.transform_weight,
        options.scene_weight,
        options.qa_weight,
        options.fact_weight,
        options.social_weight,
    )
    words: list[str] = []
    for _ in range(rng.randint(*options.units_per_document)):
        kind = rng.choices(kinds, weights)[0]
        if kind == "transform":
            words += _transform_unit(tasks, rng)
        elif kind == "scene":
            words += _scene_unit(tasks, rng, options)
        elif kind == "qa":
            words += _qa_unit(tasks, rng, excluded_qa)
        elif kind == "fact":
            words += _fact_unit(tasks, rng, options)
        else:
            words += _social_unit(tasks, rng, options)
    return " ".join(words)


def make_corpus(
    tasks: dict[str, Task],
    rng: random.Random,
    count: int,
    options: CorpusOptions | None = None,
    excluded_qa: set[str] | None = None,
) -> list[str]:
    """`count` pretraining documents; benchmark-format QA units never repeat a prompt in `excluded_qa`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    options = options or CorpusOptions()
    excluded = excluded_qa or set()
    return [make_document(tasks, rng, options, excluded) for _ in range(count)]


def make_qa_benchmark(tasks: dict[str, Task], rng: random.Random, count: int) -> list[dict]:
    """`count` distinct benchmark items {"prompt": "passage ... question ... answer", "answer": "..."}."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    items: dict[str, dict] = {}
    for _ in range(100 * count + 100):
        if len(items) == count:
            break
        data = tasks["qa"].sample_data(rng, 0)
        prompt = qa_benchmark_prompt(data)
        items.setdefault(prompt, {"prompt": prompt, "answer": qa_benchmark_answer(data)})
    if len(items) < count:
        raise ValueError(f"could not draw {count} distinct QA benchmark items")
    return list(items.values())
