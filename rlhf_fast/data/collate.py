"""Batching encoded examples into padded tensors. Pure torch on the CPU; the trainer moves batches.

Conventions shared by every function here:

- ``input_ids`` are int64; masks are bool.
- Next-token targets: the logits at position t-1 predict the token at position t. ``loss_mask[:, t]`` is True
  where token t is a response token (or the response's final eos) to be predicted from position t-1, so a loss
  is ``nll(logits[:, :-1], input_ids[:, 1:])`` averaged over ``loss_mask[:, 1:]``. ``loss_mask[:, 0]`` is
  always False (a response always has at least one prompt token before it).
- Examples may be encoded objects (`SFTExample`, `EncodedRanking`, `EncodedPrompt`) or plain mappings /
  sequences with the same fields, so callers that build token ids themselves can use the same collators.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "pad_rows",
    "collate_sft",
    "pack_sft",
    "packed_attention_mask",
    "collate_rankings",
    "collate_rankings_shared_prompt",
    "prompt_sharing_pays",
    "collate_prompts",
    "collate_pretrain",
]

PADDING_SIDES = ("right", "left")


def _field(item: Any, name: str) -> Any:
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


def _ids(item: Any, name: str = "input_ids") -> list[int]:
    """`item`'s token ids: the `name` field of an object or mapping, or the item itself if a sequence."""
    if isinstance(item, torch.Tensor):
        return item.tolist()
    if isinstance(item, Sequence) and not isinstance(item, str):
        return list(item)
    value = _field(item, name)
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def _check_nonempty(name: str, items: Sequence) -> None:
    if len(items) == 0:
        raise ValueError(f"{name} is empty: nothing to collate")


def _sft_example(example: Any, index: int, name: str = "examples") -> tuple[list[int], int]:
    input_ids = _ids(example)
    prompt_length = int(_field(example, "prompt_length"))
    if not 1 <= prompt_length < len(input_ids):
        raise ValueError(
            f"{name}[{index}] has prompt_length {prompt_length} but {len(input_ids)} input_ids; "
            "need 1 <= prompt_length < len(input_ids) (a prompt token and a response token)"
        )
    return input_ids, prompt_length


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, side: str = "right", length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch: [B, L] int64 ids padded with `pad_id` on `side`
    ("right", or "left" for generation, which puts every row's last token at L-1), and the [B, L] bool mask of
    real tokens. L is the longest row, or `length` (at least that)."""
    if side not in PADDING_SIDES:
        raise ValueError(f"side must be one of {PADDING_SIDES}, got {side!r}")
    _check_nonempty("rows", rows)
    longest = max(len(row) for row in rows)
    if length is None:
        length = longest
    elif length < longest:
        raise ValueError(f"length {length} is shorter than the longest row ({longest} tokens)")
    input_ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for row_index, row in enumerate(rows):
        start = 0 if side == "right" else length - len(row)
        input_ids[row_index, start : start + len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[row_index, start : start + len(row)] = True
    return input_ids, attention_mask


def collate_sft(examples: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads SFT examples (`input_ids`, `prompt_length`) into one batch.

    Returns ``input_ids`` [B, L] int64 (L = longest example), ``attention_mask`` [B, L] bool (real tokens) and
    ``loss_mask`` [B, L] bool, True at positions prompt_length .. len-1 of each example: exactly the response
    tokens and the final eos, each the target of the prediction made at the position before it.
    """
    _check_nonempty("examples", examples)
    parsed = [_sft_example(example, index) for index, example in enumerate(examples)]
    input_ids, attention_mask = pad_rows([ids for ids, _ in parsed], pad_id)
    positions = torch.arange(input_ids.shape[1])
    prompt_lengths = torch.tensor([prompt_length for _, prompt_length in parsed])
    loss_mask = attention_mask & (positions[None, :] >= prompt_lengths[:, None])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Groups item indices into bins of total length <= capacity (best-fit decreasing, O(n log n))."""
    bins: list[list[int]] = []
    # Sorted (remaining capacity, bin index) pairs; a new item goes to the fullest bin that still has room.
    open_bins: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        position = bisect.bisect_left(open_bins, (length, -1))
        if position < len(open_bins):
            remaining, bin_index = open_bins.pop(position)
        else:
            remaining, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if remaining - length > 0:
            bisect.insort(open_bins, (remaining - length, bin_index))
    for members in bins:  # keep the callers' order inside a block
        members.sort()
    return bins


def pack_sft(examples: Sequence[Any], block_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Packs SFT examples into rows of `block_size` tokens, several per row, no attention across them.

    Examples are placed by best-fit decreasing length (within a row they keep their given order). Returns,
    all [B, block_size]:

    - ``input_ids`` int64, rows padded at the end with `pad_id`;
    - ``position_ids`` int64, restarting at 0 for each example (0 on padding);
    - ``loss_mask`` bool, True on each example's response tokens and eos (as in `collate_sft`); False at the
      first token of every example, so no loss ever crosses from one example into the next;
    - ``attention_mask`` bool, True on real tokens;
    - ``document_ids`` int64, the index into `examples` of the example that owns each position, -1 on padding.

    A token at query position q may attend to key position k only if
    ``document_ids[q] == document_ids[k] >= 0`` and k <= q; `packed_attention_mask` builds that mask.
    """
    _check_nonempty("examples", examples)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    parsed = [_sft_example(example, index) for index, example in enumerate(examples)]
    for index, (ids, _) in enumerate(parsed):
        if len(ids) > block_size:
            raise ValueError(
                f"examples[{index}] has {len(ids)} tokens, more than block_size {block_size}; "
                "encode with max_length <= block_size"
            )
    bins = _best_fit_decreasing([len(ids) for ids, _ in parsed], block_size)
    shape = (len(bins), block_size)
    input_ids = torch.full(shape, int(pad_id), dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    document_ids = torch.full(shape, -1, dtype=torch.long)
    for row, members in enumerate(bins):
        start = 0
        for index in members:
            ids, prompt_length = parsed[index]
            end = start + len(ids)
            input_ids[row, start:end] = torch.as_tensor(ids, dtype=torch.long)
            position_ids[row, start:end] = torch.arange(len(ids))
            loss_mask[row, start + prompt_length : end] = True
            document_ids[row, start:end] = index
            start = end
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "loss_mask": loss_mask,
        "attention_mask": document_ids >= 0,
        "document_ids": document_ids,
    }


def packed_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] document ids (-1 = padding) -> [B, L, L] bool, True where query q may attend to key k.

    Block-diagonal causal: same document and k <= q. A padding position attends only to itself, so no
    softmax row is empty (an all-False row would give NaN), and no real token attends to padding.
    """
    from rlhf_fast.models.masks import packed_causal_allowed  # masks live in models/ (loaded only when used)

    return packed_causal_allowed(document_ids)


def _rankings(items: Sequence[Any]) -> list[tuple[list[int], list[list[int]], list[int]]]:
    """(prompt ids, completion ids, ranks) of each ranking, checked: as many ranks as completions, >= 2."""
    _check_nonempty("items", items)
    parsed = []
    for index, item in enumerate(items):
        prompt_ids = _ids(item, "prompt_ids")
        completion_ids = [_ids(ids) for ids in _field(item, "completion_ids")]
        item_ranks = [int(rank) for rank in _field(item, "ranks")]
        if len(item_ranks) != len(completion_ids) or len(completion_ids) < 2:
            raise ValueError(
                f"items[{index}] has {len(completion_ids)} completions and {len(item_ranks)} ranks; "
                "need the same number, at least 2"
            )
        parsed.append((prompt_ids, completion_ids, item_ranks))
    return parsed


def collate_rankings(
    items: Sequence[Any], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Batches P rankings into ΣK rows, one per completion: each completion is encoded once.

    Rows of ranking p are contiguous and in its completion order. Returns ``input_ids`` [ΣK, L] int64 (prompt
    ids then completion ids, which end with eos), ``attention_mask`` [ΣK, L] bool, ``group_sizes`` [P] int64
    (K of each ranking), ``ranks`` [ΣK] int64 (0 = best; ties share a rank) and ``last_token_index`` [ΣK]
    int64, the position of each row's final token (its eos), where a reward model reads its score.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    rows: list[list[int]] = []
    group_sizes: list[int] = []
    ranks: list[int] = []
    for prompt_ids, completion_ids, item_ranks in _rankings(items):
        rows.extend(prompt_ids + ids for ids in completion_ids)
        group_sizes.append(len(completion_ids))
        ranks.extend(item_ranks)
    input_ids, attention_mask = pad_rows(rows, pad_id, padding_side)
    if padding_side == "right":
        last_token_index = torch.tensor([len(row) - 1 for row in rows], dtype=torch.long)
    else:
        last_token_index = torch.full((len(rows),), input_ids.shape[1] - 1, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "group_sizes": torch.tensor(group_sizes, dtype=torch.long),
        "ranks": torch.tensor(ranks, dtype=torch.long),
        "last_token_index": last_token_index,
    }


def collate_rankings_shared_prompt(items: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Batches P rankings into P rows, one per ranking: its prompt once, then its K completions.

    The prompt is encoded once for all K completions instead of once per completion (`collate_rankings`), and
    the scores are the same: completion i sees the prompt and itself (``segment_ids`` 0 and i,
    `rlhf_fast.models.masks.shared_prefix_causal_mask`), at the positions it would have after the prompt
    alone.
    Returns, rows padded at the end with `pad_id`:

    - ``input_ids`` [P, L] int64, ``attention_mask`` [P, L] bool (True on real tokens);
    - ``segment_ids`` [P, L] int64: 0 on the prompt, i on completion i (1-based), -1 on padding;
    - ``position_ids`` [P, L] int64: the prompt's 0..n-1, each completion's n.. again (0 on padding);
    - ``score_rows`` and ``last_token_index`` [ΣK] int64: the row and position of each completion's final
      token (its eos), where a reward model reads its score; completions in ranking order, then in theirs;
    - ``group_sizes`` [P] and ``ranks`` [ΣK] int64, as `collate_rankings`'.
    """
    ids_rows, segment_rows, position_rows = [], [], []
    score_rows: list[int] = []
    last_token_index: list[int] = []
    group_sizes: list[int] = []
    ranks: list[int] = []
    for row, (prompt_ids, completion_ids, item_ranks) in enumerate(_rankings(items)):
        ids, segments, positions = list(prompt_ids), [0] * len(prompt_ids), list(range(len(prompt_ids)))
        for segment, completion in enumerate(completion_ids, start=1):
            ids += completion
            segments += [segment] * len(completion)
            positions += range(len(prompt_ids), len(prompt_ids) + len(completion))
            score_rows.append(row)
            last_token_index.append(len(ids) - 1)
        ids_rows.append(ids)
        segment_rows.append(segments)
        position_rows.append(positions)
        group_sizes.append(len(completion_ids))
        ranks.extend(item_ranks)
    input_ids, attention_mask = pad_rows(ids_rows, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "segment_ids": pad_rows(segment_rows, -1)[0],
        "position_ids": pad_rows(position_rows, 0)[0],
        "score_rows": torch.tensor(score_rows, dtype=torch.long),
        "last_token_index": torch.tensor(last_token_index, dtype=torch.long),
        "group_sizes": torch.tensor(group_sizes, dtype=torch.long),
        "ranks": torch.tensor(ranks, dtype=torch.long),
    }


def prompt_sharing_pays(items: Sequence[Any], hidden_size: int) -> bool:
    """Whether `collate_rankings_shared_prompt` is the cheaper layout of `items` for a transformer of width
    `hidden_size`: its prompt is computed once, but each of its rows attends over the K completions too.

    A forward costs about rows x length x (6 x hidden_size + length) per layer (the projections and MLP,
    24 d^2 flops per token; attention, 4 d L per token; padding counted). Sharing is kept unless the rows per
    completion cost less than 4/5 of it (closer than that, the estimate cannot tell the two apart): with
    prompts about as long as their completions or longer it wins (the demo's batches: 0.26-1.05 of the rows'
    cost); with short prompts and long completions it loses, each shared row's attention growing with
    (prompt + K x completion)^2."""
    parsed = _rankings(items)
    rows = sum(len(completions) for _, completions, _ in parsed)
    row_length = max(len(prompt) + len(ids) for prompt, completions, _ in parsed for ids in completions)
    shared_length = max(len(prompt) + sum(map(len, completions)) for prompt, completions, _ in parsed)

    def cost(count: int, length: int) -> int:
        return count * length * (6 * hidden_size + length)

    return 4 * cost(len(parsed), shared_length) <= 5 * cost(rows, row_length)


def collate_prompts(items: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """LEFT-pads prompts for generation: ``input_ids`` [B, P] int64 and ``attention_mask`` [B, P] bool.

    Left padding puts every prompt's last token at position P-1, so the sampler appends new tokens in one
    column for the whole batch. Items are `EncodedPrompt`s, mappings with ``input_ids``, or id sequences.
    """
    _check_nonempty("items", items)
    rows = [_ids(item) for item in items]
    for index, row in enumerate(rows):
        if not row:
            raise ValueError(f"items[{index}] has no tokens")
    input_ids, attention_mask = pad_rows(rows, pad_id, "left")
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_pretrain(blocks: Sequence[Any] | torch.Tensor) -> torch.Tensor:
    """Stacks equal-length pretraining blocks (id sequences or 1-D tensors) into [B, L] int64 input_ids."""
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be [B, L], got shape {tuple(blocks.shape)}")
        return blocks.to(torch.long)
    _check_nonempty("blocks", blocks)
    rows = [torch.as_tensor(block, dtype=torch.long) for block in blocks]
    for index, row in enumerate(rows):
        if row.dim() != 1 or row.shape != rows[0].shape:
            raise ValueError(
                f"blocks[{index}] has shape {tuple(row.shape)} but blocks[0] has shape "
                f"{tuple(rows[0].shape)}; every block must hold the same number of tokens"
            )
    return torch.stack(rows)
