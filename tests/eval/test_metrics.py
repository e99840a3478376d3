import math
import random

import numpy as np
import pytest

from rlhf_fast.eval import (
    contrast,
    hallucination_rate,
    insult_rate,
    labeler_agreement,
    make_comparisons,
    mean_and_standard_error,
    paired_difference,
    qa_exact_match,
    rm_agreement,
    task_score,
    task_scores_by_task,
    truthfulness,
    win_rate,
)
from rlhf_fast.eval.metrics import (
    hallucination_values,
    insult_values,
    normalize_answer,
    qa_exact_match_values,
    task_score_values,
    win_rate_values,
)
from rlhf_fast.world import utility


def _ideal(world, instances):
    return [world.ideal_response(i) for i in instances]


def _damaged(world, instances):
    insult = world.language.insults[0]
    return [" ".join(reversed(world.ideal_response(i).split())) + " tom " + insult for i in instances]


def test_mean_and_standard_error_formula():
    rng = np.random.default_rng()
    values = rng.random(50)
    mean, se = mean_and_standard_error(values)
    assert mean == pytest.approx(values.mean())
    assert se == pytest.approx(np.sqrt(((values - values.mean()) ** 2).sum() / 49 / 50))
    value, se = mean_and_standard_error([0.3])
    assert value == 0.3
    assert math.isnan(se)
    with pytest.raises(ValueError, match="values"):
        mean_and_standard_error([])


def test_standard_error_matches_the_spread_of_repeated_estimates(small_world):
    """Draw many independent evaluation sets: the std of the estimates is what the SE claims."""
    rng = random.Random()
    probes = small_world.probes["insult_plain"]
    insult = small_world.language.insults[1]
    p, n, repeats = 0.3, 80, 300
    estimates, standard_errors = [], []
    for _ in range(repeats):
        responses = [insult if rng.random() < p else "kind friend" for _ in range(n)]
        value, se = insult_rate(
            responses,
            probes[:n] if len(probes) >= n else (probes * n)[:n],
            small_world,
            with_respectful_instruction=False,
        )
        estimates.append(value)
        standard_errors.append(se)
    assert np.mean(estimates) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n / repeats))
    assert np.mean(standard_errors) == pytest.approx(np.std(estimates, ddof=1), rel=0.2)
    assert np.mean(standard_errors) == pytest.approx(math.sqrt(p * (1 - p) / n), rel=0.1)


def test_win_rate_of_ideal_against_damaged_responses(small_world):
    instances = small_world.instances("heldout")
    ideal, damaged = _ideal(small_world, instances), _damaged(small_world, instances)
    labelers = small_world.heldout_labelers
    value, se = win_rate(ideal, damaged, instances, labelers)
    assert value > 0.95
    assert 0 <= se < 0.02
    reverse, _ = win_rate(damaged, ideal, instances, labelers)
    assert value + reverse == pytest.approx(1.0)
    assert win_rate(ideal, ideal, instances, labelers) == (0.5, 0.0)


def test_win_rate_on_prompt_strings_and_with_a_judge(small_world):
    instances = small_world.instances("heldout")[:30]
    prompts = [i.prompt for i in instances]
    ideal, damaged = _ideal(small_world, instances), _damaged(small_world, instances)
    by_instance = win_rate(ideal, damaged, instances, small_world.heldout_labelers)
    assert win_rate(ideal, damaged, prompts, small_world.heldout_labelers, world=small_world) == by_instance
    foreign = ["write a poem", "tell me a joke"]
    with pytest.raises(ValueError, match="write a poem"):
        win_rate(["a", "b"], ["c", "d"], foreign, small_world.heldout_labelers, world=small_world)

    def longer_is_better(prompt, a, b):
        return 0.5 if len(a) == len(b) else float(len(a) > len(b))

    value, se = win_rate(
        ["a long answer", "b", "same"],
        ["short", "a longer one", "size"],
        [*foreign, "x"],
        judge=longer_is_better,
    )
    assert value == pytest.approx(1.5 / 3)
    assert se > 0
    with pytest.raises(ValueError, match="labelers"):
        win_rate(ideal, damaged, instances)
    with pytest.raises(ValueError, match="same length"):
        win_rate(ideal, damaged[:-1], instances, small_world.heldout_labelers)


def test_rm_agreement_of_good_inverted_and_constant_reward_models(small_world):
    rng = random.Random()
    instances = small_world.instances("heldout")[:60]
    samples = [
        [small_world.ideal_response(i), d, "cat"] for i, d in zip(instances, _damaged(small_world, instances))
    ]
    comparisons = make_comparisons(instances, samples, rng)
    assert len(comparisons) == 3 * len(instances)
    judge = small_world.train_labelers[0]

    def reward(prompts, responses):
        return [utility(judge, small_world.instance(p), r) for p, r in zip(prompts, responses)]

    def inverted(prompts, responses):
        return [-r for r in reward(prompts, responses)]

    good, se = rm_agreement(reward, comparisons, small_world.heldout_labelers)
    bad, _ = rm_agreement(inverted, comparisons, small_world.heldout_labelers)
    assert good > 0.8
    assert se > 0 or good == 1.0  # the SE is 0 only when every judgment agrees
    assert good + bad == pytest.approx(1.0)
    assert rm_agreement(lambda p, r: [0.0] * len(r), comparisons, small_world.heldout_labelers) == (0.5, 0.0)
    with pytest.raises(ValueError, match="rewards"):
        rm_agreement(lambda p, r: [0.0], comparisons, small_world.heldout_labelers)
    agreement, _ = labeler_agreement(comparisons, small_world.heldout_labelers, small_world.train_labelers)
    assert 0.7 < agreement <= 1.0
    assert len(make_comparisons(instances, samples, rng, pairs_per_prompt=1)) == len(instances)


def test_task_scores(small_world):
    instances = small_world.instances("heldout")
    assert task_score(_ideal(small_world, instances), instances, small_world) == (1.0, 0.0)
    value, se = task_score(_damaged(small_world, instances), instances, small_world)
    assert value < 0.8
    assert se > 0
    per_task = task_scores_by_task(_ideal(small_world, instances), instances, small_world)
    assert set(per_task) == {i.task for i in instances}


def test_truthfulness(small_world):
    probes = small_world.probes["truthful"]
    ideal = _ideal(small_world, probes)
    flips = {"true": "false", "false": "true", "yes": "no", "no": "yes"}
    myth = {(f.subject, f.relation): f.myth for f in small_world.facts.myths}
    flipped = [flips.get(r, myth[(p.data["subject"], p.data["relation"])]) for r, p in zip(ideal, probes)]
    assert truthfulness(ideal, probes, small_world) == (1.0, 0.0)
    assert truthfulness(flipped, probes, small_world) == (0.0, 0.0)
    silent = ["the"] * len(probes)
    assert truthfulness(silent, probes, small_world)[0] == 1.0
    assert truthfulness(silent, probes, small_world, require_informative=True)[0] == 0.0
    with pytest.raises(ValueError, match="true/false"):
        truthfulness(["x"], small_world.probes["insult_plain"][:1], small_world)


def test_hallucination_rate_only_counts_closed_domain_tasks(small_world):
    instances = small_world.instances("heldout")
    closed = [i.task in ("list", "qa") for i in instances]
    assert any(closed)
    assert not all(closed)
    responses = [small_world.ideal_response(i) + " sky" for i in instances]
    assert hallucination_rate(responses, instances, small_world) == (1.0, 0.0)
    assert hallucination_rate(_ideal(small_world, instances), instances, small_world) == (0.0, 0.0)
    open_domain = [i for i in instances if i.task == "repeat"]
    with pytest.raises(ValueError, match="closed-domain"):
        hallucination_rate(["sky"] * len(open_domain), open_domain, small_world)


def test_insult_rate_splits_by_the_respectful_instruction(small_world):
    probes = small_world.probes["insult_respectful"] + small_world.probes["insult_plain"]
    insult = small_world.language.insults[2]
    responses = [insult if p.data["respectful"] else "kind friend" for p in probes]
    assert insult_rate(responses, probes, small_world, with_respectful_instruction=True) == (1.0, 0.0)
    assert insult_rate(responses, probes, small_world, with_respectful_instruction=False) == (0.0, 0.0)
    with pytest.raises(ValueError, match="respectful=True"):
        insult_rate(
            ["x"], small_world.probes["insult_plain"][:1], small_world, with_respectful_instruction=True
        )


def test_qa_exact_match(small_world):
    items = small_world.qa_benchmark
    answers = [item["answer"] for item in items]
    assert qa_exact_match([a + " . passage tom" for a in answers], items) == (1.0, 0.0)
    assert qa_exact_match([a + " thanks" for a in answers], items) == (0.0, 0.0)
    assert normalize_answer("The Blue cup , .") == ["blue", "cup"]
    half = [a if index % 2 else "sky" for index, a in enumerate(answers)]
    value, se = qa_exact_match(half, items)
    assert value == pytest.approx(sum(1 for i in range(len(items)) if i % 2) / len(items))
    assert se > 0
    with pytest.raises(ValueError, match="answer"):
        qa_exact_match(["x"], [{"prompt": "p"}])


def test_contrast_is_the_mean_and_se_of_the_weighted_sum_per_item():
    rng = np.random.default_rng()
    n = int(rng.integers(5, 60))
    a, b, c = rng.random(n), rng.random(n), rng.integers(0, 2, n).astype(float)
    combined = 1.0 * a - 0.5 * b - 0.5 * c
    value, se = contrast([(1.0, a), (-0.5, b), (-0.5, c)])
    assert value == pytest.approx(combined.mean(), rel=1e-12)
    assert se == pytest.approx(combined.std(ddof=1) / math.sqrt(n), rel=1e-12)
    assert paired_difference(a, b) == pytest.approx(contrast([(1.0, a), (-1.0, b)]), rel=1e-12)
    assert paired_difference(list(a), list(a)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same length"):
        paired_difference(a, b[:-1])
    with pytest.raises(ValueError, match="terms"):
        contrast([])


def test_paired_standard_error_matches_the_spread_of_repeated_differences():
    """Two models on the same prompts, whose difficulty both share: the SE of the per-prompt differences is
    the spread of the estimated difference over repeated prompt sets; the SEs of the two means in quadrature
    count the shared difficulty twice and overstate it."""
    rng = np.random.default_rng()
    n, repeats = 100, 400
    differences, paired, quadrature = [], [], []
    for _ in range(repeats):
        difficulty = rng.beta(0.3, 0.3, n)  # each prompt's chance of a failure, shared by both models
        a = (rng.random(n) < difficulty).astype(float)
        b = (rng.random(n) < np.clip(difficulty + 0.05, 0, 1)).astype(float)
        value, se = paired_difference(a, b)
        differences.append(value)
        paired.append(se)
        quadrature.append(math.hypot(mean_and_standard_error(a)[1], mean_and_standard_error(b)[1]))
    spread = np.std(differences, ddof=1)
    assert np.mean(paired) == pytest.approx(spread, rel=0.15)
    assert np.mean(quadrature) > 1.3 * spread


def test_per_item_values_are_what_the_metrics_average(small_world):
    heldout, probes = small_world.instances("heldout"), small_world.probes["insult_respectful"]
    responses = _damaged(small_world, heldout[:20]) + _ideal(small_world, heldout[20:40])
    instances = heldout[:40]
    for values, estimate in [
        (task_score_values(responses, instances, small_world), task_score(responses, instances, small_world)),
        (
            hallucination_values(responses, instances, small_world),
            hallucination_rate(responses, instances, small_world),
        ),
    ]:
        assert estimate == pytest.approx(mean_and_standard_error(values))
    insult = small_world.language.insults[0]
    continuations = [insult if k % 3 else "kind friend" for k in range(len(probes))]
    values = insult_values(continuations, probes, small_world, with_respectful_instruction=True)
    assert len(values) == len(probes) and set(values) == {0.0, 1.0}
    assert insult_rate(continuations, probes, small_world, with_respectful_instruction=True) == pytest.approx(
        mean_and_standard_error(values)
    )
    items = small_world.qa_benchmark[:10]
    answers = [item["answer"] if k % 2 else "no" for k, item in enumerate(items)]
    assert qa_exact_match_values(answers, items) == [float(k % 2) for k in range(10)]
    wins = win_rate_values(responses[20:], responses[:20], instances[20:], small_world.heldout_labelers)
    assert win_rate(
        responses[20:], responses[:20], instances[20:], small_world.heldout_labelers
    ) == pytest.approx(mean_and_standard_error(wins))
