"""Generation and reward scoring for evaluation: the one batched generation (`generate`, through
`rlhf_fast.rollout.sample`), the reward model's scores of (prompt, response) rows (`reward_scores`), and the two
together as best-of-n sampling (`best_of_n_responses`).

Prompts are tokenized as the data layer does (`add_special_tokens=False`, no BOS added) and left padded
(`rlhf_fast.data.pad_rows`); generation stops at the tokenizer's EOS, which is not part of the returned text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf_fast.data.collate import pad_rows

__all__ = [
    "Generation",
    "best_of_n",
    "best_of_n_responses",
    "generate",
    "generate_responses",
    "response_rows",
    "reward_scores",
    "token_rows",
]


@dataclass
class Generation:
    """One model's responses, in prompt order."""

    texts: list[str]
    token_ids: list[list[int]]  # response tokens, without the final eos
    finished: list[bool]  # the response ended with eos (rather than at max_new_tokens)


def _device_of(model) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _special_ids(tokenizer) -> tuple[int, int]:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token_id: generation could not stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return int(eos_id), int(pad_id)


@torch.no_grad()
def generate(
    policy,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> Generation:
    """One response per prompt (token ids), in prompt order, on the policy's device.

    temperature 0: greedy; otherwise sampling at `temperature` with nucleus `top_p`, seeded by `seed`
    (deterministic for a given prompt list and batch size). Prompts are batched in order of length to reduce
    padding.
    """
    from rlhf_fast.rollout import sample  # imported here: the eval metrics need no model code

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    for index, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt_ids[{index}] holds no tokens")
    eos_id, pad_id = _special_ids(tokenizer)
    device = _device_of(policy)
    greedy = temperature == 0
    generator = None if greedy else torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompt_ids)), key=lambda index: len(prompt_ids[index]))
    texts, token_ids, finished = [""] * len(order), [[] for _ in order], [False] * len(order)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = pad_rows([prompt_ids[index] for index in batch], pad_id, side="left")
        output = sample(
            policy,
            ids.to(device),
            mask.to(device),
            max_new_tokens,
            temperature=float(temperature),
            top_p=top_p,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            generator=generator,
        )
        responses, response_mask = output.response_ids.cpu(), output.response_mask.cpu()
        for row, index in enumerate(batch):
            tokens = responses[row][response_mask[row]].tolist()
            ended = bool(tokens) and tokens[-1] == eos_id
            if ended:
                tokens = tokens[:-1]
            token_ids[index], finished[index] = tokens, ended
            texts[index] = tokenizer.decode(
                tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
            ).strip()
    return Generation(texts, token_ids, finished)


def generate_responses(
    policy,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[str]:
    """`generate` for text prompts: one response text per prompt, in the order of `prompts`.

    policy: a `rlhf_fast.models.PolicyModel` or a transformers causal LM. tokenizer: its tokenizer, with
    `eos_token_id` set (and `pad_token_id`, else EOS pads). greedy: argmax decoding (temperature ignored);
    otherwise sampling at `temperature` > 0.
    """
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling (or pass greedy=True), got {temperature!r}")
    token_ids = _prompt_ids(tokenizer, prompts, max_new_tokens)
    if not token_ids:
        return []
    return generate(
        policy,
        tokenizer,
        token_ids,
        max_new_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    ).texts


def _prompt_ids(tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Text prompts tokenized as the data layer does, after the checks both text entry points share."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a sequence of strings")
    _special_ids(tokenizer)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not prompts:
        return []
    token_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for index, ids in enumerate(token_ids):
        if not ids:
            raise ValueError(f"prompts[{index}] tokenizes to no tokens: {prompts[index]!r}")
    return token_ids


def best_of_n(
    policy,
    reward_model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> Generation:
    """Best-of-n sampling: `n` samples per prompt at `temperature`, and of each prompt's samples the one
    `reward_model` scores highest (the first of equal scores), in prompt order.

    What the reward model gets out of the policy with no training, at a KL from the policy of at most
    log n - (n - 1)/n nats: the reference point for what RL against the same reward model gains. The reward
    model reads each sample as PPO scores a rollout (`token_rows`: prompt + response + eos), so it must share
    the policy's tokenizer. With n = 1 the result is `generate`'s at the same seed (no reward model needed).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not temperature > 0:
        raise ValueError(f"best-of-n samples: temperature must be > 0, got {temperature!r}")
    repeated = [ids for ids in prompt_ids for _ in range(n)]
    options = {"temperature": temperature, "top_p": top_p, "batch_size": batch_size, "seed": seed}
    samples = generate(policy, tokenizer, repeated, max_new_tokens, **options)
    if n == 1 or not repeated:
        return samples
    eos_id, pad_id = _special_ids(tokenizer)
    rows = token_rows(repeated, samples.token_ids, eos_id)
    scores = torch.tensor(reward_scores(reward_model, rows, pad_id, batch_size)).view(len(prompt_ids), n)
    chosen = [row * n + column for row, column in enumerate(scores.argmax(dim=1).tolist())]  # first maxima
    return Generation(
        [samples.texts[i] for i in chosen],
        [samples.token_ids[i] for i in chosen],
        [samples.finished[i] for i in chosen],
    )


def best_of_n_responses(
    policy,
    reward_model,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[str]:
    """`best_of_n` for text prompts: one response text per prompt, in the order of `prompts`."""
    token_ids = _prompt_ids(tokenizer, prompts, max_new_tokens)
    options = {"temperature": temperature, "batch_size": batch_size, "seed": seed}
    return best_of_n(policy, reward_model, tokenizer, token_ids, n, max_new_tokens, **options).texts


def token_rows(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    eos_id: int,
    limit: int | None = None,
) -> list[list[int]]:
    """The token rows a reward model scores, as PPO scores a rollout: prompt + response + eos, whether the
    response ended or was cut at the token limit (`rlhf_fast.models.ended_with_eos`, the rows as tensors);
    rows over `limit` tokens keep their last `limit`."""
    rows = []
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        row = list(prompt) + list(response) + [eos_id]
        rows.append(row[-limit:] if limit is not None and len(row) > limit else row)
    return rows


def response_rows(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], *, limit: int | None = None
) -> list[list[int]]:
    """`token_rows` of texts, tokenized as the data layer does (separately, no special tokens)."""
    from rlhf_fast.data.encode import tokenize_texts

    return token_rows(
        tokenize_texts(tokenizer, list(prompts)),
        tokenize_texts(tokenizer, list(responses)),
        int(tokenizer.eos_token_id),
        limit,
    )


@torch.no_grad()
def reward_scores(
    reward_model, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64
) -> list[float]:
    """Reward-model scores (normalization offset included) of token rows, read at each row's last token."""
    device = _device_of(reward_model)
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_rows(rows[start : start + batch_size], pad_id)
        scores.extend(reward_model(ids.to(device), mask.to(device)).float().cpu().tolist())
    return scores
