"""Two per-step costs of a PPO iteration at a small vocabulary (2,048, the size of bench_trainers_trl.py), CPU:

1. Per-token log-prob + entropy from hidden states x LM head, forward + backward, 30% of tokens masked:
   rlhf_fast's `linear_token_logprobs` (chunked backend, recomputes the logits tile by tile in backward)
   against materialized logits (`F.linear`, then `token_logprobs` on the [N, V] logits) and against naive
   torch (`log_softmax` under autograd). Decides whether small [N, V] logits should take a materialized path.
2. The sampler's token choice from [B, V] logits: inverse-CDF sampling (`TokenSelector.inverse_cdf_sample`,
   one uniform per row) against Gumbel-max (a [B, V] uniform draw, two logs, one argmax), unfiltered and with
   top-k 50 / top-p 0.9.

Process CPU time, one thread, contenders interleaved (A B A B ...), min and median over rounds:

    .venv/bin/python bench/bench_small_vocab.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rlhf_fast.ops.logprob import linear_token_logprobs, token_logprobs
from rlhf_fast.rollout import TokenSelector

VOCAB, WIDTH = 2048, 128


def logprob_contenders():
    def fused(h, w, t, m):
        return linear_token_logprobs(h, w, t, mask=m, return_entropy=True)

    def materialized(h, w, t, m):
        return token_logprobs(F.linear(h, w), t, mask=m, return_entropy=True)

    def naive(h, w, t, m):
        log_probs = torch.log_softmax(F.linear(h, w), -1)
        logp = torch.where(m, log_probs.gather(-1, t[:, None]).squeeze(-1), 0)
        entropy = torch.where(m, -(log_probs.exp() * log_probs).sum(-1), 0)
        return logp, entropy

    def run(function, inputs):
        out = function(*inputs)
        logp, entropy = (out.logprobs, out.entropy) if hasattr(out, "logprobs") else out
        (logp.sum() + entropy.sum()).backward()

    return {
        name: (lambda inputs, f=f: run(f, inputs))
        for name, f in (
            ("fused chunked", fused),
            ("logits + token_logprobs", materialized),
            ("naive autograd", naive),
        )
    }


def logprob_inputs(tokens: int):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, WIDTH, generator=generator, requires_grad=True)
    weight = (torch.randn(VOCAB, WIDTH, generator=generator) * 0.05).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), generator=generator)
    mask = torch.rand(tokens, generator=generator) > 0.3
    return hidden, weight, targets, mask


def gumbel_max(selector: TokenSelector, filtered: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand(filtered.shape, generator=selector.generator)
    gumbel = uniform.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()
    return (filtered + gumbel).argmax(dim=-1)


def interleaved(contenders: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    times = {name: [] for name in contenders}
    for name, call in contenders.items():  # warm-up
        call()
    for _ in range(rounds):
        for name, call in contenders.items():
            start = time.process_time()
            for _ in range(calls):
                call()
            times[name].append((time.process_time() - start) / calls * 1e3)
    return times


def report(title: str, times: dict[str, list[float]], baseline: str) -> None:
    print(f"\n{title}")
    base = times[baseline]
    for name, values in times.items():
        ratios = [b / v for b, v in zip(base, values)]
        print(
            f"  {name:26s} min {min(values):8.3f} ms  median {statistics.median(values):8.3f} ms  "
            f"{baseline} / this: min {min(ratios):.2f}x median {statistics.median(ratios):.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    contenders = logprob_contenders()
    for tokens in (256, 2560):  # one 8 x 32 minibatch; one 32 x 80 batch
        inputs = logprob_inputs(tokens)
        calls = max(1, 20_000 // tokens)
        times = interleaved(
            {n: (lambda c=c, inputs=inputs: c(inputs)) for n, c in contenders.items()}, args.rounds, calls
        )
        report(
            f"log-prob + entropy, forward + backward, N = {tokens}, V = {VOCAB} "
            f"(N*V*4 = {tokens * VOCAB * 4 / 2**20:.0f} MiB)",
            times,
            "fused chunked",
        )
    for batch in (8, 32):
        for top_k, top_p in ((0, 1.0), (50, 0.9)):
            selector = TokenSelector(
                temperature=1.0, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(0)
            )
            logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(1)) * 2

            def filtered(selector=selector, logits=logits):
                return selector.filtered(logits) if selector.filters else logits

            times = interleaved(
                {
                    "gumbel-max": lambda s=selector, f=filtered: gumbel_max(s, f()),
                    "inverse CDF": lambda s=selector, f=filtered: s.inverse_cdf_sample(f()),
                },
                args.rounds,
                200,
            )
            report(
                f"token choice, B = {batch}, V = {VOCAB}, top_k {top_k}, top_p {top_p}", times, "gumbel-max"
            )


if __name__ == "__main__":
    main()
