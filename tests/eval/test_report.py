import json
import math

import numpy as np
import pytest

from rlhf_fast.eval import (
    Estimate,
    ModelResult,
    PPOStep,
    Results,
    RewardModelResult,
    Target,
    format_summary_table,
    mean_and_standard_error,
    paired_difference,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(with_history=True) -> Results:
    models = []
    for size, params in (("tiny", 120_000), ("small", 850_000)):
        for kind, win in (("base", 0.2), ("sft", 0.5), ("ppo", 0.62), ("ppo_ptx", 0.6)):
            models.append(
                ModelResult(
                    name=f"{kind}-{size}",
                    kind=kind,
                    size=size,
                    params=params,
                    metrics={
                        "win_rate": Estimate(win + (0.05 if size == "small" else 0.0), 0.02),
                        "truthfulness": Estimate(0.4 if kind == "base" else 0.7, 0.03),
                        "hallucination_rate": Estimate(0.3, 0.04),
                        "insult_rate_respectful": Estimate(0.1, 0.01),
                        "insult_rate_plain": Estimate(0.2, 0.02),
                        "qa_exact_match": Estimate(0.8 if kind != "ppo" else 0.6),
                        "custom_metric": Estimate(1.0),
                    },
                )
            )
    results = Results(
        title="Test report",
        win_rate_baseline="SFT (small)",
        models=models,
        reward_models=[
            RewardModelResult("rm-tiny", "tiny", 120_000, {"rm_agreement_heldout": Estimate(0.7, 0.01)})
        ],
        labeler_agreement=Estimate(0.77, 0.01),
        targets=[
            Target("the RM agrees", 0.7, 0.01, True),
            Target("PPO hallucinates less", 0.01, 0.02, False, "SFT vs PPO"),
        ],
        timings={"pretrain": 60.5, "sft": 30.0},
        config={"seed": 0, "ratio": math.nan},
        notes=["a note"],
    )
    if with_history:
        results.ppo_history = {
            "ppo-tiny": [PPOStep(i, 0.1 * i, 0.01 * i) for i in range(20)],
            "ppo_ptx-tiny": [PPOStep(i, 0.08 * i, 0.02 * i, entropy=1.0) for i in range(20)],
        }
    return results


def test_write_report_writes_every_file(tmp_path):
    paths = write_report(_results(), tmp_path)
    expected = {"figure1", "ppo_training", "metrics", "evaluation_table", "report_md", "report_json"}
    assert set(paths) == expected
    for name in ("figure1", "ppo_training", "metrics", "evaluation_table"):
        data = paths[name].read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000
    markdown = paths["report_md"].read_text()
    assert "| ppo_ptx-small | PPO-ptx | small | 850K | 0.650 ± 0.020 |" in markdown
    assert "0.600 |" in markdown or "0.600 " in markdown  # a metric without SE shows the bare value
    for figure in ("figure1_win_rate.png", "ppo_training.png", "metrics.png"):
        assert f"({figure})" in markdown
    report = json.loads(paths["report_json"].read_text())
    models = {model["name"]: model for model in report["models"]}
    assert models["sft-tiny"]["metrics"]["win_rate"] == {"value": 0.5, "se": 0.02}
    assert models["ppo-small"]["metrics"]["qa_exact_match"] == {"value": 0.6, "se": None}  # NaN -> null
    assert report["figures"]["figure1"] == "figure1_win_rate.png"
    assert report["config"]["ratio"] is None


def test_report_states_each_target_with_its_value_and_standard_error(tmp_path):
    markdown = write_report(_results(), tmp_path)["report_md"].read_text()
    assert "## Targets: 1 of 2 met" in markdown
    assert "| MET | the RM agrees | 0.700 | 0.010 |" in markdown
    assert "| MISS | PPO hallucinates less | 0.010 | 0.020 | SFT vs PPO |" in markdown
    assert "What this shows" in markdown and "What it does not" in markdown


def test_report_without_history_or_win_rate_skips_those_figures(tmp_path):
    results = _results(with_history=False)
    for model in results.models:
        del model.metrics["win_rate"]
    paths = write_report(results, tmp_path)
    assert "ppo_training" not in paths
    assert "figure1" not in paths
    assert paths["metrics"].exists()
    assert paths["report_md"].exists()


def test_sizes_need_no_params_and_results_must_be_typed(tmp_path):
    results = Results(
        models=[
            ModelResult("a", "sft", "s", metrics={"win_rate": Estimate(0.5)}),
            ModelResult("b", "ppo", "m", metrics={"win_rate": Estimate(0.7, 0.1)}),
        ]
    )
    paths = write_report(results, tmp_path)
    assert paths["figure1"].read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="results"):
        write_report({"models": []}, tmp_path)
    with pytest.raises(KeyError, match="no model named"):
        results.model("c")


def test_summary_table_lists_every_model_in_size_then_method_order():
    text = format_summary_table(_results())
    lines = text.splitlines()
    names = [line.split()[0] for line in lines[2:10]]
    assert names == [
        "base-tiny",
        "sft-tiny",
        "ppo-tiny",
        "ppo_ptx-tiny",
        "base-small",
        "sft-small",
        "ppo-small",
        "ppo_ptx-small",
    ]
    assert "0.650±0.020" in text
    assert "Win rate" in lines[0]
    assert "SFT (small)" in lines[-1]


def test_estimate_difference_adds_standard_errors_in_quadrature():
    difference = Estimate(0.5, 0.03).minus(Estimate(0.2, 0.04))
    assert difference.value == pytest.approx(0.3) and difference.se == pytest.approx(0.05)
    assert Estimate(0.25).format() == "0.250" and Estimate(0.25, 0.01).format() == "0.250 ± 0.010"


def test_results_contrast_pairs_by_prompt_where_every_model_holds_the_values():
    rng = np.random.default_rng()
    n = int(rng.integers(10, 50))
    shared = rng.random(n)
    values = {name: shared + 0.3 * rng.random(n) for name in ("sft-small", "ppo-small", "ppo_ptx-small")}
    models = [
        ModelResult(
            name,
            name.split("-")[0],
            "small",
            metrics={"task_score": Estimate(*mean_and_standard_error(v))},
            items={"task_score": list(v)},
        )
        for name, v in values.items()
    ]
    results = Results(models)
    weights = {"ppo_ptx-small": 1.0, "sft-small": -0.5, "ppo-small": -0.5}
    combined = values["ppo_ptx-small"] - 0.5 * values["sft-small"] - 0.5 * values["ppo-small"]
    paired = results.contrast(weights, "task_score")
    assert paired.value == pytest.approx(combined.mean(), rel=1e-12)
    assert paired.se == pytest.approx(combined.std(ddof=1) / math.sqrt(n), rel=1e-12)
    difference = results.difference("ppo-small", "sft-small", "task_score")
    assert (difference.value, difference.se) == pytest.approx(
        paired_difference(values["ppo-small"], values["sft-small"]), rel=1e-12
    )
    # A model without per-prompt values: the estimates as independent, SEs in quadrature.
    results.model("sft-small").items.clear()
    independent = results.difference("ppo-small", "sft-small", "task_score")
    expected = results.metric("ppo-small", "task_score").minus(results.metric("sft-small", "task_score"))
    assert (independent.value, independent.se) == pytest.approx((expected.value, expected.se), rel=1e-12)
    assert independent.se > 2 * difference.se  # what the shared part of the prompts costs unpaired
    with pytest.raises(ValueError, match="weights"):
        results.contrast({}, "task_score")


def test_report_json_leaves_out_per_prompt_values(tmp_path):
    results = _results()
    results.models[0].items = {"win_rate": [1.0, 0.0, 0.5]}
    write_report(results, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert all("items" not in model for model in data["models"])
    assert results.models[0].items == {"win_rate": [1.0, 0.0, 0.5]}
