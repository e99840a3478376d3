"""Simulated labelers. Like InstructGPT's, they put helpfulness first, then truthfulness and harmlessness;
style comes last. Each judges a response by its utility:

    utility = task score · [helpful]                             helpfulness, in [0, 1]
              − unhelpful_penalty · [non-answer or repetition]   a non-answer is a bad response
              − hallucination_penalty · hallucinated items       closed-domain tasks
              − insult_penalty · min(insults, 3)
              + politeness_weight · [polite] + length_weight · min(content words, 8)        style

A non-answer is a response with no attempt at the task: nothing but filler and politeness, or only words
that cannot answer it (off-task, `Task.attempts`); a repetition repeats one word three times in a row (and
earns nothing for the right words it repeats). The penalty for either (0.5-0.8) is larger than any style bonus (at most 0.1) and than one hallucinated item
(0.2-0.4), so a labeler ranks a polite non-answer below a wrong attempt, and "thanks thanks thanks" below
everything that tries: the world cannot be won by saying nothing politely.

Labelers rank K responses by Plackett-Luce over utilities: the best is drawn with probability
∝ exp(utility / noise), then the next among the rest, and so on (equivalently: sort utility / noise plus
standard Gumbel noise). Identical responses share a rank; all other ranks are strict.

Each labeler's tastes (the weights above, the noise) are drawn on their own, so a panel's mean taste is a
draw too, and the panels are as large as InstructGPT's (about 40 contractors; `WorldSizes.labelers`): 30
write the demonstrations and rank, 10 held out judge. With 8 and 4 the two panels' mean tastes differed by
chance: on seed 1 the training panel weighed politeness, against its noise, a third as much as the held-out
panel, and a reward model of the first could not please the second; with 30 and 10 they agree within about
a fifth on seeds 0-4.

Demonstrations are the task's ideal response, sometimes with the labeler's own polite flavor. Demonstrations
are also imperfect where real ones were: asked to continue a text that baits an insult, a labeler sometimes
writes the continuation in the voice of the text's source (`literal_rate`, 0-0.4), whether or not the
customer asked for respect. So the SFT model insults on some baiting continuations, as the paper's SFT and
GPT-3 models did on RealToxicityPrompts; rankings always penalize insults, so the reward model and PPO can
remove what the demonstrations taught.
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
    repeats_word,
    split_words,
    strip_politeness,
)
from rlhf_fast.world.task import Task, TaskInstance


@dataclass(frozen=True)
class Labeler:
    id: str
    length_weight: float
    politeness_weight: float
    insult_penalty: float
    hallucination_penalty: float
    unhelpful_penalty: float  # a non-answer or a repetition
    noise: float  # Plackett-Luce temperature: larger = less consistent judgments
    flavor_rate: float  # chance a demonstration gets the labeler's polite flavor
    flavor: tuple[str, ...]
    flavor_at_start: bool
    literal_rate: float  # chance a baiting continuation is written in the voice of the text's source
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
        labelers.append(
            Labeler(
                id=f"L{index:02d}",
                length_weight=rng.uniform(-0.01, 0.01),
                politeness_weight=rng.uniform(0.0, 0.1),
                insult_penalty=rng.uniform(1.0, 2.0),
                hallucination_penalty=rng.uniform(0.2, 0.4),
                unhelpful_penalty=rng.uniform(0.5, 0.8),
                # Judgment noise: consistent enough that a reward model small enough to train on a CPU can learn
                # their preferences (inter-labeler agreement about 0.8 on pairs of SFT samples).
                noise=rng.uniform(0.03, 0.1),
                flavor_rate=rng.uniform(0.0, 0.3),
                flavor=flavor,
                flavor_at_start=at_start,
                literal_rate=rng.uniform(0.0, 0.4),
                held_out=index >= count - n_heldout,
                tasks=tasks,
            )
        )
    return labelers


def _task(labeler: Labeler, instance: TaskInstance) -> Task:
    try:
        return labeler.tasks[instance.task]
    except KeyError:
        raise ValueError(f"labeler {labeler.id} knows no task {instance.task!r}") from None


def utility(labeler: Labeler, instance: TaskInstance, response: str | list[str]) -> float:
    """How much `labeler` likes `response` to `instance` (before judgment noise)."""
    words = split_words(response)
    task = _task(labeler, instance)
    result = task.score(instance, words)
    content_length = min(len(strip_politeness(words)), 8)
    unhelpful = is_unhelpful(task, instance, words)
    helpfulness = 0.0 if unhelpful else result.score  # degenerate text earns nothing for what it contains
    return (
        helpfulness
        - labeler.unhelpful_penalty * unhelpful
        - labeler.hallucination_penalty * result.hallucinated
        - labeler.insult_penalty * min(result.insults, 3)
        + labeler.politeness_weight * is_polite(words)
        + labeler.length_weight * content_length
    )


def is_unhelpful(task: Task, instance: TaskInstance, response: str | list[str]) -> bool:
    """A non-answer (no attempt at the task: empty, filler, politeness, off-task words) or a repetition."""
    return not task.attempts(instance, response) or repeats_word(response)


def _default_rng(labeler: Labeler, instance: TaskInstance, distinct: list[tuple[str, ...]]) -> random.Random:
    # Seeded by the judgment's content, so a repeated judgment is the same whatever order it comes in.
    key = "\x1f".join([labeler.id, instance.prompt] + [" ".join(words) for words in distinct])
    return random.Random(key)


def rank(
    labeler: Labeler,
    instance: TaskInstance,
    responses: Sequence[str | list[str]],
    rng: random.Random | None = None,
) -> list[int]:
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


def prefer(
    labeler: Labeler,
    instance: TaskInstance,
    a: str | list[str],
    b: str | list[str],
    rng: random.Random | None = None,
) -> float:
    """1.0 if `labeler` prefers response `a` to `b`, 0.0 if `b`; 0.5 when the two are identical (a tie)."""
    ranks = rank(labeler, instance, [a, b], rng)
    if ranks[0] == ranks[1]:
        return 0.5
    return 1.0 if ranks[0] < ranks[1] else 0.0


def preference_probability(
    labeler: Labeler, instance: TaskInstance, a: str | list[str], b: str | list[str]
) -> float:
    """P(labeler prefers a to b) under the Plackett-Luce (here Bradley-Terry) model; 0.5 if identical."""
    if split_words(a) == split_words(b):
        return 0.5
    margin = (utility(labeler, instance, a) - utility(labeler, instance, b)) / labeler.noise
    return 1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, margin))))


def write_demonstration(labeler: Labeler, instance: TaskInstance, rng: random.Random) -> str:
    """The labeler's demonstration: the task's ideal response, sometimes with the labeler's polite flavor; a
    baiting continuation is sometimes written in the voice of the text's source (see the module docstring)."""
    task = _task(labeler, instance)
    if instance.task == "continue" and instance.data["bait"] and rng.random() < labeler.literal_rate:
        return " ".join(task.source_continuation(instance))
    words = list(task.ideal_response(instance))
    if rng.random() < labeler.flavor_rate:
        words = list(labeler.flavor) + words if labeler.flavor_at_start else words + list(labeler.flavor)
    return " ".join(words)
