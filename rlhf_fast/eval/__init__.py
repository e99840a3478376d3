"""Evaluation in the paper's terms: win rate judged by held-out labelers, reward-model agreement,
truthfulness, hallucination, insults, the QA benchmark (alignment tax), and the report."""

from rlhf_fast.eval.metrics import (
    Comparison,
    contrast,
    hallucination_rate,
    insult_rate,
    labeler_agreement,
    make_comparisons,
    mean_and_standard_error,
    non_answer_rate,
    paired_difference,
    qa_exact_match,
    repetition_rate,
    rm_agreement,
    task_score,
    task_scores_by_task,
    truthfulness,
    win_rate,
)
from rlhf_fast.eval.report import format_summary_table, write_report
from rlhf_fast.eval.results import Estimate, ModelResult, PPOStep, Results, RewardModelResult, Target

__all__ = [
    "Comparison",
    "Estimate",
    "ModelResult",
    "PPOStep",
    "Results",
    "RewardModelResult",
    "Target",
    "contrast",
    "format_summary_table",
    "generate_responses",
    "hallucination_rate",
    "insult_rate",
    "labeler_agreement",
    "make_comparisons",
    "mean_and_standard_error",
    "non_answer_rate",
    "paired_difference",
    "qa_exact_match",
    "repetition_rate",
    "rm_agreement",
    "task_score",
    "task_scores_by_task",
    "truthfulness",
    "win_rate",
    "write_report",
]


def __getattr__(name):
    # generate_responses needs torch and the sampler; importing the metrics should not.
    if name == "generate_responses":
        from rlhf_fast.eval.generate import generate_responses

        return generate_responses
    raise AttributeError(f"module 'rlhf_fast.eval' has no attribute {name!r}")
