"""A world's evaluation suite: what every policy answers and how its answers are judged, for the demo and for
`rlhf-fast eval --world` alike.

    suite = EvalSuite.from_world(world, prompts=300)
    answers = respond(policy, tokenizer, suite, max_new_tokens=12, temperature=1.0)
    metrics = judge(world, suite, answers, baseline_answers)          # {metric: Estimate}
    metrics, items = judge_items(world, suite, answers, baseline_answers)  # and per-prompt values

A policy answers the held-out customers' prompts and the probes (truthfulness, insult baiting with and
without a respectful instruction) sampled at the given temperature, as the paper's labelers saw samples, and
the QA benchmark greedily (exact match in the benchmark's own format). The world's held-out labelers judge
the win rate against a baseline's answers; its scorers give the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_fast.eval import metrics as m
from rlhf_fast.eval.results import Estimate

MODEL_METRICS = (
    "win_rate",
    "task_score",
    "truthfulness",
    "truthful_informative",
    "hallucination_rate",
    "insult_rate_respectful",
    "insult_rate_plain",
    "qa_exact_match",
    "repetition_rate",
    "non_answer_rate",
)


@dataclass(frozen=True)
class EvalSuite:
    heldout: list  # TaskInstance: prompts of held-out customers
    probes: list  # TaskInstance: truthfulness and insult probes
    qa: list[dict]  # {"prompt", "answer"}: the QA benchmark

    @classmethod
    def from_world(cls, world, prompts: int) -> EvalSuite:
        """The first `prompts` held-out prompts and QA items, and every probe."""
        probes = (
            world.instances("truthful")
            + world.instances("insult_respectful")
            + world.instances("insult_plain")
        )
        return cls(world.instances("heldout")[:prompts], probes, world.qa_benchmark[:prompts])


@dataclass
class Answers:
    heldout: list[str]
    probes: list[str]
    qa: list[str]

    def to_json(self) -> dict[str, list[str]]:
        return {"heldout": self.heldout, "probes": self.probes, "qa": self.qa}

    @classmethod
    def from_json(cls, data: dict[str, list[str]]) -> Answers:
        return cls(list(data["heldout"]), list(data["probes"]), list(data["qa"]))


def respond(
    policy,
    tokenizer,
    suite: EvalSuite,
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 64,
    seed: int = 0,
    heldout: list[str] | None = None,
    best_of: int = 1,
    reward_model=None,
) -> Answers:
    """The policy's answers to the suite: held-out prompts and probes at `temperature` (0: greedy), the QA
    benchmark greedily. `heldout`: answers to the held-out prompts generated already (not generated again).
    `best_of` > 1: each sampled answer is the best of that many samples by `reward_model`'s score
    (`best_of_n_responses`); the QA benchmark stays greedy."""
    from rlhf_fast.eval.generate import best_of_n_responses, generate_responses

    if best_of > 1 and (reward_model is None or not temperature > 0):
        raise ValueError("best_of > 1 needs a reward_model to choose with and a sampling temperature > 0")
    decoding = {"temperature": temperature} if temperature > 0 else {"greedy": True}

    def answer(prompts: list[str], **options) -> list[str]:
        if best_of > 1 and not options.get("greedy", False):
            chooser = (reward_model, tokenizer, prompts, best_of, max_new_tokens)
            return best_of_n_responses(policy, *chooser, batch_size=batch_size, seed=seed, **options)
        return generate_responses(
            policy, tokenizer, prompts, max_new_tokens, batch_size=batch_size, seed=seed, **options
        )

    if heldout is not None and len(heldout) != len(suite.heldout):
        raise ValueError(f"heldout holds {len(heldout)} answers for {len(suite.heldout)} held-out prompts")
    return Answers(
        heldout=heldout if heldout is not None else answer([i.prompt for i in suite.heldout], **decoding),
        probes=answer([i.prompt for i in suite.probes], **decoding),
        qa=answer([item["prompt"] for item in suite.qa], greedy=True),
    )


# The metrics whose per-prompt values `judge_items` keeps: every model answers the same items, so two models
# are compared prompt by prompt (`Results.contrast`).
PAIRED_METRICS = (
    "win_rate",
    "task_score",
    "hallucination_rate",
    "insult_rate_respectful",
    "insult_rate_plain",
    "qa_exact_match",
)


def judge(world, suite: EvalSuite, answers: Answers, baseline: Answers | None = None) -> dict[str, Estimate]:
    """Every metric of MODEL_METRICS for `answers` (the win rate only with a `baseline`), judged by the
    world's held-out labelers and scorers."""
    return judge_items(world, suite, answers, baseline)[0]


def judge_items(
    world, suite: EvalSuite, answers: Answers, baseline: Answers | None = None
) -> tuple[dict[str, Estimate], dict[str, list[float]]]:
    """`judge`'s metrics and the per-item values of those in PAIRED_METRICS (the same items, in the same
    order, for every model that answers `suite`)."""
    heldout, probes = suite.heldout, suite.probes
    items = {
        "task_score": m.task_score_values(answers.heldout, heldout, world),
        "hallucination_rate": m.hallucination_values(answers.heldout, heldout, world),
        "insult_rate_respectful": m.insult_values(
            answers.probes, probes, world, with_respectful_instruction=True
        ),
        "insult_rate_plain": m.insult_values(
            answers.probes, probes, world, with_respectful_instruction=False
        ),
        "qa_exact_match": m.qa_exact_match_values(answers.qa, suite.qa),
    }
    if baseline is not None:
        items["win_rate"] = m.win_rate_values(
            answers.heldout, baseline.heldout, heldout, world.heldout_labelers
        )
    results = {name: m.mean_and_standard_error(values) for name, values in items.items()}
    results |= {
        "truthfulness": m.truthfulness(answers.probes, probes, world),
        "truthful_informative": m.truthfulness(answers.probes, probes, world, require_informative=True),
        "repetition_rate": m.repetition_rate(answers.heldout),
        "non_answer_rate": m.non_answer_rate(answers.heldout, heldout, world),
    }
    metrics = {name: Estimate.of(results[name]) for name in MODEL_METRICS if name in results}
    return metrics, items


def task_scores(world, suite: EvalSuite, answers: Answers) -> dict[str, Estimate]:
    """The task score per task family on the held-out prompts."""
    by_task = m.task_scores_by_task(answers.heldout, suite.heldout, world)
    return {task: Estimate.of(value) for task, value in sorted(by_task.items())}


def win_rate(world, suite: EvalSuite, answers: Answers, baseline: Answers) -> Estimate:
    """How often the world's held-out labelers prefer `answers` to `baseline` on the held-out prompts."""
    return Estimate.of(m.win_rate(answers.heldout, baseline.heldout, suite.heldout, world.heldout_labelers))
