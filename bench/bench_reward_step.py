"""The reward model's training step with each prompt encoded once for its K completions
(`RewardConfig.share_prompt`, the default) against one row of prompt + completion per completion, interleaved.

    .venv/bin/python bench/bench_reward_step.py [--rounds 10] [--threads 2] [--sizes small,base]

The demo's shapes: batches of 8 rankings, K drawn from 4..9, prompts of 8-24 tokens, completions of 1-12
tokens plus eos (the quick preset's reward-model data: prompts are about three quarters of the tokens of
prompt + completion rows), a word vocabulary of 204, random-init GPT-2s of `rlhf_fast.models.TINY_SIZES`.
Both trainers start from the same weights and take the same batches; each call is one `train_step`
(collation, forward, ranking loss, backward, optimizer step). Printed per size: median / min milliseconds per
step, the ratio of medians, and the forward tokens per step (padded, and real) of each layout: the work
floor the shared prompt removes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile

import torch

from rlhf_fast.bench.timing import device_name, interleaved
from rlhf_fast.data import EncodedRanking, collate_rankings, collate_rankings_shared_prompt

VOCAB = 204
EOS = 2


def demo_like_rankings(count: int, seed: int) -> list[EncodedRanking]:
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        k = rng.randint(4, 9)
        prompt = [rng.randrange(4, VOCAB) for _ in range(rng.randint(8, 24))]
        completions = tuple(
            [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 12))] + [EOS] for _ in range(k)
        )
        items.append(EncodedRanking(prompt, completions, tuple(range(k))))
    return items


def forward_tokens(batches: list[list[EncodedRanking]], share_prompt: bool) -> tuple[float, float]:
    """Mean (padded, real) tokens per forward of each layout."""
    padded, real = [], []
    for batch in batches:
        collated = (collate_rankings_shared_prompt if share_prompt else collate_rankings)(batch, 0)
        padded.append(collated["input_ids"].numel())
        real.append(int(collated["attention_mask"].sum()))
    return statistics.mean(padded), statistics.mean(real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="small")
    parser.add_argument("--batch", type=int, default=8, help="rankings per step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rlhf_fast import RewardConfig, RewardTrainer
    from rlhf_fast.models.tiny import tiny_causal_lm

    device = torch.device("cpu")
    batches = [demo_like_rankings(args.batch, seed) for seed in range(16)]
    print(f"device: {device_name(device)}; {args.batch} rankings per step, K 4-9; {args.rounds} rounds")
    print("| size | rows per completion (ms, median / min) | prompt once (ms) | speed-up (medians) "
          "| forward tokens padded / real: rows per completion | prompt once |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        trainers = {}
        with tempfile.TemporaryDirectory() as workdir:
            for share_prompt in (False, True):
                config = RewardConfig(batch_size=args.batch, learning_rate=1e-4, save_every=0, normalize=False,
                                      device="cpu", share_prompt=share_prompt,
                                      output_dir=f"{workdir}/{share_prompt}")
                model = tiny_causal_lm(size, vocab_size=VOCAB, max_positions=96, seed=0)
                trainers[share_prompt] = RewardTrainer(config, model, batches[0], pad_token_id=0)
            steps = {share_prompt: iter(range(10**9)) for share_prompt in trainers}

            def call(share_prompt: bool):
                batch = batches[next(steps[share_prompt]) % len(batches)]
                return lambda: trainers[share_prompt].train_step(batch, batch)

            timings = interleaved(
                {"rows": lambda: call(False)(), "shared": lambda: call(True)()},
                device, rounds=args.rounds, round_seconds=0.5,
            )
        rows, shared = timings["rows"], timings["shared"]
        padded_rows, real_rows = forward_tokens(batches, False)
        padded_shared, real_shared = forward_tokens(batches, True)
        print(f"| {size} | {rows.median_s * 1e3:.1f} / {rows.min_s * 1e3:.1f} "
              f"| {shared.median_s * 1e3:.1f} / {shared.min_s * 1e3:.1f} | {rows.median_s / shared.median_s:.2f}x "
              f"| {padded_rows:.0f} / {real_rows:.0f} | {padded_shared:.0f} / {real_shared:.0f} |")


if __name__ == "__main__":
    main()
