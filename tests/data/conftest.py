"""Fixtures for the data-layer tests: a tiny word-level tokenizer (with and without a chat template), a
JSONL-writing helper, and a random generator seeded afresh each run."""

from __future__ import annotations

import json
import random

import pytest

SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<bos>"]
WORDS = [f"w{i}" for i in range(400)] + ["system", "user", "assistant", "<", ">", ":", "hello", "world"]
# Renders each message as "< role > content" and, for a generation prompt, opens the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}{% endif %}"
    "<{{ message['role'] }}> {{ message['content'] }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """What CHAT_TEMPLATE renders, written out in Python, to check the reader's output independently."""
    text = "".join(f"<{m['role']}> {m['content']} " for m in messages)
    return text + ("<assistant> " if add_generation_prompt else "")


def _build_tokenizer(chat_template: str | None, eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>" if eos else None,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """Word-level tokenizer: one token per whitespace-separated word, ids of w0..w399 distinct."""
    return _build_tokenizer(None)


@pytest.fixture(scope="session")
def chat_tokenizer():
    return _build_tokenizer(CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tokenizer_without_eos():
    return _build_tokenizer(None, eos=False)


@pytest.fixture
def rng() -> random.Random:
    """A generator seeded from fresh entropy each run; the seed is in the repr for reproducing a failure."""
    seed = random.SystemRandom().randrange(2**32)

    class SeededRandom(random.Random):
        def __repr__(self) -> str:
            return f"Random(seed={seed})"

    return SeededRandom(seed)


def words(rng: random.Random, count: int) -> str:
    """`count` random vocabulary words: exactly `count` tokens under the test tokenizer."""
    return " ".join(f"w{rng.randrange(400)}" for _ in range(count))


@pytest.fixture
def write_lines(tmp_path):
    """Writes lines (dicts are JSON-encoded, str written as is, bytes written raw) to a fresh .jsonl file."""
    counter = iter(range(10**6))

    def write(lines, name: str | None = None):
        path = tmp_path / (name or f"data{next(counter)}.jsonl")
        with open(path, "wb") as file:
            for line in lines:
                if isinstance(line, dict):
                    line = json.dumps(line)
                if isinstance(line, str):
                    line = line.encode("utf-8")
                file.write(line + b"\n")
        return path

    return write
