"""The benchmark runner and the profiler on a CUDA device (run with -m cuda on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import _extension
from rlhf_fast.bench.profile import profile_trainer
from rlhf_fast.bench.runner import run
from tests.trainers.toy import make_trainer

pytestmark = pytest.mark.cuda


def test_gpu_suite_times_against_the_baseline_with_floor_and_memory():
    report = run(["gae", "ranking", "ppo_loss"], "gpu", rounds=2, echo=lambda line: None)
    assert report["device_type"] == "cuda"
    for result in report["results"]:
        assert result["floor_s"] is not None and result["floor_s"] > 0, result["case"]
        names = [row["contender"] for row in result["rows"]]
        assert result["baseline"] in names
        if _extension.has_cuda_kernels():
            assert "rlhf_fast cuda" in names, result["skipped"]
        assert all(row["peak_extra_bytes"] is not None for row in result["rows"])


@pytest.mark.parametrize("command", ["sft", "ppo"])
def test_profile_on_cuda_counts_host_syncs(tmp_path, command):
    trainer = make_trainer(command, tmp_path / "run", device="cuda")
    report = profile_trainer(trainer, command, iterations=2, warmup=1)
    assert report.device_type == "cuda" and report.peak_memory_kind == "CUDA max allocated"
    assert report.peak_memory_bytes > 0
    assert report.host_syncs_per_step is not None and report.host_syncs_per_step >= 1  # the metrics read
    total = sum(report.phase_seconds.values())
    assert total == pytest.approx(report.mean_step_seconds, rel=0.05)
    if command == "ppo":
        assert report.logprob_mismatch is not None
    torch.cuda.synchronize()
