import json

import pytest

from rlhf_fast.eval import format_summary_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(with_history=True):
    models = {}
    for size, params in (("tiny", 120_000), ("small", 850_000)):
        for kind, win in (("base", 0.2), ("sft", 0.5), ("ppo", 0.62), ("ppo_ptx", 0.6)):
            models[f"{kind}-{size}"] = {
                "kind": kind,
                "size": size,
                "params": params,
                "metrics": {
                    "win_rate": [win + (0.05 if size == "small" else 0.0), 0.02],
                    "truthfulness": (0.4 if kind == "base" else 0.7, 0.03),
                    "hallucination_rate": {"value": 0.3, "se": 0.04},
                    "insult_rate_respectful": [0.1, 0.01],
                    "insult_rate_plain": [0.2, 0.02],
                    "qa_exact_match": [0.8 if kind != "ppo" else 0.6, float("nan")],
                    "custom_metric": 1.0,
                },
            }
    results = {
        "title": "Test report",
        "win_rate_baseline": "SFT (small)",
        "models": models,
        "reward_models": {
            "rm-tiny": {"size": "tiny", "params": 120_000, "metrics": {"rm_agreement_heldout": [0.7, 0.01]}}
        },
        "labeler_agreement": [0.77, 0.01],
        "timings": {"pretrain": 60.5, "sft": 30.0},
        "config": {"seed": 0},
        "notes": ["a note"],
    }
    if with_history:
        results["ppo_history"] = {
            "ppo-tiny": [{"iteration": i, "reward": 0.1 * i, "kl": 0.01 * i} for i in range(20)],
            "ppo_ptx-tiny": [
                {"iteration": i, "objective/scores": 0.08 * i, "objective/kl": 0.02 * i} for i in range(20)
            ],
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
    assert report["models"]["sft-tiny"]["metrics"]["win_rate"] == [0.5, 0.02]
    assert report["models"]["ppo-small"]["metrics"]["qa_exact_match"] == [0.6, None]  # NaN -> null
    assert report["figures"]["figure1"] == "figure1_win_rate.png"


def test_report_without_history_or_win_rate_skips_those_figures(tmp_path):
    results = _results(with_history=False)
    for model in results["models"].values():
        del model["metrics"]["win_rate"]
    paths = write_report(results, tmp_path)
    assert "ppo_training" not in paths
    assert "figure1" not in paths
    assert paths["metrics"].exists()
    assert paths["report_md"].exists()


def test_models_may_be_a_list_and_sizes_need_no_params(tmp_path):
    results = {
        "models": [
            {"name": "a", "kind": "sft", "size": "s", "metrics": {"win_rate": 0.5}},
            {"name": "b", "kind": "ppo", "size": "m", "metrics": {"win_rate": [0.7, 0.1]}},
        ]
    }
    paths = write_report(results, tmp_path)
    assert paths["figure1"].read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="name"):
        write_report({"models": [{"kind": "sft"}]}, tmp_path)
    with pytest.raises(ValueError, match="results"):
        write_report([1, 2], tmp_path)


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
