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
    assert not all(row["finished"] for row in rows)  # a response cut at --max-new-tokens is read with an eos
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    reward_model = RewardModel.from_pretrained(reward_dir).eval()
    for row in rows:
        for prefix in ("", "baseline_"):
            ids = (
                tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
                + tokenizer(row[f"{prefix}response"], add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]  # whether the response ended or was cut
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


WORLD_SIZES = {"pretrain_documents": 20, "qa_benchmark": 12, "demonstrations": 20, "rm_prompts": 10,
               "ppo_prompts": 10, "heldout_prompts": 16, "probes": 8, "customers": 6, "labelers": 5,
               "heldout_labelers": 2}


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A small world's data directory and two random policies with its vocabulary."""
    from rlhf_fast.models.tiny import build_word_tokenizer
    from rlhf_fast.world import build_world, write_datasets
    from tests.cli.conftest import build_causal_lm_dir

    world = build_world(5, WORLD_SIZES)
    data = write_datasets(world, tmp_path_factory.mktemp("world"))["world"].parent
    tokenizer = build_word_tokenizer(world.vocabulary())
    policy = build_causal_lm_dir(tmp_path_factory.mktemp("policy"), seed=0, tokenizer=tokenizer)
    baseline = build_causal_lm_dir(tmp_path_factory.mktemp("baseline"), seed=1, tokenizer=tokenizer)
    return world, data, policy, baseline


def test_eval_with_world_judges_with_its_labelers_and_probes(cli, tmp_path, world_run, no_progress):
    from rlhf_fast.eval.suite import MODEL_METRICS, Answers, EvalSuite, judge

    world, data, policy, baseline = world_run
    out = tmp_path / "eval"
    code, stdout, stderr = cli("eval", "--policy", policy, "--baseline", baseline, "--world", data, "--out", out,
                               "--max-new-tokens", 4, "--temperature", 1.0, "--seed", 2)
    assert code == 0, stderr
    summary = json.loads((out / "eval.json").read_text())
    judged = summary["world"]
    assert set(judged["policy"]) == set(MODEL_METRICS) and "win_rate" not in judged["baseline"]
    assert summary["num_prompts"] == WORLD_SIZES["heldout_prompts"]  # the world's held-out prompts by default
    assert "judged by the world (policy)" in stdout
    # The same numbers from the suite on the written responses (held-out answers only: probes are resampled).
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    suite = EvalSuite.from_world(world, len(world.qa_benchmark))
    suite = EvalSuite([world.instance(row["prompt"]) for row in rows], suite.probes, suite.qa)
    dummy_probes, dummy_qa = [""] * len(suite.probes), [""] * len(suite.qa)
    expected = judge(world, suite, Answers([r["response"] for r in rows], dummy_probes, dummy_qa),
                     Answers([r["baseline_response"] for r in rows], dummy_probes, dummy_qa))
    for metric in ("win_rate", "task_score", "hallucination_rate", "non_answer_rate", "repetition_rate"):
        assert judged["policy"][metric]["mean"] == pytest.approx(expected[metric].value), metric
    # Policy minus baseline, prompt by prompt, on the metrics both have.
    from rlhf_fast.eval.metrics import paired_difference, task_score_values

    difference = judged["policy_minus_baseline"]
    assert set(difference) == {"task_score", "hallucination_rate", "insult_rate_respectful",
                               "insult_rate_plain", "qa_exact_match"}
    value, se = paired_difference(*(task_score_values([r[key] for r in rows], suite.heldout, world)
                                    for key in ("response", "baseline_response")))
    assert difference["task_score"]["mean"] == pytest.approx(value)
    assert difference["task_score"]["se"] == pytest.approx(se, nan_ok=True)
    assert "judged by the world (policy_minus_baseline)" in stdout


def test_eval_with_world_rejects_a_foreign_prompt(cli, tmp_path, world_run, no_progress):
    from tests.cli.conftest import error_line

    _world, data, policy, _baseline = world_run
    prompts_file = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "the cat"}])
    code, _stdout, stderr = cli("eval", "--policy", policy, "--world", data, "--prompts", prompts_file,
                                "--out", tmp_path / "eval", "--max-new-tokens", 4)
    assert code == 2
    assert f"{prompts_file}:1" in error_line(stderr) and "not a prompt of the world" in stderr
    code, _stdout, stderr = cli("eval", "--policy", policy, "--world", tmp_path / "nowhere", "--out", tmp_path / "e")
    assert code == 2 and "--world" in error_line(stderr)
    code, _stdout, stderr = cli("eval", "--policy", policy, "--out", tmp_path / "e")
    assert code == 2 and "--prompts" in error_line(stderr)


def test_eval_best_of_n_answers_with_the_reward_models_choice(
    cli, tmp_path, model_dir, reward_dir, no_progress
):
    from transformers import AutoTokenizer

    from rlhf_fast.eval.generate import best_of_n, generate
    from rlhf_fast.models import PolicyModel, RewardModel

    records = prompts(4, seed=8)
    data = write_lines(tmp_path / "prompts.jsonl", records)
    out = tmp_path / "eval"
    code, _, stderr = cli("eval", "--policy", model_dir, "--reward", reward_dir, "--prompts", data, "--out", out,
                          "--max-new-tokens", 5, "--temperature", 1.0, "--seed", 7, "--best-of", 4)  # fmt: skip
    assert code == 0, stderr
    summary = json.loads((out / "eval.json").read_text())
    assert summary["generation"]["best_of"] == 4
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    policy, reward = (
        PolicyModel.from_pretrained(model_dir).eval(),
        RewardModel.from_pretrained(reward_dir).eval(),
    )
    options = {"temperature": 1.0, "seed": 7, "batch_size": 32}
    chosen = best_of_n(policy, reward, tokenizer, ids, 4, 5, **options)
    assert [row["response"] for row in rows] == chosen.texts
    plain = generate(policy, tokenizer, [i for i in ids for _ in range(4)], 5, **options)
    assert chosen.texts != plain.texts[::4]  # the reward model's choice, not the first sample


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--best-of", 0], "--best-of must be >= 1"),
        (["--best-of", 2, "--temperature", 1.0], "needs --reward"),
        (["--best-of", 2, "--reward", "RM"], "--temperature > 0"),
    ],
)
def test_eval_best_of_n_checks_its_arguments(
    cli, tmp_path, model_dir, reward_dir, no_progress, extra, message
):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(2))
    extra = [reward_dir if value == "RM" else value for value in extra]
    code, _, stderr = cli(
        "eval", "--policy", model_dir, "--prompts", data, "--out", tmp_path / "eval", *extra
    )
    assert code == 2 and message in stderr, stderr


def test_eval_best_of_n_needs_a_reward_model_with_the_policys_vocabulary(
    cli, tmp_path, world_run, reward_dir, no_progress
):
    from tests.cli.conftest import error_line

    _, data, policy, _ = world_run  # the world's vocabulary; reward_dir reads the tiny LM's
    code, _, stderr = cli("eval", "--policy", policy, "--reward", reward_dir, "--world", data, "--out",
                          tmp_path / "eval", "--max-new-tokens", 4, "--temperature", 1.0, "--best-of", 2)  # fmt: skip
    assert code == 2 and "another vocabulary" in error_line(stderr), stderr
