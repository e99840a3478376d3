"""Checkpoints are atomic and exact: a run killed with SIGKILL and resumed ends where an uninterrupted run
ends; non-finite steps are skipped, and too many in a row abort without touching the last good checkpoint."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rlhf_fast.trainers import NonFiniteError
from rlhf_fast.trainers.checkpoint import CheckpointManager, load_safetensors
from rlhf_fast.trainers.distributed import init_distributed
from tests.helpers import lock_held_by_another_process
from tests.trainers import toy
from tests.trainers.conftest import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "trainers" / "run_toy.py"
KINDS = ("sft", "rm", "ppo")
PAUSE_AFTER = 2  # checkpoint at step 2 (save_every=2), step 3 runs, then the process is killed


# ------------------------------------------------------------------------------------- checkpoint manager


def _tiny_state():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoints_rotate_atomically_and_restore(tmp_path):
    manager = CheckpointManager(tmp_path, init_distributed("cpu"))
    model, optimizer = _tiny_state()
    generator = torch.Generator().manual_seed(3)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1.0)
        manager.save(
            models={"model": model},
            optimizer=optimizer,
            scheduler=None,
            trainer_state={"step": step},
            generators={"g": generator},
        )
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["last", "previous"]
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    draws = torch.rand(4, generator=generator)

    with torch.no_grad():
        model.weight.zero_()
    state, _ = manager.load(
        manager.latest(),
        models={"model": model},
        optimizer=optimizer,
        scheduler=None,
        generators={"g": generator},
    )
    assert state["step"] == 3
    torch.testing.assert_close(model.state_dict(), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(4, generator=generator), draws, rtol=0, atol=0)

    # A crash between the renames leaves `previous` (the older, complete one) and a stale temporary directory.
    os.rename(root / "last", tmp_path / "lost")
    (root / ".tmp-step4").mkdir()
    assert manager.latest() == root / "previous"
    manager.save(models={"model": model}, optimizer=optimizer, scheduler=None, trainer_state={"step": 4})
    assert sorted(p.name for p in root.iterdir()) == ["last", "previous"]


def test_a_nonfinite_state_is_never_written(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, init_distributed("cpu"))
    model, optimizer = _tiny_state()
    manager.save(models={"model": model}, optimizer=optimizer, scheduler=None, trainer_state={"step": 1})
    good = load_safetensors(tmp_path / "checkpoints" / "last" / "model.safetensors")
    with torch.no_grad():
        model.bias[0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.trainers"):
        assert (
            manager.save(
                models={"model": model}, optimizer=optimizer, scheduler=None, trainer_state={"step": 2}
            )
            is None
        )
    assert "not finite" in caplog.text
    kept = load_safetensors(tmp_path / "checkpoints" / "last" / "model.safetensors")
    torch.testing.assert_close(kept, good, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- SIGKILL + resume


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Each toy run in its own process, SIGKILLed one step after its step-2 checkpoint (all three at once)."""
    root = tmp_path_factory.mktemp("killed")
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_FAST_NO_PROGRESS="1")
    processes = {
        kind: subprocess.Popen(
            [sys.executable, str(RUNNER), kind, str(root), "--pause-after", str(PAUSE_AFTER)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for kind in KINDS
    }
    deadline = time.monotonic() + 300
    try:
        for kind, process in processes.items():
            marker = root / kind / "paused.rank0"
            while not marker.exists():
                if process.poll() is not None:
                    raise AssertionError(f"{kind} run exited early:\n{process.stderr.read().decode()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{kind} run did not reach its pause point in time")
                time.sleep(0.1)
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert process.returncode == -signal.SIGKILL
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_sigkill_matches_an_uninterrupted_run(kind, killed_runs, tmp_path):
    run_dir = killed_runs / kind
    state = (run_dir / "checkpoints" / "last" / "trainer_state.json").read_text()
    assert f'"step": {PAUSE_AFTER}' in state
    resumed = toy.make_trainer(kind, run_dir, resume=True)
    resumed.train()
    uninterrupted = toy.make_trainer(kind, tmp_path)
    uninterrupted.train()
    difference = toy.max_difference(toy.final_tensors(kind, run_dir), toy.final_tensors(kind, tmp_path))
    assert difference <= 1e-6, difference
    # The metrics file reads as one run: every step once, in order.
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "time/seconds" in r]
    assert steps == sorted(set(steps)) and steps[0] == 1


# -------------------------------------------------------------------------------------- non-finite steps


def _poison(trainer, kind: str, bad) -> None:
    """Makes the loss (SFT, RM) or the reward (PPO) NaN whenever `bad(step index)` is true."""
    if kind == "ppo":
        original = trainer.score
        trainer.score = lambda *a: original(*a) * (float("nan") if bad(trainer.iteration_index) else 1.0)
        return
    original = trainer.compute_loss

    def compute_loss(*args):
        first, second = original(*args)
        return (first * float("nan"), second) if bad(trainer.global_step) else (first, second)

    trainer.compute_loss = compute_loss


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    """Copies of the trained parameters (SFT: `module`, RM: `model`, PPO: `trained`)."""
    module = next(getattr(trainer, name) for name in ("module", "trained", "model") if hasattr(trainer, name))
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_steps_are_skipped_with_a_warning(kind, tmp_path, caplog):
    trainer = toy.make_trainer(kind, tmp_path, save_every=0)
    _poison(trainer, kind, lambda step: step == 1)  # the second step
    step_method = "iteration" if kind == "ppo" else "train_step"
    original = getattr(trainer, step_method)
    around_bad = []

    def record(*args, **kwargs):
        before = _snapshot(trainer)
        result = original(*args, **kwargs)
        around_bad.append((before, _snapshot(trainer)))
        return result

    setattr(trainer, step_method, record)
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.trainers"):
        trainer.train()
    assert "non-finite" in caplog.text
    records = read_jsonl(tmp_path / "metrics.jsonl")
    skipped = [r["train/skipped"] for r in records if "train/skipped" in r]
    assert skipped[1] > 0 and skipped[0] == 0 and skipped[2] == 0
    before, after = around_bad[1]
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    before, after = around_bad[2]
    assert any(not torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize("kind", KINDS)
def test_too_many_bad_steps_abort_and_keep_the_last_good_checkpoint(kind, tmp_path):
    trainer = toy.make_trainer(kind, tmp_path, save_every=1, max_bad_steps=2)
    _poison(trainer, kind, lambda step: step >= 2)  # steps 3, 4, ... are bad
    with pytest.raises(NonFiniteError, match="max_bad_steps=2"):
        trainer.train()
    last = tmp_path / "checkpoints" / "last"
    assert '"step": 2' in (last / "trainer_state.json").read_text()
    for name in toy.TRAINED_FILES[kind]:
        tensors = load_safetensors(last / f"{name}.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values())


# ------------------------------------------------------------------------- hostile or damaged checkpoints


class _Payload:
    """Unpickling this object runs code: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _two_checkpoints(tmp_path):
    """A manager with checkpoints at steps 1 (previous) and 2 (last) of a tiny model."""
    manager = CheckpointManager(tmp_path, init_distributed("cpu"))
    model, optimizer = _tiny_state()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(float(step))
        manager.save(
            models={"model": model},
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state={"step": step},
            extra={"note": "plain data"},
        )
    return manager, model, optimizer, scheduler


def _restore(manager, model, optimizer, scheduler) -> int:
    data = manager.read_latest(["model"])
    state, _ = manager.apply(data, models={"model": model}, optimizer=optimizer, scheduler=scheduler)
    return state["step"]


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_rank0.pt", "extra.pt"])
@pytest.mark.parametrize("reseal", [False, True], ids=["manifest-stale", "manifest-rewritten"])
def test_a_pickle_in_a_checkpoint_never_runs(name, reseal, tmp_path, caplog):
    """A payload planted in `last/` is refused (by the manifest, or by the weights-only unpickler when the
    manifest was rewritten to match it); resume falls back to `previous/`, naming the file."""
    from rlhf_fast.trainers.manifest import write_manifest

    manager, model, optimizer, scheduler = _two_checkpoints(tmp_path)
    last = tmp_path / "checkpoints" / "last"
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(marker)}, last / name)
    if reseal:
        write_manifest(last)
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.trainers"):
        assert _restore(manager, model, optimizer, scheduler) == 1
    assert not marker.exists()
    assert name in caplog.text and "previous" in caplog.text
    assert torch.equal(model.weight, torch.full_like(model.weight, 1.0))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", "truncate"),
        ("optimizer.pt", "truncate"),
        ("trainer_state.json", "truncate"),
        ("rng_rank0.pt", "empty"),
        ("manifest.json", "delete"),
        ("manifest.json", "garble"),
    ],
)
def test_a_damaged_last_checkpoint_falls_back_to_previous(name, damage, tmp_path, caplog):
    manager, model, optimizer, scheduler = _two_checkpoints(tmp_path)
    path = tmp_path / "checkpoints" / "last" / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "delete":
        path.unlink()
    else:
        path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="rlhf_fast.trainers"):
        assert manager.latest() == tmp_path / "checkpoints" / "previous"
        assert _restore(manager, model, optimizer, scheduler) == 1
    assert name in caplog.text


def test_no_usable_checkpoint_is_an_error_that_leaves_the_files(tmp_path):
    from rlhf_fast.trainers.checkpoint import CheckpointError

    manager, model, optimizer, scheduler = _two_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    (root / "last" / "optimizer.pt").write_bytes(b"")
    (root / "previous" / "model.safetensors").write_bytes(b"\0" * 10)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError) as error:
        _restore(manager, model, optimizer, scheduler)
    message = str(error.value)
    assert "last/: optimizer.pt" in message and "previous/: model.safetensors" in message
    assert "\n" not in message
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_resume_with_only_unusable_checkpoints_never_starts_over(tmp_path):
    from rlhf_fast.trainers.checkpoint import CheckpointError

    trainer = toy.make_trainer("sft", tmp_path, max_steps=2, save_every=1)
    trainer.train()
    last = tmp_path / "checkpoints" / "last"
    (tmp_path / "checkpoints" / "previous" / "trainer_state.json").write_text("{}")
    (last / "policy.safetensors").write_bytes(b"")
    kept = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    log = (tmp_path / "metrics.jsonl").read_bytes()
    resumed = toy.make_trainer("sft", tmp_path, max_steps=3, save_every=1, resume=True)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        resumed.train()
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == kept
    assert (tmp_path / "metrics.jsonl").read_bytes() == log


# -------------------------------------------------------------------------- non-finite weights at the end


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_weights_are_never_exported(kind, tmp_path):
    """Weights that turn non-finite in the last step (finite loss, e.g. an absurd learning rate) abort the
    run before the final checkpoint and export; the last good checkpoint stays."""
    trainer = toy.make_trainer(kind, tmp_path, save_every=1)
    step_method = "iteration" if kind == "ppo" else "train_step"
    original = getattr(trainer, step_method)

    def poisoned(*args, **kwargs):
        result = original(*args, **kwargs)
        if trainer.global_step == trainer.total_steps - 1:  # the last step
            with torch.no_grad():
                module = next(iter(trainer._checkpoint_models().values()))
                next(module.parameters()).fill_(float("inf"))
        return result

    setattr(trainer, step_method, poisoned)
    with pytest.raises(NonFiniteError, match="not finite"):
        trainer.train()
    assert not (tmp_path / "final").exists()
    last = tmp_path / "checkpoints" / "last"
    assert f'"step": {trainer.total_steps - 1}' in (last / "trainer_state.json").read_text()
    for name in toy.TRAINED_FILES[kind]:
        assert all(torch.isfinite(t).all() for t in load_safetensors(last / f"{name}.safetensors").values())


# ----------------------------------------------------------------------- the log after a resume, the lock


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stop", ["before-final-checkpoint", "during-export"])
def test_log_after_a_stop_at_the_end_equals_an_uninterrupted_run(kind, stop, tmp_path):
    """Stopped after the last step (before the final checkpoint, or during the export), then resumed: the
    metrics file holds each line once, as an uninterrupted run writes it (time/ values aside)."""

    class Stop(Exception):
        pass

    run_dir, reference_dir = tmp_path / "stopped", tmp_path / "reference"
    trainer = toy.make_trainer(kind, run_dir, save_every=1)
    if stop == "during-export":
        trainer._export = lambda: (_ for _ in ()).throw(Stop())
    else:
        save = trainer._save

        def save_unless_final(*, finished=False):
            if finished:
                raise Stop
            save(finished=finished)

        trainer._save = save_unless_final
    with pytest.raises(Stop):
        trainer.train()
    resumed = toy.make_trainer(kind, run_dir, save_every=1, resume=True)
    resumed.train()
    assert (run_dir / "final" / "config.json").is_file()
    toy.make_trainer(kind, reference_dir, save_every=1).train()

    def lines(directory):
        records = read_jsonl(directory / "metrics.jsonl")
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]

    assert lines(run_dir) == lines(reference_dir)


def test_a_second_run_in_one_output_directory_is_refused(tmp_path):
    from rlhf_fast.trainers.lock import OutputLocked, lock_output_dir

    with lock_held_by_another_process(tmp_path) as holder:
        trainer = toy.make_trainer("sft", tmp_path, max_steps=1)
        with pytest.raises(OutputLocked, match=f"process {holder.pid} on host "):
            trainer.train()
        assert not (tmp_path / "metrics.jsonl").exists()
    with lock_output_dir(tmp_path):  # the holder died (SIGKILL): its lock is taken over
        pass


def test_a_checkpoint_of_another_model_is_an_error_naming_it(tmp_path):
    from rlhf_fast.trainers.checkpoint import CheckpointError

    manager, _model, _optimizer, _scheduler = _two_checkpoints(tmp_path)
    other = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="does not fit the models") as error:
        manager.apply(
            manager.read_latest(["model"]), models={"model": other}, optimizer=optimizer, scheduler=None
        )
    assert str(tmp_path / "checkpoints" / "last") in str(error.value) and "\n" not in str(error.value)


def test_guarded_step_takes_a_precomputed_norm_and_skips_when_it_is_not_finite():
    from rlhf_fast.trainers._common import guarded_step, make_optimizer
    from rlhf_fast.trainers.ppo_config import PPOConfig

    ctx = init_distributed("cpu")
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model.parameters(), PPOConfig(learning_rate=0.1), torch.device("cpu"))
    loss = torch.tensor(1.0)
    for norm, skipped in ((float("nan"), True), (float("inf"), True), (2.0, False)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        before = [p.detach().clone() for p in model.parameters()]
        returned, bad = guarded_step(
            optimizer, list(model.parameters()), loss, ctx, max_grad_norm=None, grad_norm=torch.tensor(norm)
        )
        changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert bool(bad) is skipped and changed is not skipped, norm
        assert returned.item() == norm or (math.isnan(norm) and math.isnan(returned.item()))
    with pytest.raises(ValueError, match="max_grad_norm=None"):
        guarded_step(
            optimizer, list(model.parameters()), loss, ctx, max_grad_norm=1.0, grad_norm=torch.tensor(1.0)
        )
