"""`rlhf-fast eval`: responses match transformers' greedy decoding; rewards and win rate are consistent."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.cli.conftest import prompts, write_lines


@pytest.fixture
def evaluated(cli, tmp_path, model_dir, other_model_dir, reward_dir, no_progress):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(5, seed=3))
    out = tmp_path / "eval"
    code, stdout, stderr = cli(
        "eval",
        "--policy",
        model_dir,
        "--baseline",
        other_model_dir,
        "--reward",
        reward_dir,
        "--prompts",
        data,
        "--out",
        out,
        "--max-new-tokens",
        6,
        "--batch-size",
        2,
    )
    assert code == 0, stderr
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    summary = json.loads((out / "eval.json").read_text())
    return data, stdout, rows, summary


def test_eval_responses_are_greedy_decodes(evaluated, model_dir, other_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, _stdout, rows, _summary = evaluated
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected_prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == expected_prompts
    for directory, key in ((model_dir, "response"), (other_model_dir, "baseline_response")):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        for row in rows:
            ids = torch.tensor([tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = generated[0, ids.shape[1] :].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            assert row[key] == tokenizer.decode(new, skip_special_tokens=True).strip(), (directory, row)


def test_eval_rewards_and_win_rate(evaluated, reward_dir):
    from transformers import AutoTokenizer

    from rlhf_fast.models import RewardModel

    _data, stdout, rows, summary = evaluated
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    reward_model = RewardModel.from_pretrained(reward_dir).eval()
    for row in rows:
        for prefix in ("", "baseline_"):
            ids = (
                tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
                + tokenizer(row[f"{prefix}response"], add_special_tokens=False)["input_ids"]
                + ([tokenizer.eos_token_id] if row[f"{prefix}finished"] else [])
            )
            with torch.no_grad():
                expected = reward_model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool)).item()
            assert row[f"{prefix}reward"] == pytest.approx(expected, abs=1e-5)

    wins = [
        1.0 if r["reward"] > r["baseline_reward"] else 0.5 if r["reward"] == r["baseline_reward"] else 0.0
        for r in rows
    ]
    mean = sum(wins) / len(wins)
    se = math.sqrt(sum((w - mean) ** 2 for w in wins) / (len(wins) - 1) / len(wins))
    metrics = summary["metrics"]
    assert metrics["win_rate"]["mean"] == pytest.approx(mean)
    assert metrics["win_rate"]["se"] == pytest.approx(se)
    assert metrics["policy/reward"]["mean"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows))
    assert summary["generation"]["decoding"] == "greedy" and summary["num_prompts"] == len(rows)
    assert "win rate of the policy against the baseline" in stdout and "mean reward" in stdout


def test_eval_without_reward_writes_responses_only(cli, tmp_path, model_dir, no_progress):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(3))
    out = tmp_path / "eval"
    code, stdout, stderr = cli(
        "eval",
        "--policy",
        model_dir,
        "--prompts",
        data,
        "--out",
        out,
        "--max-new-tokens",
        4,
        "--temperature",
        1.0,
        "--seed",
        5,
    )
    assert code == 0, stderr
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(set(row) == {"prompt", "response", "finished"} for row in rows)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["generation"]["decoding"] == "sampling" and "win_rate" not in summary["metrics"]
    assert "no --reward given" in stdout
