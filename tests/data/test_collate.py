"""Collation: shapes, padding, the exact loss mask, packing without cross-document attention, rankings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_fast.data import (
    EncodedPrompt,
    EncodedRanking,
    SFTExample,
    collate_pretrain,
    collate_prompts,
    collate_rankings,
    collate_rankings_shared_prompt,
    prompt_sharing_pays,
    collate_sft,
    pack_sft,
    packed_attention_mask,
)
from rlhf_fast.data.collate import _best_fit_decreasing

PAD = 0
EOS = 2


def random_examples(rng, count: int, max_prompt: int = 12, max_response: int = 12) -> list[SFTExample]:
    examples = []
    for _ in range(count):
        prompt = [rng.randrange(4, 100) for _ in range(rng.randrange(1, max_prompt + 1))]
        response = [rng.randrange(4, 100) for _ in range(rng.randrange(0, max_response))] + [EOS]
        examples.append(SFTExample(prompt + response, len(prompt)))
    return examples


def test_collate_sft_shapes_padding_and_exact_loss_mask(rng):
    examples = random_examples(rng, rng.randrange(1, 9))
    batch = collate_sft(examples, pad_id=PAD)
    longest = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (len(examples), longest) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool and batch["loss_mask"].dtype == torch.bool
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids
        assert (batch["input_ids"][row, n:] == PAD).all()
        assert batch["attention_mask"][row].tolist() == [True] * n + [False] * (longest - n)
        # Exactly the response tokens and the eos are targets.
        targets = batch["input_ids"][row][batch["loss_mask"][row]].tolist()
        assert targets == example.input_ids[example.prompt_length :]
        assert not batch["loss_mask"][row, 0]
    # With shifted targets, the mask selects each response token once, predicted from the position before.
    shifted_targets = batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:]]
    assert shifted_targets.tolist() == [t for e in examples for t in e.input_ids[e.prompt_length :]]


def test_collate_sft_accepts_mappings_and_checks_prompt_length():
    batch = collate_sft([{"input_ids": [5, 6, 2], "prompt_length": 2}], pad_id=PAD)
    assert batch["loss_mask"].tolist() == [[False, False, True]]
    with pytest.raises(ValueError, match=r"examples\[1\] has prompt_length 3"):
        collate_sft([SFTExample([5, 6, 2], 2), SFTExample([5, 6, 2], 3)], pad_id=PAD)
    with pytest.raises(ValueError, match="prompt_length 0"):
        collate_sft([SFTExample([5, 6, 2], 0)], pad_id=PAD)
    with pytest.raises(ValueError, match="examples is empty"):
        collate_sft([], pad_id=PAD)


def reference_packed_mask(document_ids: torch.Tensor) -> torch.Tensor:
    batch, length = document_ids.shape
    mask = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                doc_q, doc_k = int(document_ids[b, q]), int(document_ids[b, k])
                mask[b, q, k] = (doc_q >= 0 and doc_q == doc_k and k <= q) or (doc_q < 0 and k == q)
    return mask


def test_pack_sft_places_each_example_once_with_reset_positions(rng):
    block_size = rng.randrange(24, 40)
    examples = random_examples(rng, rng.randrange(1, 16))
    packed = pack_sft(examples, block_size, pad_id=PAD)
    rows = packed["input_ids"].shape[0]
    for key in ("input_ids", "position_ids", "loss_mask", "attention_mask", "document_ids"):
        assert packed[key].shape == (rows, block_size)
    assert packed["loss_mask"].dtype == torch.bool and packed["document_ids"].dtype == torch.long
    total = sum(len(e.input_ids) for e in examples)
    assert rows * block_size >= total and rows <= len(examples)
    seen = set()
    for row in range(rows):
        documents = packed["document_ids"][row]
        for doc in documents.unique().tolist():
            positions = (documents == doc).nonzero().flatten()
            if doc < 0:
                assert (packed["input_ids"][row, positions] == PAD).all()
                assert positions.tolist() == list(
                    range(block_size - len(positions), block_size)
                )  # at the end
                continue
            seen.add(doc)
            example = examples[doc]
            # Contiguous, in order, with positions restarting at 0.
            assert positions.tolist() == list(
                range(int(positions[0]), int(positions[0]) + len(example.input_ids))
            )
            assert packed["input_ids"][row, positions].tolist() == example.input_ids
            assert packed["position_ids"][row, positions].tolist() == list(range(len(example.input_ids)))
            assert (
                packed["input_ids"][row, positions][packed["loss_mask"][row, positions]].tolist()
                == example.input_ids[example.prompt_length :]
            )
            assert not packed["loss_mask"][row, positions[0]]  # no loss across a document boundary
    assert seen == set(range(len(examples)))
    assert torch.equal(packed["attention_mask"], packed["document_ids"] >= 0)


def test_packed_attention_mask_blocks_cross_document_attention(rng):
    examples = random_examples(rng, 9, max_prompt=5, max_response=5)
    packed = pack_sft(examples, 16, pad_id=PAD)
    mask = packed_attention_mask(packed["document_ids"])
    assert torch.equal(mask, reference_packed_mask(packed["document_ids"]))
    # Attention over a packed row gives each document exactly what it gets alone.
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    rows, length = packed["input_ids"].shape
    q, k, v = (torch.randn(rows, 1, length, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    packed_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    assert torch.isfinite(packed_out).all()  # padding rows are not empty softmax rows
    for row in range(rows):
        for doc in packed["document_ids"][row].unique().tolist():
            if doc < 0:
                continue
            where = (packed["document_ids"][row] == doc).nonzero().flatten()
            alone = torch.nn.functional.scaled_dot_product_attention(
                q[row : row + 1, :, where],
                k[row : row + 1, :, where],
                v[row : row + 1, :, where],
                is_causal=True,
            )
            torch.testing.assert_close(packed_out[row : row + 1, :, where], alone)


def test_pack_sft_argument_checks():
    with pytest.raises(ValueError, match=r"examples\[1\] has 5 tokens, more than block_size 4"):
        pack_sft([SFTExample([5, 2], 1), SFTExample([5, 6, 7, 8, 2], 1)], 4, pad_id=PAD)
    with pytest.raises(ValueError, match="block_size"):
        pack_sft([SFTExample([5, 2], 1)], 1, pad_id=PAD)


def random_rankings(rng) -> list[EncodedRanking]:
    """1-5 rankings of K = 2..9 completions (0-5 tokens + eos) after prompts of 1-7 tokens."""
    items = []
    for _ in range(rng.randrange(1, 6)):
        k = rng.randrange(2, 10)
        prompt = [rng.randrange(4, 100) for _ in range(rng.randrange(1, 8))]
        completions = tuple(
            [rng.randrange(4, 100) for _ in range(rng.randrange(0, 6))] + [EOS] for _ in range(k)
        )
        items.append(EncodedRanking(prompt, completions, tuple(rng.randrange(k) for _ in range(k))))
    return items


def test_collate_rankings_encodes_each_completion_once(rng):
    items = random_rankings(rng)
    expected_rows = [item.prompt_ids + c for item in items for c in item.completion_ids]
    for side in ("right", "left"):
        batch = collate_rankings(items, pad_id=PAD, padding_side=side)
        total = sum(item.k for item in items)
        longest = max(len(row) for row in expected_rows)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (total, longest)
        assert batch["group_sizes"].tolist() == [item.k for item in items]
        assert batch["group_sizes"].dtype == batch["ranks"].dtype == torch.long
        assert batch["ranks"].tolist() == [r for item in items for r in item.ranks]
        rows = [batch["input_ids"][i][batch["attention_mask"][i]].tolist() for i in range(total)]
        assert rows == expected_rows
        last = batch["input_ids"].gather(1, batch["last_token_index"][:, None]).flatten()
        assert (last == EOS).all()
        assert batch["attention_mask"].gather(1, batch["last_token_index"][:, None]).all()
        if side == "left":
            assert (batch["last_token_index"] == longest - 1).all()
        else:
            assert batch["last_token_index"].tolist() == [len(row) - 1 for row in expected_rows]
    with pytest.raises(ValueError, match="padding_side"):
        collate_rankings(items, pad_id=PAD, padding_side="middle")


def test_collate_rankings_shared_prompt_puts_the_prompt_once_before_its_completions(rng):
    items = random_rankings(rng)
    batch = collate_rankings_shared_prompt(items, pad_id=PAD)
    longest = max(len(item.prompt_ids) + sum(map(len, item.completion_ids)) for item in items)
    for key in ("input_ids", "attention_mask", "segment_ids", "position_ids"):
        assert batch[key].shape == (len(items), longest), key
    assert batch["group_sizes"].tolist() == [item.k for item in items]
    assert batch["ranks"].tolist() == [r for item in items for r in item.ranks]
    assert batch["attention_mask"].tolist() == (batch["segment_ids"] >= 0).tolist()
    completion = 0
    for row, item in enumerate(items):
        segments, ids = batch["segment_ids"][row], batch["input_ids"][row]
        positions = batch["position_ids"][row]
        assert ids[segments == 0].tolist() == item.prompt_ids
        assert positions[segments == 0].tolist() == list(range(len(item.prompt_ids)))
        for segment, expected in enumerate(item.completion_ids, start=1):
            assert ids[segments == segment].tolist() == expected
            start = len(item.prompt_ids)
            assert positions[segments == segment].tolist() == list(range(start, start + len(expected)))
            assert batch["score_rows"][completion] == row
            last = int(batch["last_token_index"][completion])
            assert segments[last] == segment and ids[last] == EOS
            assert last + 1 == len(ids) or segments[last + 1] != segment
            completion += 1
        assert (ids[segments < 0] == PAD).all()
    assert completion == batch["score_rows"].numel() == batch["last_token_index"].numel()
    with pytest.raises(ValueError, match="at least 2"):
        collate_rankings_shared_prompt([EncodedRanking([5], ([6, EOS],), (0,))], pad_id=PAD)


def test_prompt_sharing_pays_for_long_prompts_and_not_for_long_completions():
    long_prompt = EncodedRanking(list(range(4, 104)), tuple([5] * 20 + [EOS] for _ in range(4)), (0, 1, 2, 3))
    assert prompt_sharing_pays([long_prompt], hidden_size=64)
    # Nine completions of 200 tokens after a 5-token prompt: one row of 1,814 tokens attends over all of them.
    long_completions = EncodedRanking([4] * 5, tuple([5] * 200 + [EOS] for _ in range(9)), tuple(range(9)))
    assert not prompt_sharing_pays([long_completions], hidden_size=64)
    # In a wide model the projections dominate and the two layouts cost about the same: sharing stays.
    assert prompt_sharing_pays([long_completions], hidden_size=4096)


def test_collate_prompts_left_pads(rng):
    prompts = [
        [rng.randrange(4, 100) for _ in range(rng.randrange(1, 10))] for _ in range(rng.randrange(1, 8))
    ]
    items = [EncodedPrompt(p) for p in prompts]
    batch = collate_prompts(items, pad_id=PAD)
    longest = max(map(len, prompts))
    assert batch["input_ids"].shape == (len(prompts), longest)
    assert batch["attention_mask"][:, -1].all()  # every prompt ends in the last column
    for row, prompt in enumerate(prompts):
        assert batch["input_ids"][row, longest - len(prompt) :].tolist() == prompt
        assert batch["attention_mask"][row].tolist() == [False] * (longest - len(prompt)) + [True] * len(
            prompt
        )
        assert (batch["input_ids"][row, : longest - len(prompt)] == PAD).all()
    assert torch.equal(collate_prompts(prompts, pad_id=PAD)["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match=r"items\[0\] has no tokens"):
        collate_prompts([[]], pad_id=PAD)


def test_collate_pretrain(rng):
    blocks = [[rng.randrange(100) for _ in range(6)] for _ in range(3)]
    stacked = collate_pretrain(blocks)
    assert stacked.dtype == torch.long and stacked.tolist() == blocks
    assert collate_pretrain([torch.tensor(b) for b in blocks]).tolist() == blocks
    with pytest.raises(ValueError, match=r"blocks\[1\] has shape \(5,\)"):
        collate_pretrain([blocks[0], blocks[1][:5]])


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=40),
    capacity=st.integers(20, 64),
)
def test_best_fit_decreasing_places_every_item_once_within_capacity(lengths, capacity):
    bins = _best_fit_decreasing(lengths, capacity)
    placed = sorted(index for members in bins for index in members)
    assert placed == list(range(len(lengths)))
    for members in bins:
        assert members == sorted(members) and sum(lengths[i] for i in members) <= capacity
    # No two bins could be merged: otherwise best-fit would have filled the first one.
    loads = sorted(sum(lengths[i] for i in members) for members in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_pad_rows_pads_on_either_side_and_masks_real_tokens():
    from rlhf_fast.data import pad_rows

    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=1, side="left", length=4)
    assert ids.tolist() == [[1, 5, 6, 7], [1, 1, 1, 8]] and mask.tolist() == [[False, True, True, True],
                                                                               [False, False, False, True]]
    with pytest.raises(ValueError, match="side"):
        pad_rows([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="shorter than the longest row"):
        pad_rows([[1, 2, 3]], 0, length=2)
    with pytest.raises(ValueError, match="empty"):
        pad_rows([], 0)
