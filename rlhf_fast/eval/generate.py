"""Generate responses to text prompts with a policy, batched, through `rlhf_fast.rollout.sample`.

Prompts are tokenized as the data layer does (`add_special_tokens=False`, no BOS added) and left padded;
generation stops at the tokenizer's EOS, which is not part of the returned text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _device_of(policy) -> torch.device:
    parameter = next(iter(policy.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def generate_responses(policy, tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                       greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                       batch_size: int = 64, seed: int = 0) -> list[str]:
    """One response per prompt, in the order of `prompts`.

    policy: a `rlhf_fast.models.PolicyModel` or a transformers causal LM. tokenizer: its tokenizer, with
    `eos_token_id` set (and `pad_token_id`, else EOS pads). greedy: argmax decoding (temperature ignored);
    otherwise sampling at `temperature` with nucleus `top_p`, seeded by `seed` (deterministic for a given
    prompt list and batch size). Prompts are batched in order of length to reduce padding.
    """
    from rlhf_fast.rollout import sample  # imported here: the eval metrics need no model code

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a sequence of strings")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling (or pass greedy=True), got {temperature!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token_id: generation could not stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if not prompts:
        return []

    device = _device_of(policy)
    token_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for index, ids in enumerate(token_ids):
        if not ids:
            raise ValueError(f"prompts[{index}] tokenizes to no tokens: {prompts[index]!r}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
    responses: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(token_ids[i]) for i in batch)
        prompt_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, index in enumerate(batch):
            ids = token_ids[index]
            prompt_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            prompt_mask[row, width - len(ids):] = True
        output = sample(policy, prompt_ids.to(device), prompt_mask.to(device), max_new_tokens,
                        temperature=0.0 if greedy else float(temperature), top_p=top_p, eos_token_id=eos_id,
                        pad_token_id=pad_id, generator=None if greedy else generator)
        response_ids = output.response_ids.cpu()
        response_mask = output.response_mask.cpu()
        for row, index in enumerate(batch):
            ids = response_ids[row][response_mask[row]].tolist()
            if ids and ids[-1] == eos_id:
                ids = ids[:-1]
            responses[index] = tokenizer.decode(ids, skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False).strip()
    return responses
