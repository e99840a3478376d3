"""`rlhf-fast sft | rm | ppo` end to end on a tiny random checkpoint: outputs load with transformers."""

from __future__ import annotations

import json
import math

import pytest

from tests.cli.conftest import demonstrations, error_line, prompts, write_lines


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_end_to_end(cli, tmp_path, model_dir, data_dir):
    """Trains, shows the trainer's progress bar, summarizes, and writes a model transformers loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_fast.cli.common import run_config_class
    from rlhf_fast.config import load_config
    from rlhf_fast.trainers.sft import SFTConfig

    out = tmp_path / "sft"
    code, stdout, stderr = cli(
        "sft",
        "--model",
        model_dir,
        "--data",
        data_dir / "demos.jsonl",
        "--eval-data",
        data_dir / "demos.jsonl",
        "--out",
        out,
        "--seed",
        3,
        "--set",
        "batch_size=2",
        "--set",
        "max_steps=3",
        "--set",
        "learning_rate=1e-3",
    )
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "sft:" in stderr  # the trainer's tqdm bar
    assert "sft done: 3 steps" in stdout
    assert "train/loss" in stdout and "eval/loss" in stdout
    assert str(out / "final") in stdout and str(out / "metrics.jsonl") in stdout

    metrics = _metrics(out / "metrics.jsonl")
    assert [record["step"] for record in metrics] == [1, 2, 3]
    assert all(math.isfinite(record["train/loss"]) for record in metrics)
    assert "eval/loss" in metrics[-1]

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = any(
        not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values())
    )
    assert changed, "training did not change the weights"
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(model_dir).get_vocab()

    # The resolved config reloads into the trainer's config (plus the data section), with the CLI's values.
    config = load_config(run_config_class(SFTConfig), out / "config.yaml")
    assert (config.seed, config.batch_size, config.max_steps, config.output_dir) == (3, 2, 3, str(out))
    assert config.data.truncation == "error"


def test_sft_interrupted_then_resumed(cli, tmp_path, model_dir, data_dir, no_progress, monkeypatch):
    """Ctrl-C during step 3 exits 130 with a one-line hint; --resume continues from the step-2 checkpoint."""
    from rlhf_fast.trainers.sft import SFTTrainer

    out = tmp_path / "sft"
    common = (
        "sft",
        "--model",
        model_dir,
        "--data",
        data_dir / "demos.jsonl",
        "--out",
        out,
        "--set",
        "batch_size=2",
        "--set",
        "save_every=1",
        "--set",
        "max_steps=3",
    )
    train_step = SFTTrainer.train_step

    def interrupted_step(self, examples):
        if self.global_step == 2:
            raise KeyboardInterrupt
        return train_step(self, examples)

    monkeypatch.setattr(SFTTrainer, "train_step", interrupted_step)
    code, stdout, stderr = cli(*common)
    assert code == 130
    assert "--resume" in error_line(stderr)
    monkeypatch.setattr(SFTTrainer, "train_step", train_step)

    code, stdout, stderr = cli(*common)  # an earlier run is there: refused without --resume / --overwrite
    assert code == 2
    code, stdout, stderr = cli(*common, "--resume")
    assert code == 0, stderr
    assert "sft done: 3 steps (1 after resuming at 2)" in stdout
    assert [record["step"] for record in _metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert "resuming with the run's own config" in stderr


def test_sft_skip_bad_records_reports_counts(cli, tmp_path, model_dir, no_progress):
    bad = ["{not json", {"prompt": "w1", "response": " "}, {"prompt": "w2"}, "[3]"]  # lines 4-7
    long_record = {"prompt": " ".join(["w3"] * 10), "response": "w4"}  # line 10: 12 tokens with the eos
    data = write_lines(
        tmp_path / "demos.jsonl", demonstrations(3) + bad + demonstrations(2, 1) + [long_record]
    )
    code, stdout, stderr = cli(
        "sft",
        "--model",
        model_dir,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--on-bad-record",
        "skip",
        "--max-length",
        "10",
        "--truncation",
        "truncate_prompt",
        "--set",
        "max_steps=1",
    )
    assert code == 0, stderr
    # At the start (stderr) and in the summary (stdout): the count per reason, with the first location.
    for text in (stderr, stdout):
        assert "4 bad records skipped" in text
        assert f"1 malformed_json, first at {data}:4" in text
        assert f"1 empty_text, first at {data}:5" in text
        assert f"1 missing_field, first at {data}:6" in text
        assert f"1 not_an_object, first at {data}:7" in text
        assert f"1 truncated_prompt (first at {data}:10)" in text
    assert "6 records (demonstrations)" in stdout


def test_rm_end_to_end_with_reference(cli, tmp_path, model_dir, data_dir, no_progress):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from rlhf_fast.data import encode_demonstrations, read_demonstrations
    from rlhf_fast.models import RewardModel

    out = tmp_path / "rm"
    code, stdout, stderr = cli(
        "rm",
        "--model",
        model_dir,
        "--data",
        data_dir / "rankings.jsonl",
        "--eval-data",
        data_dir / "rankings.jsonl",
        "--reference",
        data_dir / "demos.jsonl",
        "--out",
        out,
        "--set",
        "batch_size=2",
        "--set",
        "learning_rate=1e-3",
    )
    assert code == 0, stderr
    assert "rm done: 3 steps" in stdout  # 6 rankings (5 + the pair), batch 2, 1 epoch
    assert "eval/accuracy" in stdout and "reward normalization" in stdout

    backbone = AutoModel.from_pretrained(out / "final")
    assert backbone.config.n_embd == 32
    model = RewardModel.from_pretrained(out / "final").eval()
    # Normalization: the reference demonstrations score mean 0 (offset saved with the model).
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    reference = encode_demonstrations(read_demonstrations(data_dir / "demos.jsonl"), tokenizer, 48).examples
    with torch.no_grad():
        scores = torch.cat(
            [
                model(torch.tensor([ex.input_ids]), torch.ones(1, len(ex.input_ids), dtype=torch.bool))
                for ex in reference
            ]
        )
    assert abs(scores.mean().item()) < 1e-4
    assert model.normalization_bias != 0.0
    metrics = _metrics(out / "metrics.jsonl")
    assert metrics[-1]["normalization/bias"] == pytest.approx(model.normalization_bias, rel=1e-5)


def test_ppo_ptx_end_to_end(cli, tmp_path, model_dir, reward_dir, data_dir, no_progress):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ppo"
    code, stdout, stderr = cli(
        "ppo",
        "--policy",
        model_dir,
        "--reward",
        reward_dir,
        "--prompts",
        data_dir / "prompts.jsonl",
        "--pretrain",
        data_dir / "text.jsonl",
        "--out",
        out,
        "--set",
        "batch_size=2",
        "--set",
        "num_minibatches=1",
        "--set",
        "ppo_epochs=1",
        "--set",
        "max_new_tokens=4",
        "--set",
        "max_iterations=2",
        "--set",
        "learning_rate=1e-3",
        "--set",
        "output_norm_learning_rate=1e-2",
        "--set",
        "data.pretrain_block_size=8",
    )
    assert code == 0, stderr
    assert "ppo done: 2 iterations" in stdout
    assert "objective/scores" in stdout and "loss/ptx" in stdout
    assert "PPO-ptx: pretraining blocks of 8 tokens" in stdout
    metrics = _metrics(out / "metrics.jsonl")
    assert [record["step"] for record in metrics] == [1, 2]
    assert all(record["loss/ptx"] > 0 for record in metrics)
    policy = AutoModelForCausalLM.from_pretrained(out / "final")
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(
        not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), original.state_dict().values())
    )


def test_ppo_with_too_few_tokens_for_a_pretraining_block(cli, tmp_path, model_dir, reward_dir, no_weights):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(4))
    text = write_lines(tmp_path / "text.jsonl", [{"text": "w1 w2"}])
    code, _stdout, stderr = cli(
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
        "--set",
        "max_new_tokens=8",
    )
    message = error_line(stderr)
    assert code == 2 and str(text) in message and "block_size" in message


def test_training_that_aborts_is_one_line_exit_1(
    cli, tmp_path, model_dir, data_dir, no_progress, monkeypatch
):
    """A run stopped by the trainer's own safety check (non-finite losses) is not a traceback either."""
    from rlhf_fast.trainers._common import NonFiniteError
    from rlhf_fast.trainers.sft import SFTTrainer

    def abort(self):
        raise NonFiniteError("aborting: 10 consecutive steps had a non-finite loss or reward")

    monkeypatch.setattr(SFTTrainer, "train", abort)
    code, _stdout, stderr = cli(
        "sft", "--model", model_dir, "--data", data_dir / "demos.jsonl", "--out", tmp_path / "run"
    )
    assert code == 1
    assert "non-finite" in error_line(stderr)
