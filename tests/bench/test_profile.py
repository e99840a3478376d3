"""The profiler in-process: phases that add up to the step time, memory, tokens/s, mismatch, trace."""

from __future__ import annotations

import json
import time

import pytest
import torch

from rlhf_fast.bench.profile import MISMATCH_METRIC, PHASES, format_report, profile_trainer
from rlhf_fast.trainers.phases import phase
from tests.trainers.toy import make_trainer


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def assert_adds_up(report) -> None:
    """The phases, "other" included, sum to the mean measured step; "other" is not a negative fudge."""
    mean = report.mean_step_seconds
    total = sum(report.phase_seconds.values())
    assert total == pytest.approx(mean, rel=0.05)
    assert report.phase_seconds["other"] >= -0.05 * mean


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_epoch_trainers_report_their_four_phases(tmp_path, command):
    trainer = make_trainer(command, tmp_path / "run")
    report = profile_trainer(trainer, command, iterations=2, warmup=1)
    assert list(report.phase_seconds) == [*PHASES[command], "other"]
    assert all(report.phase_seconds[name] > 0 for name in PHASES[command])
    assert_adds_up(report)
    assert report.iterations == 2 and len(report.step_seconds) == 2
    assert report.tokens_per_step > 0 and report.tokens_per_second > 0
    assert report.peak_memory_bytes > 10 * 2**20 and report.peak_memory_kind.startswith("process VmHWM")
    assert report.host_syncs_per_step is None  # counted on CUDA only
    assert report.logprob_mismatch is None
    assert trainer.global_step == 3  # warm-up + measured steps ran as training steps
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    text = "\n".join(format_report(report))
    assert "forward" in text and "tokens/s" in text and "peak memory" in text


def test_ppo_without_marks_is_all_other_and_measures_the_mismatch(tmp_path):
    trainer = make_trainer("ppo", tmp_path / "run")
    report = profile_trainer(trainer, "ppo", iterations=1, warmup=0)
    if "phase" in type(trainer).iteration.__code__.co_names:  # iteration() marks its phases
        assert set(report.phase_seconds) - {"other"} <= set(PHASES["ppo"]) and len(report.phase_seconds) > 2
    else:  # no marks: the whole iteration is "other", and the report says why
        assert list(report.phase_seconds) == ["other"]
        assert "marks no phases" in "\n".join(format_report(report))
    assert_adds_up(report)
    assert report.tokens_per_step > 0 and report.token_kind == "generated response tokens"
    assert report.logprob_mismatch_source in (
        "recomputed once by the profiler",
        f"the trainer's {MISMATCH_METRIC} metric",
    )
    if report.logprob_mismatch_source.startswith("recomputed"):
        # fp32 on a CPU: the sampler's log-probs and the scoring forward agree to rounding
        assert 0 <= report.logprob_mismatch["mean_abs"] <= report.logprob_mismatch["max_abs"] < 1e-3


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_ppo_phases_and_a_logged_mismatch_are_read(tmp_path, monkeypatch):
    """Marked phases (nested ones too) and "other" add up to the iteration, and a trainer that logs the
    mismatch metric is read rather than recomputed (an iteration standing in for PPOTrainer.iteration)."""
    trainer = make_trainer("ppo", tmp_path / "run")

    def marked(prompt_ids, prompt_mask, pretrain_blocks=None):
        with phase("rollout"):
            time.sleep(0.002)
        with phase("score/reference"):
            time.sleep(0.001)
        with phase("update"), phase("update/inner"):
            time.sleep(0.01)
        time.sleep(0.001)  # unmarked: "other"
        return {"train/response_tokens": torch.tensor(10.0), MISMATCH_METRIC: torch.tensor(0.25)}

    monkeypatch.setattr(trainer, "iteration", marked)
    report = profile_trainer(trainer, "ppo", iterations=2, warmup=0)
    assert list(report.phase_seconds) == ["rollout", "score/reference", "update", "other"]
    assert list(report.nested_seconds) == ["update/inner"]
    assert report.phase_seconds["update"] >= 0.01 and report.phase_seconds["other"] >= 0.001
    assert_adds_up(report)
    assert report.tokens_per_step == 10.0
    assert report.logprob_mismatch == {"mean": 0.25}
    assert MISMATCH_METRIC in report.logprob_mismatch_source
    lines = format_report(report)
    assert any(line.strip().startswith("update/inner") for line in lines)


def test_trace_holds_the_phases(tmp_path):
    trainer = make_trainer("sft", tmp_path / "run")
    trace = tmp_path / "trace.json"
    report = profile_trainer(trainer, "sft", iterations=1, warmup=0, trace=str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    assert {"data", "forward", "backward", "optimizer"} <= names
    assert report.trace == str(trace)
    json.dumps(report.to_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="command"):
        profile_trainer(object(), "dpo")
    with pytest.raises(ValueError, match="iterations"):
        profile_trainer(object(), "sft", iterations=0)
