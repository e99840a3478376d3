import collections

import pytest

from rlhf_fast.eval.metrics import mean_and_standard_error
from rlhf_fast.eval.results import Estimate, ModelResult, Results, RewardModelResult
from rlhf_fast.pipeline.targets import check_targets

RECOVERY = "PPO-ptx recovers at least half of PPO's QA regression (share recovered)"


def results_with_qa(sft: float, ppo: float, ptx: float, se: float) -> Results:
    """Every metric of every model 0.5 ± 0.01 except the largest size's QA exact match."""
    models = []
    for size in ("tiny", "small"):
        for kind in ("base", "sft", "ppo", "ppo_ptx"):
            metrics = collections.defaultdict(lambda: Estimate(0.5, 0.01))
            if size == "small" and kind != "base":
                metrics["qa_exact_match"] = Estimate({"sft": sft, "ppo": ppo, "ppo_ptx": ptx}[kind], se)
            models.append(ModelResult(f"{kind}-{size}", kind, size, metrics=metrics))
    reward_model = RewardModelResult(
        "rm-small", "small", metrics={"rm_agreement_heldout": Estimate(0.7, 0.02)}
    )
    return Results(models, reward_models=[reward_model], labeler_agreement=Estimate(0.72, 0.02))


@pytest.mark.parametrize(
    ("sft", "ppo", "ptx", "se", "met"),
    [
        (0.50, 0.10, 0.35, 0.03, True),  # a tax of 0.40, 62% of it won back
        (0.50, 0.10, 0.25, 0.03, False),  # a tax of 0.40, 38% won back
        (0.50, 0.48, 0.55, 0.03, False),  # 0.02 below SFT: no tax shows, so none is recovered
        (0.50, 0.55, 0.60, 0.03, False),  # PPO above SFT
    ],
)
def test_ptx_recovers_only_a_tax_that_shows(sft, ppo, ptx, se, met):
    targets = {t.target: t for t in check_targets(results_with_qa(sft, ppo, ptx, se), ("tiny", "small"))}
    recovery = targets[RECOVERY]
    assert recovery.met is met
    tax_shows = targets["the alignment tax: PPO (small) QA exact match below SFT's by > 2 SE"].met
    assert ("no alignment tax to recover" in recovery.detail) is (not tax_shows)


HALLUCINATION = "PPO (small) hallucinates less than SFT, by > 2 SE"


@pytest.mark.parametrize("paired", [True, False])
def test_hallucination_is_compared_prompt_by_prompt(paired):
    """PPO hallucinates on 8 fewer of 100 prompts, most of them hard for both: the per-prompt differences
    show it (> 2 SE); the two rates as independent estimates do not."""
    sft = [1.0] * 40 + [1.0] * 8 + [0.0] * 52
    ppo = [1.0] * 40 + [0.0] * 8 + [0.0] * 52
    results = results_with_qa(0.5, 0.1, 0.35, 0.03)
    for name, values in (("sft-small", sft), ("ppo-small", ppo)):
        model = results.model(name)
        model.metrics["hallucination_rate"] = Estimate(*mean_and_standard_error(values))
        if paired:
            model.items["hallucination_rate"] = values
    targets = {t.target: t for t in check_targets(results, ("tiny", "small"))}
    hallucination = targets[HALLUCINATION]
    assert hallucination.value == pytest.approx(0.08)
    assert hallucination.met is paired
    assert "0.480 ± 0.050 vs 0.400 ± 0.049" in hallucination.detail
