"""The world's evaluation suite: what a policy answers, and how the world judges the answers."""

import math

import pytest

from rlhf_fast.eval.metrics import mean_and_standard_error
from rlhf_fast.eval.results import Estimate
from rlhf_fast.eval.suite import (
    MODEL_METRICS,
    PAIRED_METRICS,
    Answers,
    EvalSuite,
    judge,
    judge_items,
    task_scores,
)
from rlhf_fast.world import build_world

SIZES = {
    "pretrain_documents": 50,
    "qa_benchmark": 30,
    "demonstrations": 40,
    "rm_prompts": 20,
    "ppo_prompts": 20,
    "heldout_prompts": 60,
    "probes": 30,
    "customers": 8,
    "labelers": 6,
    "heldout_labelers": 2,
}


@pytest.fixture(scope="module")
def world():
    return build_world(3, SIZES)


def _ideal(world, suite) -> Answers:
    return Answers(
        heldout=[world.ideal_response(i) for i in suite.heldout],
        probes=[world.ideal_response(i) for i in suite.probes],
        qa=[item["answer"] for item in suite.qa],
    )


def test_ideal_answers_score_perfectly_and_beat_non_answers(world):
    suite = EvalSuite.from_world(world, 40)
    assert len(suite.heldout) == 40 and len(suite.qa) == 30 and suite.probes
    ideal = _ideal(world, suite)
    silent = Answers(
        heldout=["thanks"] * 40, probes=["thanks thanks thanks"] * len(suite.probes), qa=["sure"] * 30
    )
    metrics = judge(world, suite, ideal, silent)
    assert set(metrics) == set(MODEL_METRICS)
    assert all(isinstance(e, Estimate) for e in metrics.values())
    assert metrics["task_score"].value == 1.0 and metrics["qa_exact_match"].value == 1.0
    assert metrics["win_rate"].value > 0.95  # held-out labelers put helpfulness first
    assert metrics["hallucination_rate"].value == 0.0 and metrics["insult_rate_respectful"].value == 0.0
    assert metrics["repetition_rate"].value == 0.0 and metrics["non_answer_rate"].value == 0.0
    bad = judge(world, suite, silent)
    assert "win_rate" not in bad
    assert bad["non_answer_rate"].value == 1.0 and bad["task_score"].value == 0.0
    assert math.isclose(
        judge(world, suite, silent, ideal)["win_rate"].value, 1 - metrics["win_rate"].value, abs_tol=0.05
    )
    assert set(task_scores(world, suite, ideal)) <= set(world.tasks)


def test_answers_round_trip_through_json(world):
    answers = Answers(["a"], ["b", "c"], ["d"])
    assert Answers.from_json(answers.to_json()) == answers


def test_judge_items_keeps_the_per_prompt_values_the_metrics_average(world):
    suite = EvalSuite.from_world(world, 40)
    ideal = _ideal(world, suite)
    mixed = Answers(
        heldout=[a if k % 2 else "thanks" for k, a in enumerate(ideal.heldout)],
        probes=ideal.probes,
        qa=[a if k % 3 else "sure" for k, a in enumerate(ideal.qa)],
    )
    metrics, items = judge_items(world, suite, mixed, ideal)
    assert set(items) == set(PAIRED_METRICS)
    assert metrics == judge(world, suite, mixed, ideal)
    for name, values in items.items():
        assert metrics[name] == Estimate.of(mean_and_standard_error(values))
    assert len(items["task_score"]) == len(items["win_rate"]) == len(suite.heldout)
    assert items["qa_exact_match"] == [float(k % 3 != 0) for k in range(len(suite.qa))]
    assert "win_rate" not in judge_items(world, suite, mixed)[1]
