"""Bad input through the CLI: one line on stderr naming file, line and field; exit 2; no weights loaded."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import demonstrations, error_line, prompts, rankings, write_lines

GOOD_DEMO = {"prompt": "w1 w2", "response": "w3"}
GOOD_RANKING = {"prompt": "w1", "completions": ["w2", "w3 w4"], "ranks": [0, 1]}

# (command, bad line, field named in the message, words the reason must contain)
DEMO_CASES = {
    "malformed_json": ('{"prompt": "w1", "response": ', "-", "malformed JSON"),
    "missing_field": ({"prompt": "w1"}, "response", "missing"),
    "mistyped_field": ({"prompt": 7, "response": "w1"}, "prompt", "expected a string"),
    "empty_prompt": ({"prompt": "   ", "response": "w1"}, "prompt", "empty"),
    "empty_response": ({"prompt": "w1", "response": ""}, "response", "empty"),
    "not_an_object": ("[1, 2]", "-", "JSON object"),
    "non_utf8": (b'{"prompt": "w1 \xff", "response": "w2"}', "-", "UTF-8"),
}

RANKING_CASES = {
    "one_completion": (
        {"prompt": "w1", "completions": ["w2"], "ranks": [0]},
        "completions",
        "between 2 and 9",
    ),
    "ten_completions": (
        {"prompt": "w1", "completions": [f"w{i} w{i}" for i in range(10)], "ranks": list(range(10))},
        "completions",
        "between 2 and 9",
    ),
    "ranks_mismatch": (
        {"prompt": "w1", "completions": ["w2", "w3", "w4"], "ranks": [0, 1]},
        "ranks",
        "3 completions",
    ),
    "duplicate_completion": (
        {"prompt": "w1", "completions": ["w2 w3", "w4", "w2 w3"], "ranks": [0, 1, 2]},
        "completions[2]",
        "duplicate",
    ),
    "empty_completion": (
        {"prompt": "w1", "completions": ["w2", " "], "ranks": [0, 1]},
        "completions[1]",
        "empty",
    ),
    "mistyped_rank": (
        {"prompt": "w1", "completions": ["w2", "w3"], "ranks": [0, "1"]},
        "ranks[1]",
        "integer",
    ),
}


def _check(code: int, stderr: str, path, line: int, field: str, words: str) -> str:
    message = error_line(stderr)
    assert code == 2, stderr
    assert f"{path}:{line}" in message, message
    assert f"field '{field}'" in message, message
    assert words in message, message
    return message


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_bad_demonstration_record(cli, tmp_path, model_dir, no_weights, case):
    bad, field, words = DEMO_CASES[case]
    data = write_lines(tmp_path / "demos.jsonl", [GOOD_DEMO, GOOD_DEMO, bad, GOOD_DEMO])
    code, _out, err = cli("sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    _check(code, err, data, 3, field, words)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("case", sorted(RANKING_CASES))
def test_bad_ranking_record(cli, tmp_path, model_dir, no_weights, case):
    bad, field, words = RANKING_CASES[case]
    data = write_lines(tmp_path / "rankings.jsonl", [GOOD_RANKING, bad])
    code, _out, err = cli("rm", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    _check(code, err, data, 2, field, words)


def test_bad_record_in_a_later_file_stops_before_weights(cli, tmp_path, model_dir, no_weights):
    """Every file is validated before anything loads: a bad --reference line fails the rm command."""
    data = write_lines(tmp_path / "rankings.jsonl", rankings(3))
    reference = write_lines(
        tmp_path / "reference.jsonl", demonstrations(4) + [{"prompt": "w1", "response": 3}]
    )
    code, _out, err = cli(
        "rm", "--model", model_dir, "--data", data, "--reference", reference, "--out", tmp_path / "run"
    )
    _check(code, err, reference, 5, "response", "expected a string")


def test_bad_eval_data_in_sft(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(4))
    held_out = write_lines(tmp_path / "held_out.jsonl", [GOOD_DEMO, {"response": "w1"}])
    code, _out, err = cli(
        "sft", "--model", model_dir, "--data", data, "--eval-data", held_out, "--out", tmp_path / "r"
    )
    _check(code, err, held_out, 2, "prompt", "missing")


def test_bad_prompt_record_in_ppo_and_eval(cli, tmp_path, model_dir, reward_dir, no_weights):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(3) + [{"prompt": ""}])
    code, _out, err = cli(
        "ppo",
        "--policy",
        model_dir,
        "--reward",
        reward_dir,
        "--prompts",
        data,
        "--out",
        tmp_path / "r",
        "--set",
        "max_new_tokens=8",
    )
    _check(code, err, data, 4, "prompt", "empty")
    code, _out, err = cli(
        "eval", "--policy", model_dir, "--prompts", data, "--out", tmp_path / "e", "--max-new-tokens", 8
    )
    _check(code, err, data, 4, "prompt", "empty")


def test_bad_pretrain_record_in_ppo(cli, tmp_path, model_dir, reward_dir, no_weights):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(4))
    text = write_lines(tmp_path / "text.jsonl", [{"text": "w1 w2 w3"}, {"txt": "w1"}])
    code, _out, err = cli(
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
        tmp_path / "r",
        "--set",
        "max_new_tokens=8",
    )
    _check(code, err, text, 2, "text", "missing")


def test_empty_file(cli, tmp_path, model_dir, no_weights):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    code, _out, err = cli("sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    _check(code, err, data, 0, "-", "empty")


def test_too_long_under_policy_error(cli, tmp_path, model_dir, no_weights):
    long_record = {"prompt": " ".join(["w1"] * 6), "response": "w2 w3"}
    data = write_lines(tmp_path / "demos.jsonl", [GOOD_DEMO, long_record])
    code, _out, err = cli(
        "sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--max-length", "6"
    )
    message = _check(code, err, data, 2, "prompt", "max_length 6")
    assert "truncate_prompt" in message  # says how to get past it


def test_too_long_for_the_model(cli, tmp_path, model_dir, no_weights):
    """Without --max-length the limit is the model's 48 positions."""
    data = write_lines(
        tmp_path / "demos.jsonl", [GOOD_DEMO, {"prompt": " ".join(["w1"] * 60), "response": "w2"}]
    )
    code, _out, err = cli("sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    _check(code, err, data, 2, "prompt", "max_length 48")
    code, _out, err = cli(
        "sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--max-length", "100"
    )
    assert code == 2 and "48 positions" in error_line(err)


def test_all_records_skipped_as_too_long(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", [{"prompt": "w1 w2 w3 w4", "response": "w5 w6"}])
    code, _out, err = cli(
        "sft",
        "--model",
        model_dir,
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--max-length",
        "4",
        "--truncation",
        "skip",
    )
    _check(code, err, data, 0, "-", "no record fits")


def test_all_records_bad_under_skip(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", ["{oops", {"prompt": "w1"}])
    code, _out, err = cli(
        "sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--on-bad-record", "skip"
    )
    message = _check(code, err, data, 0, "-", "no valid records")
    assert "malformed_json" in message and "missing_field" in message


@pytest.mark.parametrize("flag", ["--model", "--data"])
def test_missing_paths(cli, tmp_path, model_dir, no_weights, flag):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    paths = {"--model": model_dir, "--data": data}
    paths[flag] = tmp_path / "does-not-exist"
    code, _out, err = cli(
        "sft", "--model", paths["--model"], "--data", paths["--data"], "--out", tmp_path / "run"
    )
    message = error_line(err)
    assert code == 2
    assert flag in message and "does-not-exist" in message and "no such" in message


def test_model_dir_without_a_model(cli, tmp_path, no_weights):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    code, _out, err = cli("sft", "--model", empty, "--data", data, "--out", tmp_path / "run")
    assert code == 2 and "no config.json" in error_line(err)


def test_default_max_new_tokens_too_long_for_the_model(cli, tmp_path, model_dir, reward_dir, no_weights):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(4))
    code, _out, err = cli(
        "ppo", "--policy", model_dir, "--reward", reward_dir, "--prompts", data, "--out", tmp_path / "r"
    )
    assert code == 2 and "max_new_tokens 64" in error_line(err) and "48 positions" in error_line(err)
    code, _out, err = cli("eval", "--policy", model_dir, "--prompts", data, "--out", tmp_path / "e")
    assert code == 2 and "--max-new-tokens 64" in error_line(err)


def test_reward_dir_that_is_not_a_reward_model(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(4))
    code, _out, err = cli(
        "ppo", "--policy", model_dir, "--reward", model_dir, "--prompts", data, "--out", tmp_path / "r"
    )
    assert code == 2 and "not a reward model" in error_line(err)


def test_reward_model_with_another_vocabulary(cli, tmp_path, model_dir, no_weights):
    from rlhf_fast.models.tiny import build_word_tokenizer
    from tests.cli.conftest import build_causal_lm_dir

    other = build_causal_lm_dir(tmp_path / "other", tokenizer=build_word_tokenizer(["x", "y"]))
    (other / "score_head.safetensors").write_bytes(
        b""
    )  # only its presence is checked before the vocabularies
    data = write_lines(tmp_path / "prompts.jsonl", prompts(4))
    code, _out, err = cli(
        "ppo", "--policy", model_dir, "--reward", other, "--prompts", data, "--out", tmp_path / "r"
    )
    assert code == 2 and "vocabulary differs" in error_line(err)


def test_fewer_prompts_than_a_batch(cli, tmp_path, model_dir, reward_dir, no_weights):
    data = write_lines(tmp_path / "prompts.jsonl", prompts(3))
    code, _out, err = cli(
        "ppo",
        "--policy",
        model_dir,
        "--reward",
        reward_dir,
        "--prompts",
        data,
        "--out",
        tmp_path / "r",
        "--set",
        "batch_size=4",
        "--set",
        "num_minibatches=1",
        "--set",
        "max_new_tokens=8",
    )
    message = error_line(err)
    assert code == 2 and "3 prompts" in message and "batch_size" in message


def test_out_dir_with_an_earlier_run(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _out, err = cli("sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    message = error_line(err)
    assert code == 2 and "--resume" in message and "--overwrite" in message


def test_config_check_failure_is_one_line(cli, tmp_path, model_dir, no_weights):
    data = write_lines(tmp_path / "demos.jsonl", demonstrations(2))
    code, _out, err = cli(
        "sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--set", "epochs=0"
    )
    assert code == 2 and "epochs" in error_line(err)


def test_argparse_errors_exit_2(cli, tmp_path):
    code, _out, err = cli("sft", "--data", "x.jsonl", "--out", tmp_path)
    assert code == 2 and "--model" in err and "Traceback" not in err
    code, _out, err = cli("sft", "--model", "m", "--data", "d", "--out", "o", "--max-length", "0")
    assert code == 2 and "positive integer" in err
    code, _out, err = cli("sft", "--model", "m", "--data", "d", "--out", "o", "--truncation", "cut")
    assert code == 2 and "invalid choice" in err


def test_chat_record_without_a_chat_template(cli, tmp_path, model_dir, no_weights):
    chat = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}
    data = write_lines(tmp_path / "demos.jsonl", [GOOD_DEMO, chat])
    code, _out, err = cli("sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    _check(code, err, data, 2, "messages", "chat template")


def test_error_message_is_machine_readable(cli, tmp_path, model_dir, no_weights):
    """The location is the first thing after the prefix, as `path:line:` (editors jump to it)."""
    data = write_lines(tmp_path / "demos.jsonl", [GOOD_DEMO, json.dumps(GOOD_DEMO)[:-1]])
    _code, _out, err = cli("sft", "--model", model_dir, "--data", data, "--out", tmp_path / "run")
    assert error_line(err).startswith(f"rlhf-fast sft: error: {data}:2: field '-'")
