"""The demo pipeline end to end on the `smoke` preset: every stage runs, the report has every model and metric,
the targets are reported (the smoke run is far too small to meet them), and a rerun reuses finished stages."""

import json

import pytest

from rlhf_fast.eval.report import METRICS
from rlhf_fast.eval.suite import MODEL_METRICS
from rlhf_fast.pipeline import check_targets, get_preset, run_demo

RM_METRICS = ("rm_agreement_heldout", "rm_agreement_train", "rm_accuracy")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    results = run_demo("smoke", out, seed=0, console=lines.append)
    return out, results, lines


def test_report_files_exist(smoke_run):
    out, _, _ = smoke_run
    report = out / "report"
    for name in (
        "report.md",
        "report.json",
        "samples.md",
        "figure1_win_rate.png",
        "ppo_training.png",
        "metrics.png",
        "evaluation_table.png",
    ):
        assert (report / name).stat().st_size > 0, name
    for name in ("pretrain.jsonl", "demonstrations.jsonl", "rankings.jsonl", "prompts_heldout.jsonl"):
        assert (out / "data" / name).stat().st_size > 0, name


def test_report_json_has_every_model_and_metric(smoke_run):
    out, _, _ = smoke_run
    report = json.loads((out / "report" / "report.json").read_text())
    preset = get_preset("smoke")
    sizes = preset.model_sizes
    models = {model["name"]: model for model in report["models"]}
    best_of = f"best_of_{preset.eval_best_of}-{sizes[-1]}"  # the largest SFT model's best-of-n by the RM
    trained = {f"{kind}-{size}" for kind in ("base", "sft", "ppo", "ppo_ptx") for size in sizes}
    oracle = f"ppo_oracle-{sizes[-1]}"  # PPO from the largest SFT model against the labelers' own utility
    assert set(models) == trained | {best_of, oracle}
    assert models[best_of]["kind"] == "best_of" and models[best_of]["size"] == sizes[-1]
    assert models[oracle]["kind"] == "ppo_oracle" and models[oracle]["size"] == sizes[-1]
    assert "labelers' own utility" in (out / "report" / "report.md").read_text()
    for name, entry in models.items():
        assert set(MODEL_METRICS) | {"win_rate_same_size"} <= set(entry["metrics"]), name
        for metric in MODEL_METRICS:
            value = entry["metrics"][metric]["value"]
            assert 0.0 <= value <= 1.0, (name, metric, value)
        assert entry["params"] > 0 and entry["task_scores"], name
    # The baseline against itself: every response ties.
    assert models[f"sft-{sizes[-1]}"]["metrics"]["win_rate"]["value"] == 0.5
    assert models[f"sft-{sizes[-1]}"]["metrics"]["win_rate_same_size"]["value"] == 0.5
    (rm,) = report["reward_models"]
    assert set(RM_METRICS) <= set(rm["metrics"])
    assert set(report["ppo_history"]) == {f"{k}-{s}" for k in ("ppo", "ppo_ptx") for s in sizes}
    assert all(len(steps) == get_preset("smoke").ppo_iterations for steps in report["ppo_history"].values())
    assert {"pretrain", "sft", "rm", "ppo", "eval", "total", "total_cpu"} <= set(report["timings"])
    assert set(MODEL_METRICS) <= set(METRICS)  # every metric has a label in the report


def test_targets_are_reported_met_or_not_with_their_standard_errors(smoke_run):
    out, results, lines = smoke_run
    targets = json.loads((out / "report" / "report.json").read_text())["targets"]
    expected = check_targets(results, get_preset("smoke").model_sizes)
    assert len(targets) == len(expected) >= 12
    assert all(isinstance(t["met"], bool) and t["target"] and "se" in t for t in targets)
    assert [t["target"] for t in targets] == [t.target for t in expected]
    marked = [line for line in lines if line.lstrip().startswith(("MET ", "MISS "))]
    assert len(marked) == len(expected)
    markdown = (out / "report" / "report.md").read_text()
    assert all(t.target in markdown for t in expected)
    # One start line per stage (world, pretrain, sft, the RM's backbone (pretrain, sft), the samples it learns
    # from, rm, ppo x2, ppo against the labelers, eval), each closed by a "done" line.
    stage_lines = [line for line in lines if line.startswith("[")]
    done = [line for line in stage_lines if " done in " in line]
    assert len(done) == 11 and len(stage_lines) == 2 * len(done)


def test_rerun_reuses_finished_stages(smoke_run):
    out, results, _ = smoke_run
    lines: list[str] = []
    again = run_demo("smoke", out, seed=0, console=lines.append)
    reused = [line for line in lines if line.endswith(("-tiny", "/rm")) and "reused from" in line]
    # base, sft, the RM's backbone (base, sft), its samples, rm, ppo, ppo_ptx, ppo against the labelers
    assert len(reused) == 9
    assert again.to_json()["models"] == results.to_json()["models"]
    assert again.to_json()["targets"] == results.to_json()["targets"]
    # Each stage's thread count is recorded when it runs and reported again when it is reused.
    record = json.loads((out / "rm" / "stage.json").read_text())
    assert isinstance(record["threads"], int) and record["threads"] >= 1
    (threads_note,) = [note for note in again.to_json()["notes"] if note.startswith("CPU threads per stage")]
    assert "rm" in threads_note and "bit for bit" in threads_note


def test_stages_side_by_side_give_the_numbers_of_stages_one_after_another(tmp_path):
    import hashlib

    import torch

    before = torch.get_num_threads()
    lines: list[str] = []
    try:
        one = run_demo("smoke", tmp_path / "one", seed=0, console=lambda line: None, threads=1, jobs=1)
        two = run_demo("smoke", tmp_path / "two", seed=0, console=lines.append, threads=1, jobs=2)
    finally:
        torch.set_num_threads(before)
    assert two.to_json()["models"] == one.to_json()["models"]
    assert two.to_json()["targets"] == one.to_json()["targets"]

    def weights(out):
        return {
            path.relative_to(out).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(out.glob("*/final/*.safetensors"))
        }

    assert weights(tmp_path / "two") == weights(tmp_path / "one") != {}
    # Side by side, each stage's progress bars went to a log of its own, its console lines to the console.
    assert {path.stem for path in (tmp_path / "two" / "logs").glob("*.log")} > {"rm", "ppo-tiny"}
    assert not (tmp_path / "one" / "logs").exists()
    assert sum(" done in " in line for line in lines) == 11 and any("at a time" in line for line in lines)
    # Every stage ran with the one thread asked for, and the report says so.
    records = [json.loads(path.read_text()) for path in (tmp_path / "two").glob("*/stage.json")]
    assert records and all(record["threads"] == 1 for record in records)
    (note,) = [n for n in two.to_json()["notes"] if n.startswith("CPU threads per stage")]
    assert "set by --threads" in note and "1 thread:" in note and "2 threads" not in note
    # A rerun after two PPO stages were lost runs those two side by side and reuses the rest.
    import shutil

    for name in ("ppo-tiny", "ppo_ptx-tiny"):
        shutil.rmtree(tmp_path / "two" / name)
    lines.clear()
    try:
        again = run_demo("smoke", tmp_path / "two", seed=0, console=lines.append, threads=1, jobs=2)
    finally:
        torch.set_num_threads(before)
    assert again.to_json()["models"] == one.to_json()["models"]
    assert sum(" done in " in line for line in lines) == 4  # the world, the two PPO stages, the evaluation
    assert sum("reused from" in line for line in lines) == 7
    for option in ("threads", "jobs"):
        with pytest.raises(ValueError, match=option):
            run_demo("smoke", tmp_path / "other", seed=0, console=lines.append, **{option: 0})
