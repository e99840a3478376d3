"""CPU benchmark of rollout generation: `rlhf_fast.rollout.sample` against transformers' `generate`.

    .venv/bin/python -m pytest bench/bench_rollout.py --benchmark-group-by=group

Same model for both: a randomly initialized 2-layer, 128-wide GPT-2 (4 heads, vocabulary 1000, fp32), batch
16 prompts of 32 tokens, 64 new tokens per row, no EOS (every row runs the full 64 steps). "greedy" is
argmax decoding (`do_sample=False`); "sampled" draws from the full softmax at temperature 1 (`do_sample=True,
top_k=0, top_p=1.0` for generate, whose default top_k=50 would filter). Before timing, each benchmark checks
that the two produce identical greedy tokens (on a float64 copy of the model, so rounding cannot flip a
choice). Tokens per second = 16 x 64 / the call's time.

One intra-op thread, as in bench_gae.py: the development machines have 2 shared cores. Because pytest-benchmark
times one contender after the other, a burst of load from other jobs can land on either; running the file as a
script instead interleaves the contenders call by call and prints each one's best time and the ratio:

    .venv/bin/python bench/bench_rollout.py [repeats]

The script also times the early stop (`stop_check_every`) on a workload where most rows end early: a fifth of
the vocabulary ends a row (rows end after about 5 tokens, the longest after about 30 of the 64), sampled at
temperature 1; the full loop (`stop_check_every=0`) against a check every 8 steps, same seed, same output.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_fast.rollout import sample

BATCH, PROMPT_LEN, NEW_TOKENS, VOCAB = 16, 32, 64, 1000
PAD = 0


def build_model(dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=256, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    return model.to(dtype).eval()


def prompts(generator: torch.Generator):
    """Left-padded prompts with lengths 8..32."""
    lengths = torch.randint(8, PROMPT_LEN + 1, (BATCH,), generator=generator)
    ids = torch.randint(1, VOCAB, (BATCH, PROMPT_LEN), generator=generator)
    mask = (torch.arange(PROMPT_LEN) >= PROMPT_LEN - lengths[:, None]).long()
    return ids * mask, mask


def run_ours(model, ids, mask, greedy: bool, generator: torch.Generator):
    return sample(model, ids, mask, NEW_TOKENS, temperature=0.0 if greedy else 1.0, eos_token_id=None,
                  pad_token_id=PAD, generator=generator).response_ids


def run_generate(model, ids, mask, greedy: bool, generator: torch.Generator):
    with torch.no_grad():
        sampling = {} if greedy else {"top_k": 0, "top_p": 1.0, "temperature": 1.0}
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=not greedy, pad_token_id=PAD, **sampling)
    return output[:, PROMPT_LEN:]


IMPLEMENTATIONS = {"rlhf_fast sample": run_ours, "transformers generate": run_generate}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def same_greedy_tokens():
    """Both implementations decode the same greedy tokens (float64 copy: no rounding-decided choices)."""
    generator = torch.Generator().manual_seed(1)
    ids, mask = prompts(generator)
    model64 = build_model(torch.float64)
    ours = run_ours(model64, ids, mask, True, generator)
    theirs = run_generate(model64, ids, mask, True, generator)
    assert torch.equal(ours, theirs)
    return True


@pytest.mark.benchmark(min_rounds=5, warmup=True)
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_rollout_cpu(benchmark, implementation, mode, model, same_greedy_tokens):
    benchmark.group = f"rollout GPT-2 2x128 B={BATCH} P={PROMPT_LEN} +{NEW_TOKENS} tokens fp32 {mode}"
    benchmark.extra_info["new_tokens"] = BATCH * NEW_TOKENS
    generator = torch.Generator().manual_seed(0)
    ids, mask = prompts(generator)
    tokens = benchmark(IMPLEMENTATIONS[implementation], model, ids, mask, mode == "greedy", generator)
    assert tokens.shape == (BATCH, NEW_TOKENS)


def interleaved(repeats: int) -> None:
    """Each contender's best time over `repeats` calls, alternating calls between contenders."""
    torch.set_num_threads(1)
    model = build_model()
    generator = torch.Generator().manual_seed(0)
    ids, mask = prompts(generator)
    for mode in ("greedy", "sampled"):
        best = dict.fromkeys(IMPLEMENTATIONS, float("inf"))
        for _ in range(repeats):
            for name, function in IMPLEMENTATIONS.items():
                start = time.perf_counter()
                function(model, ids, mask, mode == "greedy", generator)
                best[name] = min(best[name], time.perf_counter() - start)
        ours, theirs = best["rlhf_fast sample"], best["transformers generate"]
        print(f"{mode}: rlhf_fast sample {ours * 1e3:.1f} ms ({BATCH * NEW_TOKENS / ours:,.0f} tokens/s), "
              f"transformers generate {theirs * 1e3:.1f} ms ({BATCH * NEW_TOKENS / theirs:,.0f} tokens/s), "
              f"ratio {theirs / ours:.2f}x")


def early_stop(repeats: int, every: int = 8) -> None:
    """The full loop against the early stop, interleaved, on rows that mostly end early."""
    torch.set_num_threads(1)
    model = build_model()
    ids, mask = prompts(torch.Generator().manual_seed(0))
    eos_ids = list(range(1, VOCAB, 5))
    best = {0: float("inf"), every: float("inf")}
    outputs = {}
    for _ in range(repeats):
        for check in (0, every):
            start = time.perf_counter()
            outputs[check] = sample(model, ids, mask, NEW_TOKENS, eos_token_id=eos_ids, pad_token_id=PAD,
                                    generator=torch.Generator().manual_seed(3), stop_check_every=check)
            best[check] = min(best[check], time.perf_counter() - start)
    assert torch.equal(outputs[0].response_ids, outputs[every].response_ids)
    lengths = outputs[0].response_mask.sum(1)
    print(f"early EOS (response lengths mean {lengths.float().mean():.1f}, max {int(lengths.max())} of {NEW_TOKENS}): "
          f"full loop {best[0] * 1e3:.1f} ms, check every {every} steps {best[every] * 1e3:.1f} ms, "
          f"ratio {best[0] / best[every]:.2f}x")


if __name__ == "__main__":
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
    early_stop(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
