"""The command line against damaged or hostile runs and inputs: every failure is one line naming the path or
field, exit status 2 (1 for a run stopped by its own safety check); checkpoints are never overwritten or
executed; seeds reproduce the weights bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import demonstrations, error_line, write_lines
from tests.helpers import lock_held_by_another_process

GOOD = {"prompt": "w1 w2", "response": "w3"}


def _sft(model_dir, data, out, *extra):
    return ("sft", "--model", model_dir, "--data", data, "--out", out, "--set", "batch_size=2", *extra)


def _short_sft(model_dir, data_dir, out, *extra):
    return _sft(
        model_dir, data_dir / "demos.jsonl", out, "--set", "max_steps=2", "--set", "save_every=1", *extra
    )


def _files(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def _metrics(path: Path) -> list[dict]:
    """metrics.jsonl without the timing values (which differ between runs)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


# ------------------------------------------------------------------------------------------ config values


@pytest.mark.parametrize(
    "setting, field",
    [
        ("learning_rate=.inf", "learning_rate"),
        ("max_grad_norm=.nan", "max_grad_norm"),
        ("adam_betas=[0.9, -.inf]", "adam_betas[1]"),
        ("warmup=1e400", None),  # an int field: not a number YAML turns into an int
    ],
)
def test_nonfinite_settings_are_refused(cli, tmp_path, model_dir, no_weights, setting, field):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    code, _out, err = cli(*_sft(model_dir, data, tmp_path / "run", "--set", setting))
    message = error_line(err)
    assert code == 2
    if field is not None:
        assert field in message and "finite" in message, message
    assert not (tmp_path / "run").exists()


def test_nonfinite_number_in_a_config_file(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    config = tmp_path / "cfg.yaml"
    config.write_text("learning_rate: .inf\n")
    code, _out, err = cli(*_sft(model_dir, data, tmp_path / "run", "--config", config))
    assert code == 2 and "learning_rate" in error_line(err)


def test_every_float_field_of_every_trainer_config_must_be_finite():
    """The check is generic: a float field added later is covered without naming it."""
    import dataclasses

    from rlhf_fast import PPOConfig, RewardConfig, SFTConfig

    for config_class in (SFTConfig, RewardConfig, PPOConfig):
        config_class().check()
        floats = [
            f.name
            for f in dataclasses.fields(config_class)
            if isinstance(getattr(config_class(), f.name), float)
        ]
        assert len(floats) >= 3, floats
        for name in floats:
            for bad in (float("inf"), float("-inf"), float("nan")):
                with pytest.raises(ValueError, match=name):
                    dataclasses.replace(config_class(), **{name: bad}).check()


# --------------------------------------------------------------------------------------------- --resume


def test_resume_into_unusable_checkpoints_stops_and_keeps_them(
    cli, tmp_path, model_dir, data_dir, no_progress
):
    out = tmp_path / "run"
    assert cli(*_short_sft(model_dir, data_dir, out))[0] == 0
    checkpoints = out / "checkpoints"
    (checkpoints / "last" / "policy.safetensors").write_bytes(b"")
    state = checkpoints / "previous" / "trainer_state.json"
    state.write_text(state.read_text()[:10])
    before = _files(out)
    code, _out, err = cli(*_short_sft(model_dir, data_dir, out, "--set", "max_steps=4", "--resume"))
    message = error_line(err)
    assert code == 2
    assert str(checkpoints) in message and "policy.safetensors" in message and "trainer_state.json" in message
    assert _files(out) == before


def test_resume_passes_over_a_damaged_last_checkpoint(cli, tmp_path, model_dir, data_dir, no_progress):
    out = tmp_path / "run"
    assert cli(*_short_sft(model_dir, data_dir, out))[0] == 0
    optimizer = out / "checkpoints" / "last" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    code, stdout, err = cli(*_short_sft(model_dir, data_dir, out, "--set", "max_steps=3", "--resume"))
    assert code == 0, err
    assert "optimizer.pt" in err and "previous" in err
    assert "3 steps (2 after resuming at 1)" in stdout


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_planted_pickle_never_runs_on_resume(cli, tmp_path, model_dir, data_dir, no_progress):
    from rlhf_fast.trainers.manifest import write_manifest

    out = tmp_path / "run"
    assert cli(*_short_sft(model_dir, data_dir, out))[0] == 0
    marker = tmp_path / "code-ran"
    for checkpoint in ("last", "previous"):
        directory = out / "checkpoints" / checkpoint
        torch.save({"state": _Payload(marker)}, directory / "rng_rank0.pt")
        write_manifest(directory)  # the manifest is no defence against a writer: the loader must refuse
    code, _out, err = cli(*_short_sft(model_dir, data_dir, out, "--resume"))
    assert code == 2 and "rng_rank0.pt" in error_line(err)
    assert not marker.exists()


def test_resume_with_no_checkpoint_says_it_starts_over(cli, tmp_path, model_dir, data_dir, no_progress):
    code, _stdout, err = cli(*_short_sft(model_dir, data_dir, tmp_path / "run", "--resume"))
    assert code == 0 and "starting from the beginning" in err


# ------------------------------------------------------------------------- the end of a run, the log


def test_nonfinite_weights_are_not_exported(cli, tmp_path, model_dir, data_dir, no_progress, monkeypatch):
    from rlhf_fast.trainers.sft import SFTTrainer

    train_step = SFTTrainer.train_step

    def blow_up(self, examples):
        metrics = train_step(self, examples)
        with torch.no_grad():
            next(self.policy.parameters()).fill_(float("inf"))  # a finite loss, non-finite weights
        return metrics

    monkeypatch.setattr(SFTTrainer, "train_step", blow_up)
    out = tmp_path / "run"
    code, _out, err = cli(*_sft(model_dir, data_dir / "demos.jsonl", out, "--set", "max_steps=1"))
    assert code == 1 and "not finite" in error_line(err)
    assert not (out / "final").exists()


def test_log_after_a_kill_during_the_export_reads_as_one_run(
    cli, tmp_path, model_dir, data_dir, no_progress, monkeypatch
):
    """rm logs its normalization after the last step; stopped in the export and resumed, no line repeats."""
    from rlhf_fast.trainers.reward import RewardTrainer

    def rm(out, *extra):
        return cli(
            "rm", "--model", model_dir, "--data", data_dir / "rankings.jsonl", "--reference",
            data_dir / "demos.jsonl", "--out", out, "--set", "batch_size=2", *extra,
        )  # fmt: skip

    export = RewardTrainer._export

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(RewardTrainer, "_export", interrupted)
    assert rm(tmp_path / "run")[0] == 130
    monkeypatch.setattr(RewardTrainer, "_export", export)
    code, _stdout, err = rm(tmp_path / "run", "--resume")
    assert code == 0, err
    assert (tmp_path / "run" / "final" / "score_head.safetensors").is_file()
    assert rm(tmp_path / "reference")[0] == 0
    assert _metrics(tmp_path / "run" / "metrics.jsonl") == _metrics(tmp_path / "reference" / "metrics.jsonl")


# ------------------------------------------------------------------------------------------------ lock


def test_a_second_run_in_the_same_out_is_refused(cli, tmp_path, model_dir, data_dir, no_progress):
    out = tmp_path / "run"
    out.mkdir()
    with lock_held_by_another_process(out) as holder:
        code, _out, err = cli(*_short_sft(model_dir, data_dir, out))
        message = error_line(err)
        assert code == 2
        assert str(out) in message and str(holder.pid) in message and socket.gethostname() in message
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(cli, tmp_path, model_dir, data_dir, no_progress):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    code, _out, err = cli(*_short_sft(model_dir, data_dir, out))
    assert code == 0, err


# ----------------------------------------------------------------------------------------------- seeds


def _final_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update({f"{path.name}/{key}": value for key, value in load_file(path).items()})
    assert tensors
    return tensors


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_each_command_reproduces_its_weights_bitwise(
    cli, tmp_path, model_dir, reward_dir, data_dir, no_progress
):
    commands = {
        "sft": ("sft", "--model", model_dir, "--data", data_dir / "demos.jsonl", "--set", "batch_size=2",
                "--set", "max_steps=2"),
        "rm": ("rm", "--model", model_dir, "--data", data_dir / "rankings.jsonl", "--set", "batch_size=2",
               "--set", "max_steps=2"),
        "ppo": ("ppo", "--policy", model_dir, "--reward", reward_dir, "--prompts", data_dir / "prompts.jsonl",
                "--set", "batch_size=2", "--set", "num_minibatches=1", "--set", "ppo_epochs=1",
                "--set", "max_new_tokens=4", "--set", "max_iterations=2"),
    }  # fmt: skip
    for name, command in commands.items():
        finals = []
        for run, seed in (("a", 11), ("b", 11), ("c", 12)):
            code, _out, err = cli(*command, "--seed", seed, "--out", tmp_path / f"{name}-{run}")
            assert code == 0, err
            finals.append(_final_tensors(tmp_path / f"{name}-{run}" / "final"))
        assert _same(finals[0], finals[1]), f"{name}: two runs with seed 11 differ"
        assert not _same(finals[0], finals[2]), f"{name}: seeds 11 and 12 gave the same weights"


# ------------------------------------------------------------------------------------------- bad input


def test_a_record_over_the_byte_limit_names_its_line(cli, tmp_path, model_dir, no_weights):
    huge = {"prompt": "w1 " * 400, "response": "w2"}
    data = write_lines(tmp_path / "demos.jsonl", [GOOD, GOOD, huge])
    code, _out, err = cli(*_sft(model_dir, data, tmp_path / "run", "--set", "data.max_record_bytes=1000"))
    message = error_line(err)
    assert code == 2 and f"{data}:3:" in message and "1000" in message


def test_duplicate_keys_are_refused(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", [GOOD, '{"prompt": "w1", "response": "w2", "prompt": "w3"}'])
    code, _out, err = cli(*_sft(model_dir, data, tmp_path / "run"))
    message = error_line(err)
    assert code == 2 and f"{data}:2: field 'prompt'" in message and "duplicate" in message


def test_a_lone_surrogate_is_invalid_text(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", [GOOD, '{"prompt": "w1", "response": "w2 \\ud800"}'])
    code, _out, err = cli(*_sft(model_dir, data, tmp_path / "run"))
    message = error_line(err)
    assert code == 2 and f"{data}:2: field 'response'" in message and "surrogate" in message


def test_out_below_a_regular_file(cli, tmp_path, model_dir, data_dir, no_weights):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _out, err = cli(*_short_sft(model_dir, data_dir, blocker / "run"))
    message = error_line(err)
    assert code == 2 and str(blocker) in message and "not a directory" in message


def test_a_model_directory_with_only_config_json(cli, tmp_path, model_dir, data_dir, no_weights):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    (bare / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    code, _out, err = cli(*_short_sft(bare, data_dir, tmp_path / "run"))
    message = error_line(err)
    assert code == 2 and f"--model {bare}" in message and "weights" in message
    (bare / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    code, _out, err = cli(*_short_sft(bare, data_dir, tmp_path / "run"))
    message = error_line(err)
    assert code == 2 and f"--model {bare}" in message and "tokenizer" in message


def test_an_error_names_a_path_with_two_spaces_exactly(cli, tmp_path, model_dir, no_weights):
    folder = tmp_path / "my  data"
    folder.mkdir()
    data = write_lines(folder / "demos  v2.jsonl", [GOOD, "{broken"])
    code, _out, err = cli(*_sft(model_dir, data, tmp_path / "run"))
    assert code == 2 and f"{data}:2:" in error_line(err)
    assert os.path.exists(str(data))


def test_overwrite_removes_the_earlier_runs_checkpoints(
    cli, tmp_path, model_dir, data_dir, no_progress, monkeypatch
):
    """Started over and stopped before its first checkpoint, a run can never be resumed from the earlier run's."""
    from rlhf_fast.trainers.sft import SFTTrainer

    out = tmp_path / "run"
    assert cli(*_short_sft(model_dir, data_dir, out))[0] == 0

    def interrupted(self, examples):
        raise KeyboardInterrupt

    monkeypatch.setattr(SFTTrainer, "train_step", interrupted)
    code, _out, err = cli(*_short_sft(model_dir, data_dir, out, "--overwrite"))
    assert code == 130 and "removed the earlier run's checkpoints" in err
    assert not (out / "checkpoints" / "last").exists()
