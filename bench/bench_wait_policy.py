"""OpenMP's wait policy and a small model's training step: the demo's pretraining step (its tiny and small
GPT-2, 32 blocks of 32 tokens, `SFTTrainer`) on two intra-op threads with each wait policy, on an idle
machine and with another process keeping a core busy, beside one thread.

    .venv/bin/python bench/bench_wait_policy.py [--rounds 2] [--steps 80] [--sizes tiny,small]

OpenMP reads its wait policy when it starts, so each measurement is a fresh process (the worker mode of this
script) with the policy in its environment; the settings are interleaved round by round. Policies:
`default` (neither variable set: GNU OpenMP spins 300,000 times before it sleeps), `passive`
(OMP_WAIT_POLICY=PASSIVE: a waiting thread sleeps at once), `spinN` (GOMP_SPINCOUNT=N; what
`rlhf_fast.pipeline.threads.bound_openmp_spinning` sets). Printed per size: median / min milliseconds per
step over the rounds (each round the median of `--steps` steps after 10 warm-up steps), and each cell over
the two-thread default on the idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from rlhf_fast.bench.timing import busy_cores
from rlhf_fast.pipeline.threads import WAIT_VARIABLES

POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin3000": {"GOMP_SPINCOUNT": "3000"},
    "spin5000": {"GOMP_SPINCOUNT": "5000"},
    "spin10000": {"GOMP_SPINCOUNT": "10000"},
}
WARMUP_STEPS = 10


def worker(size: str, steps: int, threads: int) -> None:
    """Times the demo's pretraining step; prints {"ms": [per-step milliseconds]} as JSON."""
    import random
    import tempfile
    from pathlib import Path

    import torch

    from rlhf_fast.data import SFTExample
    from rlhf_fast.models.tiny import build_word_tokenizer, tiny_causal_lm
    from rlhf_fast.trainers import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)
    tokenizer = build_word_tokenizer([f"w{index}" for index in range(300)])
    rng = random.Random(0)
    examples = [SFTExample([rng.randrange(4, len(tokenizer)) for _ in range(32)], 1) for _ in range(2048)]
    model = tiny_causal_lm(
        size,
        vocab_size=len(tokenizer),
        max_positions=96,
        seed=0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            seed=0,
            output_dir=out,
            save_every=0,
            device="cpu",
            log_every=1,
            batch_size=32,
            learning_rate=3e-3,
            epochs=10_000,
            max_steps=WARMUP_STEPS + steps,
            warmup=5,
            residual_dropout=None,
            min_lr_ratio=0.1,
        )
        SFTTrainer(config, model, examples, tokenizer=tokenizer).train()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    seconds = [record["time/seconds"] for record in records if "time/seconds" in record]
    print(json.dumps({"ms": [1e3 * s for s in seconds[WARMUP_STEPS:]]}))


def _measure(size: str, steps: int, threads: int, policy: str, busy: int) -> float:
    # Importing rlhf_fast.pipeline bounds this process's spinning: the worker gets only the policy's variables.
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES} | POLICIES[policy]
    command = [sys.executable, __file__, "--worker", size, str(steps), str(threads)]
    with busy_cores(busy):
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1])["ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "STEPS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, steps, threads = args.worker
        worker(size, int(steps), int(threads))
        return
    settings = [(f"2T {policy}", 2, policy) for policy in POLICIES] + [("1T default", 1, "default")]
    print(
        f"{os.cpu_count()} CPUs; ms per step, median / min over {args.rounds} rounds; (x) over 2T default idle"
    )
    for size in args.sizes.split(","):
        samples: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for busy in (0, 1):
                for label, threads, policy in settings:
                    ms = _measure(size, args.steps, threads, policy, busy)
                    samples.setdefault((label, busy), []).append(ms)
        base = statistics.median(samples[("2T default", 0)])
        print(f"\n{size}")
        for busy in (0, 1):
            cells = []
            for label, _, _ in settings:
                values = samples[(label, busy)]
                median = statistics.median(values)
                cells.append(f"{label} {median:6.1f}/{min(values):.1f} ({median / base:.2f}x)")
            print(f"  {'idle' if busy == 0 else 'busy1':5s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
