"""A decoding step's token choice with the drawn tokens' log-probs and the rows' entropy (what the PPO
sampler asks for every step), from fp32 logits [B, V].

Baseline, written as `generate`-based trainers do it: softmax, `torch.multinomial`, then `log_softmax`,
`gather` and the entropy. rlhf_fast's reference is the torch composition it ran before the kernel (softmax,
cumsum, searchsorted, log_softmax, gather, entropy). The draws differ between contenders (different random
streams), so the check holds each contender to its own tokens: every token has mass, its log-prob and the
rows' entropy agree with float64 ones. CPU only: on CUDA the op is the torch composition.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from rlhf_fast.bench.case import Case, Contender, backend_call, ours_contenders
from rlhf_fast.ops.sample_tokens import sample_tokens, sample_tokens_reference, token_statistics

SHAPES = {"cpu": ((8, 2048), (32, 2048), (8, 50257), (64, 50257))}


def step_logits(batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator()
    generator.seed()
    return torch.randn(batch, vocab, generator=generator) * 2, torch.rand(batch, generator=generator)


def multinomial_step(logits):
    tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(-1)
    return tokens, *token_statistics(logits, tokens, True, True)


def checker(logits):
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)

    def check(output) -> None:
        tokens, logprobs, got_entropy = output
        assert tokens.dtype == torch.int64 and bool(((tokens >= 0) & (tokens < logits.shape[-1])).all())
        torch.testing.assert_close(logprobs.double(), log_probs.gather(-1, tokens[:, None]).squeeze(-1),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        torch.testing.assert_close(got_entropy.double(), entropy, atol=1e-4, rtol=1e-4)

    return check


def cases(device: torch.device) -> Iterator[Case]:
    if device.type != "cpu":
        return
    for batch, vocab in SHAPES["cpu"]:
        logits, uniform = step_logits(batch, vocab)
        contenders = ours_contenders(
            device,
            lambda backend, logits=logits, uniform=uniform: backend_call(
                backend, sample_tokens, logits, uniform
            ),
        )
        contenders.append(
            Contender("naive torch (multinomial)", partial(multinomial_step, logits), "baseline")
        )
        contenders.append(
            Contender("rlhf_fast reference", partial(sample_tokens_reference, logits, uniform), "reference")
        )
        yield Case(
            op="sample_tokens",
            name=f"sample_tokens B={batch} V={vocab} fp32 (log-probs, entropy)",
            contenders=contenders,
            check=checker(logits),
            rounds=10,
        )
