"""Fixtures for the CLI tests: tiny random checkpoints saved to disk, JSONL writers, an in-process runner."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = [f"w{i}" for i in range(12)]


def build_causal_lm_dir(directory: Path, seed: int = 0, tokenizer=None) -> Path:
    """A randomly initialized 2-layer, 32-dim GPT-2 with a word tokenizer, saved as a Hugging Face dir."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_fast.models.tiny import build_word_tokenizer

    tokenizer = tokenizer or build_word_tokenizer(WORDS)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=48,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_causal_lm_dir(tmp_path_factory.mktemp("tiny_lm"), seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A second random model with the same tokenizer (a baseline that answers differently)."""
    return build_causal_lm_dir(tmp_path_factory.mktemp("tiny_lm_other"), seed=1)


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory, model_dir) -> Path:
    """An untrained reward model (backbone of the tiny LM, random head), saved as `rlhf-fast rm` saves one."""
    from transformers import AutoTokenizer

    from rlhf_fast.models import RewardModel

    directory = tmp_path_factory.mktemp("tiny_rm")
    RewardModel.from_policy(str(model_dir)).save_pretrained(
        directory, tokenizer=AutoTokenizer.from_pretrained(model_dir)
    )
    return directory


def sentence(rng: random.Random, low: int = 1, high: int = 4) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_lines(path: Path, lines) -> Path:
    """Writes `lines` (dicts are JSON-encoded, str written as is, bytes raw), one per line."""
    with open(path, "wb") as file:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            file.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


def demonstrations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng), "response": sentence(rng)} for _ in range(count)]


def rankings(count: int, seed: int = 0) -> list[dict]:
    """Rankings with K = 2..4 (distinct completions), and one chosen/rejected pair."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        k = 2 + index % 3
        completions = [" ".join([WORDS[j]] * (1 + j % 3)) for j in rng.sample(range(len(WORDS)), k)]
        ranks = list(range(k))
        rng.shuffle(ranks)
        records.append({"prompt": sentence(rng), "completions": completions, "ranks": ranks})
    records.append({"prompt": sentence(rng), "chosen": "w1 w2", "rejected": "w3"})
    return records


def prompts(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng)} for _ in range(count)]


def pretrain_text(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": sentence(rng, 6, 12)} for _ in range(count)]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    write_lines(directory / "demos.jsonl", demonstrations(6))
    write_lines(directory / "rankings.jsonl", rankings(5))
    write_lines(directory / "prompts.jsonl", prompts(4))
    write_lines(directory / "text.jsonl", pretrain_text(6))
    return directory


@pytest.fixture
def cli(capsys):
    """Runs `rlhf-fast ARGS` in-process: returns (exit status, stdout, stderr)."""
    from rlhf_fast.cli import main

    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def no_progress(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_NO_PROGRESS", "1")


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any model weights are loaded."""
    from rlhf_fast.models import PolicyModel, RewardModel

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(PolicyModel, "from_pretrained", refuse)
    monkeypatch.setattr(RewardModel, "from_pretrained", refuse)
    monkeypatch.setattr(RewardModel, "from_policy", refuse)
    monkeypatch.setattr(RewardModel, "from_causal_lm", refuse)


def error_line(stderr: str) -> str:
    """The single error line of a user error, checking that nothing else (no traceback) was printed."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rlhf-fast"), lines[0]
    return lines[0]
