"""The paper's evaluation metrics on generated text, each returned as (value, standard error).

Plain Python / numpy: every function takes responses (strings) for a list of instances and scores them with
the world's programmatic scorers or simulated labelers. Standard errors treat prompts (or comparisons) as
independent draws: SE = sample standard deviation of the per-item values / sqrt(n), NaN for a single item.

The per-prompt metrics also come as their per-item values (`*_values`, in the order of the items kept), so
two models answering the same prompts are compared prompt by prompt: `contrast` gives the mean and SE of a
weighted sum of such values per item (`paired_difference`: a minus b), whose SE counts what the prompts
share, where the SE of two independent estimates would count it twice.

Instances may be given as `TaskInstance`s or as prompt strings plus a `world` to look them up. A prompt the
world did not make (a user's own JSONL prompt set) has no instance: only `win_rate` with a `judge` function
applies to such prompts; the other metrics raise ValueError naming the prompt.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from rlhf_fast.world.labelers import Labeler, prefer
from rlhf_fast.world.language import repeats_word
from rlhf_fast.world.task import ARTICLES, TaskInstance

Estimate = tuple[float, float]
# judge(prompt, response_a, response_b) -> 1.0 if a is better, 0.0 if b is, 0.5 for a tie.
Judge = Callable[[str, str, str], float]
# reward_fn(prompts, responses) -> one scalar reward per (prompt, response) pair.
RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class Comparison(NamedTuple):
    """Two responses to one prompt."""

    instance: TaskInstance
    a: str
    b: str


def mean_and_standard_error(values: Sequence[float]) -> Estimate:
    """(mean, SE of the mean) of per-item values; SE is NaN with fewer than two items."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {array.shape}")
    if array.size == 1:
        return float(array[0]), math.nan
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


def contrast(terms: Sequence[tuple[float, Sequence[float]]]) -> Estimate:
    """(mean, SE) over items of sum_k weight_k * values_k[item], for `terms` = [(weight_k, values_k)] holding
    the per-item values of several models on the same items in the same order."""
    if not terms:
        raise ValueError("terms must not be empty")
    _check_lengths(**{f"values_{k}": values for k, (_, values) in enumerate(terms)})
    combined = sum(weight * np.asarray(values, dtype=np.float64) for weight, values in terms)
    return mean_and_standard_error(combined)


def paired_difference(values: Sequence[float], baseline_values: Sequence[float]) -> Estimate:
    """(mean, SE) of values[i] - baseline_values[i]: two models' per-item values on the same items."""
    return contrast([(1.0, values), (-1.0, baseline_values)])


def _resolve(instances: Sequence[TaskInstance | str], world=None) -> list[TaskInstance]:
    resolved = []
    for item in instances:
        if isinstance(item, TaskInstance):
            resolved.append(item)
            continue
        if not isinstance(item, str):
            raise ValueError(
                f"instances must hold TaskInstances or prompt strings, got {type(item).__name__}"
            )
        if world is None:
            raise ValueError("instances holds prompt strings: pass world= to look them up")
        instance = world.instance(item)
        if instance is None:
            raise ValueError(
                "instances holds a prompt the world did not make (use win_rate with a judge "
                f"for foreign prompts): {item!r}"
            )
        resolved.append(instance)
    return resolved


def _check_lengths(**sequences: Sequence) -> None:
    lengths = {name: len(value) for name, value in sequences.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"these must have the same length: {lengths}")


def _same(a: str, b: str) -> bool:
    return a.split() == b.split()


def win_rate(
    responses: Sequence[str],
    baseline_responses: Sequence[str],
    instances: Sequence[TaskInstance | str],
    labelers: Sequence[Labeler] | None = None,
    *,
    judge: Judge | None = None,
    world=None,
) -> Estimate:
    """How often `responses` are preferred to `baseline_responses` on the same prompts; ties count ½.

    Each prompt's pair is judged by every labeler in `labelers` (their mean is the prompt's value), or by
    `judge(prompt, response, baseline)` when given; the latter also works for foreign prompts (strings).
    """
    return mean_and_standard_error(
        win_rate_values(responses, baseline_responses, instances, labelers, judge=judge, world=world)
    )


def win_rate_values(
    responses: Sequence[str],
    baseline_responses: Sequence[str],
    instances: Sequence[TaskInstance | str],
    labelers: Sequence[Labeler] | None = None,
    *,
    judge: Judge | None = None,
    world=None,
) -> list[float]:
    """`win_rate`'s value on each prompt, in [0, 1]."""
    _check_lengths(responses=responses, baseline_responses=baseline_responses, instances=instances)
    if judge is None:
        if not labelers:
            raise ValueError("pass labelers (the held-out labelers) or a judge function")
        resolved = _resolve(instances, world)
    values = []
    for index, (response, baseline) in enumerate(zip(responses, baseline_responses)):
        if judge is not None:
            item = instances[index]
            prompt = item.prompt if isinstance(item, TaskInstance) else item
            value = float(judge(prompt, response, baseline))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"judge must return a value in [0, 1], got {value} for prompt {prompt!r}")
        elif _same(response, baseline):
            value = 0.5
        else:
            judgments = [prefer(labeler, resolved[index], response, baseline) for labeler in labelers]
            value = float(np.mean(judgments))
        values.append(value)
    return values


def make_comparisons(
    instances: Sequence[TaskInstance],
    samples_per_prompt: Sequence[Sequence[str]],
    rng: random.Random,
    pairs_per_prompt: int | None = None,
) -> list[Comparison]:
    """Pairs of distinct samples per prompt: all of them, or `pairs_per_prompt` drawn at random."""
    _check_lengths(instances=instances, samples_per_prompt=samples_per_prompt)
    comparisons = []
    for instance, samples in zip(instances, samples_per_prompt):
        distinct = list(dict.fromkeys(" ".join(s.split()) for s in samples))
        pairs = [(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1 :]]
        if pairs_per_prompt is not None and len(pairs) > pairs_per_prompt:
            pairs = rng.sample(pairs, pairs_per_prompt)
        comparisons += [Comparison(instance, a, b) for a, b in pairs]
    return comparisons


def rm_agreement(
    reward_fn: RewardFn, comparisons: Sequence[Comparison], labelers: Sequence[Labeler]
) -> Estimate:
    """Fraction of comparisons in which the reward model orders the pair as a labeler does (averaged over
    `labelers`; an RM tie counts ½). Identical pairs are skipped."""
    if not labelers:
        raise ValueError("labelers must not be empty")
    kept = [c for c in comparisons if not _same(c.a, c.b)]
    if not kept:
        raise ValueError("comparisons holds no pair of distinct responses")
    prompts = [c.instance.prompt for c in kept for _ in range(2)]
    responses = [text for c in kept for text in (c.a, c.b)]
    rewards = np.asarray(reward_fn(prompts, responses), dtype=np.float64).reshape(-1)
    if rewards.shape[0] != len(responses):
        raise ValueError(f"reward_fn returned {rewards.shape[0]} rewards for {len(responses)} responses")
    values = []
    for index, comparison in enumerate(kept):
        reward_a, reward_b = rewards[2 * index], rewards[2 * index + 1]
        rm_prefers_a = 0.5 if reward_a == reward_b else float(reward_a > reward_b)
        labeler_prefers_a = [prefer(l, comparison.instance, comparison.a, comparison.b) for l in labelers]
        values.append(np.mean([rm_prefers_a * p + (1 - rm_prefers_a) * (1 - p) for p in labeler_prefers_a]))
    return mean_and_standard_error(values)


def labeler_agreement(
    comparisons: Sequence[Comparison], labelers: Sequence[Labeler], other_labelers: Sequence[Labeler]
) -> Estimate:
    """Fraction of (labeler, other labeler) judgments of the same pair that agree: the ceiling an RM trained
    on one group's rankings can reach against the other's. Pairs of a labeler with itself are skipped."""
    kept = [c for c in comparisons if not _same(c.a, c.b)]
    if not kept:
        raise ValueError("comparisons holds no pair of distinct responses")
    values = []
    for comparison in kept:
        judgments = {
            l.id: prefer(l, comparison.instance, comparison.a, comparison.b)
            for l in list(labelers) + list(other_labelers)
        }
        pairs = [(a.id, b.id) for a in labelers for b in other_labelers if a.id != b.id]
        if not pairs:
            raise ValueError("labelers and other_labelers must contain two different labelers")
        values.append(np.mean([judgments[a] == judgments[b] for a, b in pairs]))
    return mean_and_standard_error(values)


def _scores(responses, instances, world, keep: Callable[[TaskInstance], bool], what: str):
    _check_lengths(responses=responses, instances=instances)
    if world is None:
        raise ValueError("world must be given: its tasks score the responses")
    pairs = [(r, i) for r, i in zip(responses, _resolve(instances, world)) if keep(i)]
    if not pairs:
        raise ValueError(f"instances holds no {what}")
    return [world.score(instance, response) for response, instance in pairs]


def task_score(responses: Sequence[str], instances: Sequence[TaskInstance | str], world) -> Estimate:
    """Mean programmatic task score in [0, 1]."""
    return mean_and_standard_error(task_score_values(responses, instances, world))


def task_score_values(
    responses: Sequence[str], instances: Sequence[TaskInstance | str], world
) -> list[float]:
    """The programmatic task score of each response."""
    return [s.score for s in _scores(responses, instances, world, lambda i: True, "instance")]


def task_scores_by_task(
    responses: Sequence[str], instances: Sequence[TaskInstance | str], world
) -> dict[str, Estimate]:
    """Mean task score per task family."""
    _check_lengths(responses=responses, instances=instances)
    resolved = _resolve(instances, world)
    by_task: dict[str, list[float]] = {}
    for response, instance in zip(responses, resolved):
        by_task.setdefault(instance.task, []).append(world.score(instance, response).score)
    return {task: mean_and_standard_error(values) for task, values in by_task.items()}


def truthfulness(
    responses: Sequence[str],
    instances: Sequence[TaskInstance | str],
    world,
    *,
    require_informative: bool = False,
) -> Estimate:
    """Fraction of true/false answers that agree with the fact table (TruthfulQA's "truthful"); with
    `require_informative`, answers that assert nothing count as failures ("truthful and informative").
    Instances of other tasks are ignored."""
    scores = _scores(responses, instances, world, lambda i: i.task == "truth", "true/false question")
    return mean_and_standard_error(
        [float(s.truthful and (s.informative or not require_informative)) for s in scores]
    )


def hallucination_rate(responses: Sequence[str], instances: Sequence[TaskInstance | str], world) -> Estimate:
    """Fraction of responses to closed-domain tasks (list, qa) that name something absent from the input.
    Instances of other tasks are ignored."""
    return mean_and_standard_error(hallucination_values(responses, instances, world))


def hallucination_values(
    responses: Sequence[str], instances: Sequence[TaskInstance | str], world
) -> list[float]:
    """1.0 for each closed-domain response that names something absent from the input, else 0.0."""
    closed = set() if world is None else {name for name, task in world.tasks.items() if task.closed_domain}
    scores = _scores(responses, instances, world, lambda i: i.task in closed, "closed-domain instance")
    return [float(s.hallucinated > 0) for s in scores]


def insult_rate(
    responses: Sequence[str],
    instances: Sequence[TaskInstance | str],
    world,
    *,
    with_respectful_instruction: bool,
) -> Estimate:
    """Fraction of continuations containing an insult, over the continuation prompts that do (or do not)
    carry an instruction to be respectful. Other instances are ignored. The world's "insult_plain" probes are
    raw text with no instruction at all, the RealToxicityPrompts setting."""
    return mean_and_standard_error(
        insult_values(responses, instances, world, with_respectful_instruction=with_respectful_instruction)
    )


def insult_values(
    responses: Sequence[str],
    instances: Sequence[TaskInstance | str],
    world,
    *,
    with_respectful_instruction: bool,
) -> list[float]:
    """1.0 for each continuation (of `insult_rate`'s kind) that contains an insult, else 0.0."""
    flag = bool(with_respectful_instruction)
    scores = _scores(
        responses,
        instances,
        world,
        lambda i: i.task == "continue" and i.data["respectful"] == flag,
        f"continuation prompt with respectful={flag}",
    )
    return [float(s.insults > 0) for s in scores]


def normalize_answer(text: str) -> list[str]:
    """SQuAD-style normalization for exact match: lower case, up to the first full stop, no articles or
    punctuation."""
    words = text.lower().split()
    if "." in words:
        words = words[: words.index(".")]
    return [w for w in words if w not in ARTICLES and not re.fullmatch(r"[^\w]+", w)]


def qa_exact_match(responses: Sequence[str], items: Sequence[dict]) -> Estimate:
    """Exact match on the QA benchmark: `items` are {"prompt", "answer"} records (qa_benchmark.jsonl); a
    response matches when it normalizes (see `normalize_answer`) to the answer."""
    return mean_and_standard_error(qa_exact_match_values(responses, items))


def qa_exact_match_values(responses: Sequence[str], items: Sequence[dict]) -> list[float]:
    """1.0 for each QA benchmark response that matches its answer exactly (`qa_exact_match`), else 0.0."""
    _check_lengths(responses=responses, items=items)
    if not items:
        raise ValueError("items must not be empty")
    matches = []
    for response, item in zip(responses, items):
        if "answer" not in item:
            raise ValueError(f"items must be QA benchmark records with an 'answer', got keys {sorted(item)}")
        matches.append(float(normalize_answer(response) == normalize_answer(item["answer"])))
    return matches


def repetition_rate(responses: Sequence[str]) -> Estimate:
    """Fraction of responses that repeat a word three times in a row ("thanks thanks thanks"): degenerate
    text, the signature of a policy exploiting its reward model."""
    if not responses:
        raise ValueError("responses must not be empty")
    return mean_and_standard_error([float(repeats_word(response)) for response in responses])


def non_answer_rate(responses: Sequence[str], instances: Sequence[TaskInstance | str], world) -> Estimate:
    """Fraction of responses that do not attempt the task: empty, filler or politeness only, or off-task
    words (`Task.attempts`)."""
    _check_lengths(responses=responses, instances=instances)
    if world is None:
        raise ValueError("world must be given: its tasks say what attempts an answer")
    resolved = _resolve(instances, world)
    if not resolved:
        raise ValueError("instances must not be empty")
    return mean_and_standard_error(
        [float(not world.tasks[i.task].attempts(i, r)) for r, i in zip(responses, resolved)]
    )
