"""Simulated labelers. Each judges a response by its utility:

    utility = task score + politeness_weight · [polite] + length_weight · min(content words, 8)
              − insult_penalty · min(insults, 3) − hallucination_penalty · hallucinated items

and ranks K responses by Plackett-Luce over utilities: the best is drawn with probability
∝ exp(utility / noise), then the next among the rest, and so on (equivalently: sort utility / noise plus
standard Gumbel noise). Identical responses share a rank; all other ranks are strict. Labelers write
demonstrations as the task's ideal response, sometimes with their own polite flavor.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from rlhf_fast.world.language import (
    POLITE_CLOSINGS,
    POLITE_OPENINGS,
    is_polite,
    split_words,
    strip_politeness,
)
from rlhf_fast.world.tasks import Task, TaskInstance


@dataclass(frozen=True)
class Labeler:
    id: str
    length_weight: float
    politeness_weight: float
    insult_penalty: float
    hallucination_penalty: float
    noise: float  # Plackett-Luce temperature: larger = less consistent judgments
    flavor_rate: float  # chance a demonstration gets the labeler's polite flavor
    flavor: tuple[str, ...]
    flavor_at_start: bool
    held_out: bool
    tasks: dict[str, Task] = field(repr=False, compare=False, hash=False, default_factory=dict)


def make_labelers(rng: random.Random, tasks: dict[str, Task], count: int, n_heldout: int) -> list[Labeler]:
    """`count` labelers with random preferences; the last `n_heldout` are held out of all training data."""
    if not 1 <= n_heldout < count:
        raise ValueError(f"n_heldout must be in [1, count={count}), got {n_heldout}")
    flavors = [(phrase, True) for phrase in POLITE_OPENINGS] + [(phrase, False) for phrase in POLITE_CLOSINGS]
    labelers = []
    for index in range(count):
        flavor, at_start = rng.choice(flavors)
        labelers.append(Labeler(
            id=f"L{index:02d}",
            length_weight=rng.uniform(-0.03, 0.03),
            politeness_weight=rng.uniform(0.0, 0.2),
            insult_penalty=rng.uniform(1.0, 2.0),
            hallucination_penalty=rng.uniform(0.3, 0.6),
            # Judgment noise: consistent enough that a reward model small enough to train on a CPU can learn
            # their preferences (inter-labeler agreement about 0.8 on pairs of SFT samples).
            noise=rng.uniform(0.03, 0.1),
            flavor_rate=rng.uniform(0.0, 0.3),
            flavor=flavor,
            flavor_at_start=at_start,
            held_out=index >= count - n_heldout,
            tasks=tasks,
        ))
    return labelers


def _task(labeler: Labeler, instance: TaskInstance) -> Task:
    try:
        return labeler.tasks[instance.task]
    except KeyError:
        raise ValueError(f"labeler {labeler.id} knows no task {instance.task!r}") from None


def utility(labeler: Labeler, instance: TaskInstance, response: str | list[str]) -> float:
    """How much `labeler` likes `response` to `instance` (before judgment noise)."""
    words = split_words(response)
    result = _task(labeler, instance).score(instance, words)
    content_length = min(len(strip_politeness(words)), 8)
    return (result.score + labeler.politeness_weight * is_polite(words)
            + labeler.length_weight * content_length
            - labeler.insult_penalty * min(result.insults, 3)
            - labeler.hallucination_penalty * result.hallucinated)


def _default_rng(labeler: Labeler, instance: TaskInstance, distinct: list[tuple[str, ...]]) -> random.Random:
    # Seeded by the judgment's content, so a repeated judgment is the same whatever order it comes in.
    key = "\x1f".join([labeler.id, instance.prompt] + [" ".join(words) for words in distinct])
    return random.Random(key)


def rank(labeler: Labeler, instance: TaskInstance, responses: Sequence[str | list[str]],
         rng: random.Random | None = None) -> list[int]:
    """Ranks (0 = best) of `responses` by one Plackett-Luce draw over the labeler's utilities.

    Identical responses (same words) get the same rank; ranks are dense (0 .. distinct responses - 1).
    `rng` None draws from a generator seeded by (labeler, prompt, responses): reproducible, order-free.
    """
    if len(responses) < 1:
        raise ValueError("responses must not be empty")
    keys = [tuple(split_words(r)) for r in responses]
    distinct = sorted(set(keys))
    rng = rng if rng is not None else _default_rng(labeler, instance, distinct)
    perturbed = {}
    for words in distinct:
        gumbel = -math.log(-math.log(rng.random() or 1e-300) or 1e-300)
        perturbed[words] = utility(labeler, instance, list(words)) / labeler.noise + gumbel
    order = sorted(distinct, key=lambda words: -perturbed[words])
    position = {words: index for index, words in enumerate(order)}
    return [position[words] for words in keys]


def prefer(labeler: Labeler, instance: TaskInstance, a: str | list[str], b: str | list[str],
           rng: random.Random | None = None) -> float:
    """1.0 if `labeler` prefers response `a` to `b`, 0.0 if `b`; 0.5 when the two are identical (a tie)."""
    ranks = rank(labeler, instance, [a, b], rng)
    if ranks[0] == ranks[1]:
        return 0.5
    return 1.0 if ranks[0] < ranks[1] else 0.0


def preference_probability(labeler: Labeler, instance: TaskInstance, a: str | list[str],
                           b: str | list[str]) -> float:
    """P(labeler prefers a to b) under the Plackett-Luce (here Bradley-Terry) model; 0.5 if identical."""
    if split_words(a) == split_words(b):
        return 0.5
    margin = (utility(labeler, instance, a) - utility(labeler, instance, b)) / labeler.noise
    return 1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, margin))))


def write_demonstration(labeler: Labeler, instance: TaskInstance, rng: random.Random) -> str:
    """The labeler's demonstration: the task's ideal response, sometimes with the labeler's polite flavor."""
    words = list(_task(labeler, instance).ideal_response(instance))
    if rng.random() < labeler.flavor_rate:
        words = list(labeler.flavor) + words if labeler.flavor_at_start else words + list(labeler.flavor)
    return " ".join(words)
