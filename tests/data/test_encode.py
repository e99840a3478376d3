"""Tokenization with the truncation policies: exact ids, counts, and errors naming file, line and field."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_fast.data import (
    DataError,
    Demonstration,
    PretrainText,
    PromptRecord,
    Ranking,
    SourceLocation,
    encode_demonstrations,
    encode_pretrain,
    encode_prompts,
    encode_rankings,
)
from rlhf_fast.data.encode import TruncationPolicy, plan_fit
from tests.data.conftest import words

SOURCE = "train.jsonl"


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def demos(rng, lengths: list[tuple[int, int]]) -> list[Demonstration]:
    return [
        Demonstration(words(rng, p), words(rng, r), SourceLocation(SOURCE, i + 1))
        for i, (p, r) in enumerate(lengths)
    ]


def test_demonstration_ids_are_prompt_then_response_then_eos(tokenizer, rng):
    records = demos(rng, [(rng.randrange(1, 20), rng.randrange(1, 20)) for _ in range(8)])
    encoded = encode_demonstrations(records, tokenizer, max_length=64)
    assert len(encoded) == len(records) and encoded.examples is encoded.items
    for example, record in zip(encoded, records):
        prompt_ids = ids(tokenizer, record.prompt)
        assert example.input_ids == prompt_ids + ids(tokenizer, record.response) + [tokenizer.eos_token_id]
        assert example.prompt_length == len(prompt_ids)
        assert example.source == record.source
    assert encoded.report.total == encoded.report.kept == len(records)
    assert not encoded.report.counts and encoded.report.tokens_dropped == 0


def test_error_policy_names_the_prompt_with_lengths(tokenizer, rng):
    max_length = rng.randrange(8, 30)
    response = rng.randrange(1, max_length - 2)
    prompt = max_length - response  # one token too many once eos is added
    records = demos(rng, [(1, 1), (prompt, response)])
    with pytest.raises(DataError) as caught:
        encode_demonstrations(records, tokenizer, max_length)
    error = caught.value
    assert str(error).startswith(f"{SOURCE}:2: field 'prompt': ")
    assert (
        f"prompt {prompt} + response {response} + eos 1 = {max_length + 1} tokens > max_length {max_length}"
        in str(error)
    )
    assert error.kind == "too_long"


def test_error_policy_names_a_response_that_cannot_fit(tokenizer, rng):
    max_length = rng.randrange(8, 30)
    records = demos(rng, [(3, max_length - 1)])  # response + eos = max_length: no room for a prompt token
    for policy in ("error", "truncate_prompt"):
        with pytest.raises(DataError, match="no room for a prompt token") as caught:
            encode_demonstrations(records, tokenizer, max_length, policy)
        assert str(caught.value).startswith(f"{SOURCE}:1: field 'response': ")


def test_skip_policy_counts_and_drops(tokenizer, rng):
    max_length = 16
    lengths = [(rng.randrange(1, 14), rng.randrange(1, 14)) for _ in range(30)]
    records = demos(rng, lengths)
    encoded = encode_demonstrations(records, tokenizer, max_length, "skip")
    fits = [p + r + 1 <= max_length for p, r in lengths]
    assert [e.source.line for e in encoded] == [i + 1 for i, fit in enumerate(fits) if fit]
    assert encoded.report.counts["skipped_too_long"] == fits.count(False)
    assert encoded.report.kept == fits.count(True) and encoded.report.total == len(records)
    if not all(fits):
        first = fits.index(False) + 1
        assert encoded.report.first_source["skipped_too_long"] == SourceLocation(SOURCE, first)
        assert f"first at {SOURCE}:{first}" in encoded.report.format()


def test_truncate_prompt_keeps_the_prompt_tail_and_the_whole_response(tokenizer, rng):
    max_length = 20
    lengths = [(rng.randrange(1, 30), rng.randrange(1, 19)) for _ in range(30)]
    records = demos(rng, lengths)
    encoded = encode_demonstrations(records, tokenizer, max_length, "truncate_prompt")
    assert len(encoded) == len(records)
    dropped = 0
    for example, record in zip(encoded, records):
        prompt_ids, response_ids = ids(tokenizer, record.prompt), ids(tokenizer, record.response)
        keep = min(len(prompt_ids), max_length - len(response_ids) - 1)
        dropped += len(prompt_ids) - keep
        assert example.input_ids == prompt_ids[len(prompt_ids) - keep :] + response_ids + [
            tokenizer.eos_token_id
        ]
        assert example.prompt_length == keep >= 1
        assert len(example.input_ids) <= max_length
    truncated = sum(p + r + 1 > max_length for p, r in lengths)
    assert encoded.report.counts == ({"truncated_prompt": truncated} if truncated else {})
    assert encoded.report.tokens_dropped == dropped


def test_ranking_ids_encode_each_completion_with_eos(tokenizer, rng):
    records = []
    for i in range(6):
        k = rng.randrange(2, 10)
        completions = tuple(f"w{j} " + words(rng, rng.randrange(0, 6)) for j in range(k))
        ranks = (0, 1) + tuple(rng.randrange(k) for _ in range(k - 2))
        records.append(
            Ranking(words(rng, rng.randrange(1, 8)), completions, ranks, SourceLocation(SOURCE, i + 1))
        )
    encoded = encode_rankings(records, tokenizer, max_length=32)
    for item, record in zip(encoded, records):
        assert item.prompt_ids == ids(tokenizer, record.prompt)
        assert item.completion_ids == tuple(
            ids(tokenizer, c) + [tokenizer.eos_token_id] for c in record.completions
        )
        assert item.ranks == record.ranks and item.k == record.k


def test_ranking_too_long_names_the_completion(tokenizer, rng):
    k = rng.randrange(3, 10)
    long_index = rng.randrange(k)
    completions = tuple(f"w{j}" if j != long_index else f"w{j} " + words(rng, 12) for j in range(k))
    record = Ranking("w1 w2 w3", completions, tuple(range(k)), SourceLocation(SOURCE, 7))
    with pytest.raises(DataError) as caught:
        encode_rankings([record], tokenizer, max_length=12)
    assert str(caught.value).startswith(f"{SOURCE}:7: field 'completions[{long_index}]': ")
    assert f"completions[{long_index}] 13 + eos 1" in str(caught.value)

    fits = Ranking("w1 w2 w3 w4 w5", ("w1 w2 w3", "w4"), (0, 1), SourceLocation(SOURCE, 8))
    skipped = encode_rankings([record, fits], tokenizer, max_length=12, policy="skip")
    assert [item.source.line for item in skipped] == [8]
    assert skipped.report.counts == {"skipped_too_long": 1}

    truncated = encode_rankings([fits], tokenizer, max_length=6, policy="truncate_prompt")
    (item,) = truncated
    assert item.prompt_ids == ids(tokenizer, "w4 w5")  # room for the longest completion (3 + eos)
    assert item.completion_ids[1] == ids(tokenizer, "w4") + [tokenizer.eos_token_id]
    assert truncated.report.counts == {"truncated_prompt": 1} and truncated.report.tokens_dropped == 3
    with pytest.raises(DataError, match="no room") as caught:
        encode_rankings([record], tokenizer, max_length=12, policy="truncate_prompt")
    assert caught.value.field == f"completions[{long_index}]"


def test_prompt_policies(tokenizer, rng):
    lengths = [rng.randrange(1, 20) for _ in range(20)] + [15]
    records = [PromptRecord(words(rng, n), SourceLocation(SOURCE, i + 1)) for i, n in enumerate(lengths)]
    limit = 10
    with pytest.raises(DataError) as caught:
        encode_prompts(records, tokenizer, limit)
    first_long = next(i for i, n in enumerate(lengths) if n > limit) + 1
    assert str(caught.value).startswith(f"{SOURCE}:{first_long}: field 'prompt': ")
    assert f"max_prompt_length {limit}" in str(caught.value)

    skipped = encode_prompts(records, tokenizer, limit, "skip")
    assert [len(item.input_ids) for item in skipped] == [n for n in lengths if n <= limit]
    assert skipped.report.counts == {"skipped_too_long": sum(n > limit for n in lengths)}

    truncated = encode_prompts(records, tokenizer, limit, "truncate_prompt")
    for item, record in zip(truncated, records):
        full = ids(tokenizer, record.prompt)
        assert item.input_ids == full[-limit:]
    assert truncated.report.tokens_dropped == sum(max(0, n - limit) for n in lengths)


def test_pretrain_blocks_are_the_concatenation_cut(tokenizer, rng):
    records = [PretrainText(words(rng, rng.randrange(1, 30))) for _ in range(rng.randrange(3, 12))]
    block_size = rng.randrange(2, 9)
    encoded = encode_pretrain(records, tokenizer, block_size)
    stream = [token for r in records for token in ids(tokenizer, r.text) + [tokenizer.eos_token_id]]
    num_blocks = len(stream) // block_size
    assert encoded.blocks.dtype == torch.long and encoded.blocks.shape == (num_blocks, block_size)
    assert encoded.blocks.flatten().tolist() == stream[: num_blocks * block_size]
    assert encoded.num_tokens == len(stream) and len(encoded) == num_blocks
    tail = len(stream) % block_size
    assert encoded.report.tokens_dropped == tail
    assert encoded.report.counts == ({"dropped_tail": 1} if tail else {})


def test_pretrain_shorter_than_a_block_is_an_error(tokenizer):
    with pytest.raises(DataError, match="fewer than one block") as caught:
        encode_pretrain([PretrainText("w1 w2", SourceLocation("c.jsonl", 1))], tokenizer, block_size=8)
    assert caught.value.path == "c.jsonl" and caught.value.field == "text"


def test_argument_checks(tokenizer, tokenizer_without_eos):
    records = [Demonstration("w1", "w2")]
    with pytest.raises(ValueError, match="policy must be one of"):
        encode_demonstrations(records, tokenizer, 8, policy="truncate_left")
    with pytest.raises(ValueError, match="max_length"):
        encode_demonstrations(records, tokenizer, 0)
    with pytest.raises(ValueError, match="max_prompt_length"):
        encode_prompts([PromptRecord("w1")], tokenizer, -1)
    with pytest.raises(ValueError, match="eos"):
        encode_demonstrations(records, tokenizer_without_eos, 8)
    with pytest.raises(ValueError, match=r"records\[0\] must be a Demonstration"):
        encode_demonstrations([PromptRecord("w1")], tokenizer, 8)


def test_in_memory_records_are_named_by_index(tokenizer):
    records = [Demonstration("w1", "w2"), Demonstration("w1 w2 w3 w4", "w5")]
    with pytest.raises(DataError) as caught:
        encode_demonstrations(records, tokenizer, 4)
    assert str(caught.value).startswith("<memory>:2: field 'prompt': ")


def test_records_built_in_memory_are_validated():
    with pytest.raises(DataError, match="duplicate") as caught:
        Ranking("w1", ["w2", "w2"], [0, 1])
    assert caught.value.field == "completions[1]"
    ranking = Ranking("w1", ["w2", "w3"], [1, 0])
    assert ranking.completions == ("w2", "w3") and ranking.ranks == (1, 0)  # lists are frozen into tuples
    hash(ranking)


@settings(max_examples=300, deadline=None)
@given(
    prompt_length=st.integers(0, 60),
    target_lengths=st.lists(st.integers(0, 60), max_size=9),
    max_length=st.integers(1, 80),
    policy=st.sampled_from(list(TruncationPolicy)),
)
def test_plan_fit_outcomes(prompt_length, target_lengths, max_length, policy):
    fit = plan_fit(prompt_length, target_lengths, max_length, policy)
    longest = max(target_lengths) + 1 if target_lengths else 0
    fits = prompt_length + longest <= max_length
    room_for_prompt = longest + 1 <= max_length
    if fits:
        assert fit.outcome == "fits" and fit.prompt_keep == prompt_length
    elif policy is TruncationPolicy.SKIP:
        assert fit.outcome == "skip"
    elif policy is TruncationPolicy.TRUNCATE_PROMPT and room_for_prompt:
        assert fit.outcome == "truncate"
        assert 1 <= fit.prompt_keep < prompt_length and fit.prompt_keep + longest == max_length
    else:
        assert fit.outcome == "error"
    if not fits:
        assert fit.field == ("prompt" if room_for_prompt else "response")
        assert f"{max_length}" in fit.reason
