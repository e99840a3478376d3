"""The tiny GPT family and the word-level tokenizer: shapes, seeding, and transformers round trips."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_fast.models import SPECIAL_TOKENS, TINY_SIZES, PolicyModel, build_word_tokenizer, tiny_causal_lm

WORDS = ["the", "cat", "sat", "on", "mat", ".", "the"]


@pytest.mark.parametrize("size", sorted(TINY_SIZES))
def test_tiny_sizes(size):
    model = tiny_causal_lm(size, vocab_size=53, max_positions=40, seed=3)
    shape = TINY_SIZES[size]
    assert model.config.n_layer == shape["n_layer"] and model.config.n_embd == shape["n_embd"]
    assert model.config.n_positions == 40 and model.config.vocab_size == 53
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.0
    assert model.lm_head.weight is model.transformer.wte.weight
    sizes = [TINY_SIZES[s]["n_embd"] * TINY_SIZES[s]["n_layer"] for s in ("tiny", "small", "base")]
    assert sizes == sorted(sizes)


def test_tiny_seeding_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = tiny_causal_lm("tiny", 31, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    second = tiny_causal_lm("tiny", 31, seed=7)
    other = tiny_causal_lm("tiny", 31, seed=8)
    for (name, a), (_, b), (_, c) in zip(first.named_parameters(), second.named_parameters(),
                                         other.named_parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.transformer.wte.weight, other.transformer.wte.weight)


def test_tiny_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        tiny_causal_lm("huge", 10)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_causal_lm("tiny", 0)
    with pytest.raises(ValueError, match="eos_token_id"):
        tiny_causal_lm("tiny", 2)


def test_word_tokenizer_ids_padding_and_round_trip(tmp_path):
    tokenizer = build_word_tokenizer(WORDS, padding_side="left")
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert len(tokenizer) == 4 + 6  # "the" once
    encoded = tokenizer(["the cat sat", "mat"], padding=True)
    assert encoded["input_ids"] == [[4, 5, 6], [0, 0, 8]]
    assert encoded["attention_mask"] == [[1, 1, 1], [0, 0, 1]]
    assert tokenizer("the dog")["input_ids"] == [4, 3]
    assert tokenizer.decode([4, 5, 6, 9]) == "the cat sat ."

    model = tiny_causal_lm("tiny", len(tokenizer))
    PolicyModel(model).save_pretrained(tmp_path, tokenizer=tokenizer)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.padding_side == "left"
    assert reloaded(["the cat sat", "mat"], padding=True)["input_ids"] == encoded["input_ids"]
    assert reloaded.pad_token == "[pad]" and reloaded.eos_token_id == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.vocab_size == len(tokenizer)


def test_word_tokenizer_options():
    right = build_word_tokenizer(WORDS, padding_side="right", add_bos_token=True)
    assert right(["cat", "the cat"], padding=True)["input_ids"] == [[1, 5, 0], [1, 4, 5]]
    with pytest.raises(ValueError, match="padding_side"):
        build_word_tokenizer(WORDS, padding_side="middle")
    with pytest.raises(ValueError, match="words"):
        build_word_tokenizer(["two words"])
