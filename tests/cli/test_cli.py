"""The command line itself: --dry-run statistics, config errors, help, demo, bench, the installed script."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.cli.conftest import demonstrations, error_line, prompts, rankings, write_lines


def test_dry_run_rankings_statistics(cli, tmp_path, model_dir, no_weights):
    """Record counts, length histograms, the K distribution, and the truncation count under the policy; exit 0
    without loading weights or creating --out."""
    records = rankings(6)  # K = 2, 3, 4, 2, 3, 4, then a pair (K = 2)
    records.append({"prompt": " ".join(["w5"] * 12), "completions": ["w1", "w2 w3"], "ranks": [1, 0]})
    records.insert(2, "{broken")
    data = write_lines(tmp_path / "rankings.jsonl", records)
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        "rm",
        "--model",
        model_dir,
        "--data",
        data,
        "--out",
        out,
        "--dry-run",
        "--max-length",
        10,
        "--truncation",
        "truncate_prompt",
        "--on-bad-record",
        "skip",
        "--set",
        "batch_size=4",
    )
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "records: 8" in stdout
    assert "skipped while reading: 1" in stdout and "malformed_json" in stdout and f"{data}:3" in stdout
    assert "K=2 " in stdout and "K=3 " in stdout and "K=4 " in stdout
    k_lines = {
        line.split("|")[0].strip(): int(line.split()[-1]) for line in stdout.splitlines() if "K=" in line
    }
    assert k_lines == {"K=2": 4, "K=3": 2, "K=4": 2}
    assert "under max_length 10 with policy 'truncate_prompt'" in stdout
    assert "would have the prompt truncated" in stdout
    assert "sequence (prompt + completion + eos)" in stdout  # a length histogram
    assert "rm would run 2 steps" in stdout  # 8 rankings, batch 4
    assert "1 truncated_prompt" in stdout
    assert not out.exists()
    assert "1 bad records skipped" in stderr  # the skip count is reported at the start as well


def test_dry_run_reports_records_that_would_fail(cli, tmp_path, model_dir, no_weights):
    """Under the default policy the statistics still print, then the first too-long record is the error."""
    long_record = {"prompt": " ".join(["w1"] * 12), "response": "w2"}  # 14 tokens with the eos
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(3) + [long_record])  # the others: at most 9
    code, stdout, stderr = cli(
        "sft",
        "--model",
        model_dir,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--dry-run",
        "--max-length",
        10,
    )
    assert code == 2
    assert "records: 4" in stdout and "would raise an error" in stdout
    message = error_line(stderr)
    assert f"{data}:4" in message and "field 'prompt'" in message


def test_dry_run_ppo_with_pretraining(cli, tmp_path, model_dir, reward_dir, no_weights):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(6))
    text = write_lines(tmp_path / "text.jsonl", [{"text": " ".join(["w1"] * 20)}])
    code, stdout, stderr = cli(
        "ppo",
        "--policy",
        model_dir,
        "--reward",
        reward_dir,
        "--prompts",
        data,
        "--pretrain",
        text,
        "--out",
        tmp_path / "run",
        "--dry-run",
        "--set",
        "max_new_tokens=8",
        "--set",
        "batch_size=2",
        "--set",
        "num_minibatches=1",
        "--set",
        "data.pretrain_block_size=6",
    )
    assert code == 0, stderr
    assert "under max_prompt_length 40" in stdout  # 48 positions - 8 new tokens
    assert "tokens: 21 -> 3 blocks of 6 (3 tail tokens dropped)" in stdout
    assert "ppo would run 3 iterations" in stdout


def test_unknown_config_key_in_yaml(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    config = tmp_path / "sft.yaml"
    config.write_text("epochs: 2\nlearning_rat: 1.0e-5\n")
    code, _stdout, stderr = cli(
        "sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--config", config
    )
    message = error_line(stderr)
    assert code == 2
    assert "unknown config key 'learning_rat'" in message and "did you mean 'learning_rate'?" in message


def test_unknown_config_key_in_set_and_data_section(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    code, _stdout, stderr = cli(
        "sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--set", "data.max_lenght=12"
    )
    assert code == 2 and "did you mean 'data.max_length'?" in error_line(stderr)
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  truncation: chop\n")
    code, _stdout, stderr = cli(
        "sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--config", config
    )
    assert code == 2 and "data.truncation" in error_line(stderr)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"epochs: [1\n", "malformed YAML"),
        (b"epochs: 1 \xff\n", "not valid UTF-8"),
        (b"epochs: two\n", "epochs: expected int"),
        (b"- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_bad_config_file(cli, tmp_path, model_dir, no_weights, content, words):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    config = tmp_path / "sft.yaml"
    config.write_bytes(content)
    code, _stdout, stderr = cli(
        "sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--config", config
    )
    assert code == 2 and words in error_line(stderr)


def test_config_file_data_section_and_flag_precedence(cli, tmp_path, model_dir, no_weights):
    """Config file < --set < flags: the dry run reports the limit that wins."""
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(3))
    config = tmp_path / "sft.yaml"
    config.write_text("batch_size: 1\ndata:\n  max_length: 20\n  truncation: skip\n")
    args = (
        "sft",
        "--model",
        model_dir,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--dry-run",
        "--config",
        config,
    )
    code, stdout, _stderr = cli(*args)
    assert (
        code == 0
        and "under max_length 20 with policy 'skip'" in stdout
        and "sft would run 48 steps" in stdout
    )
    code, stdout, _stderr = cli(*args, "--set", "data.max_length=30", "--set", "epochs=1")
    assert code == 0 and "under max_length 30" in stdout and "sft would run 3 steps" in stdout
    code, stdout, _stderr = cli(*args, "--set", "data.max_length=30", "--max-length", 25)
    assert code == 0 and "under max_length 25" in stdout


def test_help(cli):
    code, stdout, stderr = cli("--help")
    assert code == 0
    for command in ("sft", "rm", "ppo", "eval", "demo", "bench"):
        assert command in stdout
    for command in ("sft", "rm", "ppo"):
        code, stdout, stderr = cli(command, "--help")
        assert code == 0
        for flag in (
            "--resume",
            "--seed",
            "--dry-run",
            "--on-bad-record",
            "--max-length",
            "--truncation",
            "--config",
            "--set",
        ):
            assert flag in stdout, (command, flag)
    code, stdout, stderr = cli()
    assert code == 2 and "COMMAND" in stderr


def test_demo_calls_the_pipeline(cli, tmp_path, monkeypatch):
    calls = []
    pipeline = types.ModuleType("rlhf_fast.pipeline")
    pipeline.run_demo = lambda **kwargs: calls.append(kwargs) or str(tmp_path / "report.md")
    monkeypatch.setitem(sys.modules, "rlhf_fast.pipeline", pipeline)
    code, stdout, stderr = cli("demo", "--preset", "paper", "--out", tmp_path / "demo", "--seed", 7)
    assert code == 0, stderr
    assert calls == [{"preset": "paper", "out_dir": str(tmp_path / "demo"), "seed": 7}]
    assert "report.md" in stdout
    code, _, stderr = cli("demo", "--out", tmp_path / "demo", "--threads", 2)
    assert code == 0, stderr
    assert calls[-1] == {"preset": "quick", "out_dir": str(tmp_path / "demo"), "seed": 0, "threads": 2}
    code, _, stderr = cli("demo", "--out", tmp_path / "demo", "--jobs", 3)
    assert code == 0, stderr
    assert calls[-1] == {"preset": "quick", "out_dir": str(tmp_path / "demo"), "seed": 0, "jobs": 3}
    for option in ("--threads", "--jobs"):
        code, _, stderr = cli("demo", option, 0)
        assert code == 2 and option in stderr


def test_demo_without_the_pipeline(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "rlhf_fast.pipeline", None)  # makes the import fail as if it were absent
    code, _stdout, stderr = cli("demo")
    assert code == 1
    assert "rlhf_fast.pipeline" in error_line(stderr) and "not part of this installation" in stderr


def test_bench_cpu_runs_pytest_on_the_suite(cli, monkeypatch):
    import rlhf_fast.cli.app as cli_module

    calls = []
    monkeypatch.setattr(cli_module.subprocess, "call", lambda command, cwd: calls.append((command, cwd)) or 0)
    code, _stdout, stderr = cli("bench", "--", "-k", "gae", "--benchmark-min-rounds=3")
    assert code == 0, stderr
    ((command, cwd),) = calls
    assert command[:3] == [sys.executable, "-m", "pytest"]
    bench_files = [arg for arg in command if arg.endswith(".py")]
    assert bench_files and all(Path(arg).parent == Path(cwd) / "bench" for arg in bench_files)
    assert command[-3:] == ["-k", "gae", "--benchmark-min-rounds=3"]


def test_bench_gpu_prints_how_to_run_the_check(cli):
    code, stdout, _stderr = cli("bench", "--suite", "gpu")
    assert code == 0 and "bash bench/gpu_check.sh" in stdout


def test_extra_arguments_only_for_bench(cli, tmp_path):
    code, _stdout, stderr = cli("demo", "--", "-k", "x")
    assert code == 2 and "only for `bench`" in error_line(stderr)


def test_console_script_help():
    """The installed `rlhf-fast` script (or `python -m rlhf_fast.cli` without one) starts and prints help."""
    script = Path(sys.executable).with_name("rlhf-fast")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rlhf_fast.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "sft" in result.stdout and "ppo" in result.stdout and "bench" in result.stdout


def test_bench_help_names_every_packaged_op(cli):
    from rlhf_fast.bench.runner import OPS

    code, stdout, _ = cli("bench", "--help")
    assert code == 0
    listed = " ".join(stdout.split())  # argparse wraps the help text
    assert all(op in listed for op in OPS), (sorted(OPS), listed)
