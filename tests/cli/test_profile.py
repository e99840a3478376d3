"""`rlhf-fast profile` and `rlhf-fast bench` from the command line, and both from an installed wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.cli.conftest import error_line

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _ppo_args(model_dir, reward_dir, data_dir):
    return ["--policy", model_dir, "--reward", reward_dir, "--prompts", data_dir / "prompts.jsonl",
            "--set", "batch_size=2", "--set", "num_minibatches=1", "--set", "max_new_tokens=4"]  # fmt: skip


COMMANDS = {
    "sft": lambda m, r, d: ["--model", m, "--data", d / "demos.jsonl", "--set", "batch_size=3"],
    "rm": lambda m, r, d: ["--model", m, "--data", d / "rankings.jsonl", "--set", "batch_size=3"],
    "ppo": _ppo_args,
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_profile_prints_phases_and_writes_nothing_to_out(
    cli, tmp_path, model_dir, reward_dir, data_dir, command
):
    out, report = tmp_path / "run", tmp_path / "profile.json"
    code, stdout, stderr = cli("profile", command, *COMMANDS[command](model_dir, reward_dir, data_dir),
                               "--iterations", 2, "--out", out, "--json", report)  # fmt: skip
    assert code == 0, stderr
    assert f"profile {command} on " in stdout and "2 measured" in stdout
    assert "other" in stdout and "tokens/s" in stdout and "peak memory" in stdout
    assert not out.exists() and "writes nothing there" in stderr
    data = json.loads(report.read_text())
    assert data["command"] == command and len(data["step_seconds"]) == 2
    assert sum(data["phase_seconds"].values()) == pytest.approx(data["mean_step_seconds"], rel=0.05)
    if command == "ppo":
        assert "log-prob mismatch" in stdout and data["logprob_mismatch"] is not None
    else:
        assert set(data["phase_seconds"]) == {"data", "forward", "backward", "optimizer", "other"}


def test_profile_uses_the_training_commands_checks(cli, tmp_path, model_dir, data_dir):
    code, _stdout, stderr = cli("profile", "sft", "--model", model_dir, "--data", tmp_path / "missing.jsonl")
    assert code == 2 and "--data" in error_line(stderr)
    code, _stdout, stderr = cli(
        "profile", "sft", "--model", model_dir, "--data", data_dir / "demos.jsonl", "--set", "learning_rat=1"
    )
    assert code == 2 and "did you mean 'learning_rate'?" in error_line(stderr)
    code, _stdout, stderr = cli(
        "profile",
        "sft",
        "--model",
        model_dir,
        "--data",
        data_dir / "demos.jsonl",
        "--trace",
        tmp_path / "no" / "t.json",
    )
    assert code == 2 and "--trace" in error_line(stderr)


def test_profile_help_lists_the_training_options(cli):
    for command in COMMANDS:
        code, stdout, _stderr = cli("profile", command, "--help")
        assert code == 0
        for flag in ("--config", "--set", "--seed", "--max-length", "--iterations", "--trace", "--json"):
            assert flag in stdout, (command, flag)


def test_bench_runs_the_packaged_cases(cli, tmp_path):
    results = tmp_path / "bench.json"
    code, stdout, stderr = cli("bench", "--ops", "gae", "--rounds", 2, "--threads", 1, "--json", results)
    assert code == 0, stderr
    assert "| gae B=64 T=512 fp32 raw |" in stdout and "(baseline)" in stdout
    data = json.loads(results.read_text())
    assert [r["op"] for r in data["results"]] == ["gae", "gae"] and data["device_type"] == "cpu"
    code, _stdout, stderr = cli("bench", "--ops", "gae,nope")
    assert code == 2 and "unknown op 'nope'" in error_line(stderr)


# ------------------------------------------------------------------------------------- from a built wheel


def _deps_only_site(target: Path) -> Path:
    """A directory of links to this interpreter's installed packages, rlhf_fast left out: the scratch venv
    sees the pinned dependencies (torch, transformers, ...) without this checkout's editable install."""
    target.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("rlhf_fast", "_rlhf_fast", "rlhf-fast")) or name.endswith(".pth"):
            continue
        (target / entry.name).symlink_to(entry)
    return target


@pytest.fixture
def only_when_slow_tests_are_asked_for(request):
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("slow (builds a wheel): run with -m slow")


@pytest.mark.slow
def test_wheel_runs_bench_and_profile_outside_the_source_tree(
    only_when_slow_tests_are_asked_for, tmp_path, model_dir, reward_dir, data_dir
):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-w", str(wheels)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("rlhf_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"rlhf_fast/bench/runner.py", "rlhf_fast/bench/gae.py", "rlhf_fast/bench/profile.py"} <= set(names)
    assert not any(name.startswith(("tests/", "bench/")) for name in names)

    venv = tmp_path / "venv"
    # Without pip (and the old setuptools ensurepip brings): this interpreter's pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                             text=True).strip())  # fmt: skip
    (venv_site / "pinned_dependencies.pth").write_text(str(_deps_only_site(tmp_path / "deps")) + "\n")
    # Resolves the wheel's dependencies against the pinned set (no index: nothing may be downloaded).
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-index",
         "-c", str(ROOT / ".ci" / "constraints.txt"), str(wheel)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", RLHF_FAST_NO_PROGRESS="1")

    def run(*args, timeout=600):
        result = subprocess.run([str(arg) for arg in args], cwd=elsewhere, env=env, capture_output=True, text=True,
                                timeout=timeout, check=False)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    probe = "import rlhf_fast; from rlhf_fast import _extension; print(rlhf_fast.__file__, _extension.has_cpp_kernels())"
    where, compiled = run(python, "-c", probe).split()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT), where
    assert compiled == "True"  # the wheel carries the C++ kernels
    script = venv / "bin" / "rlhf-fast"
    stdout = run(script, "bench", "--ops", "gae", "--rounds", 2)
    assert "| gae B=64 T=512 fp32 whiten | rlhf_fast cpp |" in stdout and "(baseline)" in stdout
    stdout = run(script, "profile", "ppo", *_ppo_args(model_dir, reward_dir, data_dir), "--iterations", 2)
    assert "profile ppo on " in stdout and "2 measured iterations" in stdout and "log-prob mismatch" in stdout
