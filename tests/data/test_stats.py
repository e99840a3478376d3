"""Dataset statistics: counts, histograms, K distribution, what each policy would do (as encode does)."""

from __future__ import annotations

import collections

import pytest

from rlhf_fast.data import (
    Demonstration,
    PretrainText,
    PromptRecord,
    Ranking,
    describe,
    encode_demonstrations,
    encode_pretrain,
    encode_rankings,
    format_stats,
    read_demonstrations,
    read_rankings,
)
from rlhf_fast.data.stats import LengthHistogram
from tests.data.conftest import words


def test_histogram_buckets_hold_every_length(rng):
    lengths = [rng.randrange(1, 3000) for _ in range(rng.randrange(1, 200))]
    histogram = LengthHistogram.of("x", lengths, num_buckets=10)
    assert sum(histogram.counts) == histogram.count == len(lengths)
    assert len(histogram.counts) <= 11
    for edge, count in zip(histogram.edges, histogram.counts):
        assert count == sum(edge <= n < edge + histogram.width for n in lengths)
    assert (histogram.minimum, histogram.maximum) == (min(lengths), max(lengths))
    assert histogram.mean == pytest.approx(sum(lengths) / len(lengths))
    assert histogram.p50 == sorted(lengths)[(len(lengths) - 1) // 2]
    text = histogram.format()
    assert len(text.splitlines()) == len(histogram.counts) + 1
    assert "#" in text


@pytest.mark.parametrize("policy", ["error", "skip", "truncate_prompt"])
def test_demonstration_stats_agree_with_encoding(tmp_path, tokenizer, rng, policy):
    from rlhf_fast.data import write_jsonl

    records = [
        Demonstration(words(rng, rng.randrange(1, 25)), words(rng, rng.randrange(1, 25))) for _ in range(40)
    ]
    lines = [r.to_dict() for r in records] + [{"prompt": "w1", "response": ""}, {"prompt": "w1"}]
    lines[0]["note"] = "extra"
    path = tmp_path / "d.jsonl"
    write_jsonl(path, lines)
    loaded = read_demonstrations(path, on_bad_record="skip")
    max_length = 24
    stats = describe(loaded, tokenizer, max_length=max_length, policy=policy)
    assert stats.kind == "demonstrations" and stats.path == str(path) and stats.num_records == len(records)
    assert stats.skipped == collections.Counter({"empty_text": 1, "missing_field": 1})
    assert stats.extra_fields == collections.Counter({"note": 1})
    prompt_lengths = [len(r.prompt.split()) for r in records]
    response_lengths = [len(r.response.split()) for r in records]
    assert stats.histograms["prompt"].count == len(records)
    assert stats.histograms["total"].maximum == max(
        p + r + 1 for p, r in zip(prompt_lengths, response_lengths)
    )
    too_long = sum(p + r + 1 > max_length for p, r in zip(prompt_lengths, response_lengths))
    assert stats.fit_outcomes["fits"] == len(records) - too_long
    if policy == "skip":
        encoded = encode_demonstrations(loaded, tokenizer, max_length, policy)
        assert stats.fit_outcomes["skip"] == encoded.report.counts["skipped_too_long"] == too_long
    elif policy == "truncate_prompt":
        unfit_alone = sum(r + 2 > max_length for r in response_lengths)
        assert stats.fit_outcomes["error"] == unfit_alone
        assert stats.fit_outcomes["truncate"] == too_long - unfit_alone
    else:
        assert stats.fit_outcomes["error"] == too_long
    text = format_stats(stats)
    assert f"records: {len(records)}" in text and "empty_text" in text and "'note' (1)" in text
    assert f"policy '{policy}'" in text
    if too_long:
        assert f"{path}:" in text  # the first record that does not fit is named


def test_ranking_stats_k_distribution(write_lines, tokenizer, rng):
    lines = []
    for _ in range(30):
        k = rng.randrange(2, 10)
        lines.append(
            {
                "prompt": words(rng, 3),
                "completions": [f"w{j} " + words(rng, rng.randrange(0, 4)) for j in range(k)],
                "ranks": [0, 1] + [rng.randrange(k) for _ in range(k - 2)],
            }
        )
    lines.append({"prompt": "w1", "chosen": "w2", "rejected": "w3"})
    loaded = read_rankings(write_lines(lines))
    stats = describe(loaded, tokenizer)
    expected = collections.Counter(len(line.get("completions", [0, 0])) for line in lines)
    assert stats.k_distribution == expected
    assert stats.histograms["sequence"].count == sum(expected[k] * k for k in expected)
    assert not stats.fit_outcomes  # no max_length given
    text = format_stats(stats)
    for k in expected:
        assert f"K={k} |" in text
    encoded = encode_rankings(loaded, tokenizer, max_length=64)
    encoded_stats = describe(encoded)
    assert encoded_stats.k_distribution == expected and encoded_stats.truncation is encoded.report
    assert encoded_stats.histograms["sequence"].maximum == stats.histograms["sequence"].maximum
    assert "encoding:" in format_stats(encoded_stats)


def test_prompt_and_pretrain_stats(tokenizer, rng):
    prompts = [PromptRecord(words(rng, rng.randrange(1, 20))) for _ in range(15)]
    stats = describe(prompts, tokenizer, max_length=10, policy="skip")
    assert stats.fit_outcomes["skip"] == sum(len(p.prompt.split()) > 10 for p in prompts)
    assert "max_prompt_length 10" in format_stats(stats)

    texts = [PretrainText(words(rng, rng.randrange(1, 50))) for _ in range(10)]
    stats = describe(texts, tokenizer, max_length=16)
    total = sum(len(t.text.split()) + 1 for t in texts)
    assert stats.num_tokens == total and stats.num_blocks == total // 16
    encoded = encode_pretrain(texts, tokenizer, 16)
    encoded_stats = describe(encoded)
    assert (encoded_stats.num_tokens, encoded_stats.num_blocks) == (total, total // 16)
    assert f"{total // 16} blocks of 16" in format_stats(encoded_stats)


def test_describe_argument_checks(tokenizer):
    with pytest.raises(ValueError, match="tokenizer is required"):
        describe([PromptRecord("w1")])
    with pytest.raises(ValueError, match="no records"):
        describe([], tokenizer)
    with pytest.raises(ValueError, match=r"data\[1\] is a PromptRecord"):
        describe([PretrainText("w1"), PromptRecord("w1")], tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        describe([PromptRecord("w1")], tokenizer, max_length=0)
    with pytest.raises(ValueError, match="policy"):
        describe([PromptRecord("w1")], tokenizer, policy="clip")
    with pytest.raises(ValueError, match="Ranking"):
        describe([1, 2], tokenizer)
    assert describe([Ranking("w1", ("w2", "w3"), (0, 1))], tokenizer).k_distribution == {2: 1}
