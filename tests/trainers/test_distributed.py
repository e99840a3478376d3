"""Two gloo processes under torchrun end with the parameters of one process with the same global batch: DDP
and FSDP2 (fully_shard, which runs on CPU/gloo in torch >= 2.11), for SFT, the reward model and PPO.

Notes on the comparison:
- PPO samples with top_k=1 here: the sampler's noise differs between one stream and two per-rank streams,
  and with a single candidate token the rollouts no longer depend on it (everything after is exact).
- adam_eps=1e-6: some parameters have a true gradient of exactly 0 (the reward head's bias and a component
  of the final layer-norm bias under the shift-invariant ranking loss, attention key biases), so their
  gradients are pure rounding noise that Adam would normalize up to ~lr per step in either run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainers import toy

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "trainers" / "run_toy.py"
KINDS = ("sft", "rm", "ppo")
# PPO's output norm learns at its own rate: a third optimizer group, sharded and checkpointed like the others.
OVERRIDES = {
    "sft": {"adam_eps": 1e-6},
    "rm": {"adam_eps": 1e-6},
    "ppo": {"adam_eps": 1e-6, "top_k": 1, "output_norm_learning_rate": 1e-2},
}


def _torchrun(root: Path, fsdp: bool, log) -> subprocess.Popen:
    settings = [
        f"--set={kind}.{key}={value}" for kind, values in OVERRIDES.items() for key, value in values.items()
    ]
    if fsdp:
        settings += [f"--set={kind}.fsdp=true" for kind in KINDS]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(RUNNER),
        ",".join(KINDS),
        str(root),
        *settings,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_FAST_NO_PROGRESS="1")
    # A session of its own, so a timeout can end torchrun together with its workers.
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Output roots of the DDP and the FSDP2 two-process runs (launched together)."""
    roots = {mode: tmp_path_factory.mktemp(mode) for mode in ("ddp", "fsdp")}
    with contextlib.ExitStack() as stack:
        logs = {mode: stack.enter_context(open(root / "torchrun.log", "wb")) for mode, root in roots.items()}
        processes = {
            mode: _torchrun(root, fsdp=mode == "fsdp", log=logs[mode]) for mode, root in roots.items()
        }
        try:
            for mode, process in processes.items():
                process.wait(timeout=600)
                output = (roots[mode] / "torchrun.log").read_text(errors="replace")
                assert process.returncode == 0, f"{mode} run failed:\n{output[-5000:]}"
        finally:
            for process in processes.values():
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    return roots


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    for kind in KINDS:
        toy.make_trainer(kind, root / kind, **OVERRIDES[kind]).train()
    return root


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_match_one(kind, mode, two_process_runs, one_process_runs):
    difference = toy.max_difference(
        toy.final_tensors(kind, two_process_runs[mode] / kind),
        toy.final_tensors(kind, one_process_runs / kind),
    )
    assert difference <= 1e-5, difference


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_process_run_resumes_after_sigkill(kind, mode, tmp_path, one_process_runs):
    """A torchrun job SIGKILLed one step after its step-2 checkpoint, resumed by a new torchrun job, ends
    with the parameters of the uninterrupted one-process run."""
    settings = [f"--set={kind}.{key}={value}" for key, value in OVERRIDES[kind].items()]
    if mode == "fsdp":
        settings.append(f"--set={kind}.fsdp=true")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(RUNNER), kind, str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_FAST_NO_PROGRESS="1")
    with open(tmp_path / "killed.log", "wb") as log:
        job = subprocess.Popen([*command, "--pause-after=2", *settings], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            markers = [tmp_path / kind / f"paused.rank{rank}" for rank in range(2)]
            while not all(marker.exists() for marker in markers):
                assert job.poll() is None, (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "the job did not reach its pause point in time"
                time.sleep(0.2)
            for marker in markers:  # the workers run in a session of their own: kill them by pid
                os.kill(int(marker.read_text()), signal.SIGKILL)
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    resumed = subprocess.run([*command, "--resume", *settings], cwd=ROOT, env=env, capture_output=True,
                             timeout=600, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout.decode(errors="replace")[-3000:]
    difference = toy.max_difference(toy.final_tensors(kind, tmp_path / kind),
                                    toy.final_tensors(kind, one_process_runs / kind))  # fmt: skip
    assert difference <= 1e-5, difference
