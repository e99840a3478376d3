"""Small CPU kernels under load: each compiled CPU kernel on one intra-op thread against two, on an idle
core and with another process keeping a core busy.

    .venv/bin/python bench/bench_cpu_threads.py [--repeats 200]

`at::parallel_for` splits a loop over its threads once the loop is longer than the grain; on a two-core
machine where another process holds one core, the second thread is descheduled and the call waits for it
(a spinning OpenMP barrier), so a 0.1 ms kernel can take milliseconds. The kernels pick grains so that
work below about a millisecond of one thread stays on the calling thread (csrc/cpu/parallel.h); this
script shows whether they do. Every kernel is called through `torch.ops.rlhf_fast_C` (no Python op
wrapper), forward and backward where there is one, at the sizes of bench/bench_{gae,ppo_loss,ranking}.py.

Printed per case, for one and two threads (1T, 2T) beside 0, 1 and 2 busy-loop processes (busyN): median /
min µs (settings interleaved round by round, each a median over `--repeats` calls), and the worst two-thread
median over the one-thread median without load: near or below 1 means no cliff.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlhf_fast import _extension
from rlhf_fast.bench.timing import busy_cores
from rlhf_fast.ops._contract import WHITEN_EPS


def _cases(ops) -> dict[str, callable]:
    whiten_eps = (WHITEN_EPS,) if len(ops.gae_forward.default._schema.arguments) == 7 else ()  # older builds
    generator = torch.Generator().manual_seed(0)
    batch, steps = 64, 512
    rewards = torch.randn(batch, steps, generator=generator)
    values = torch.randn(batch, steps, generator=generator)
    mask = torch.ones(batch, steps, dtype=torch.bool)
    logprobs = torch.randn(batch, steps, generator=generator) * 0.1 - 2
    old_logprobs = logprobs + torch.randn(batch, steps, generator=generator) * 0.1
    returns = torch.randn(batch, steps, generator=generator)
    one = torch.ones(())
    prompts, k = 64, 9
    scores = torch.randn(prompts * k, generator=generator)
    sizes = torch.full((prompts,), k, dtype=torch.int64)

    def ppo_step():
        *_, count = ops.ppo_losses_forward(
            logprobs, old_logprobs, rewards, mask, values, values, returns, 0.2, 0.2
        )
        ops.ppo_losses_backward(
            one, one, logprobs, old_logprobs, rewards, mask, values, values, returns, count, 0.2, 0.2
        )

    def ranking_step():
        _, _, weights, ends = ops.ranking_loss_forward(scores, sizes, None, None, 0.0)
        ops.ranking_loss_backward(one, scores, None, None, 0.0, weights, ends)

    return {
        f"gae {batch}x{steps}": lambda: ops.gae_forward(rewards, values, mask, 1.0, 0.95, False, *whiten_eps),
        f"gae {batch}x{steps} whitened": lambda: ops.gae_forward(
            rewards, values, mask, 1.0, 0.95, True, *whiten_eps
        ),
        f"ppo_losses fwd+bwd {batch}x{steps}": ppo_step,
        f"ranking fwd+bwd P={prompts} K={k}": ranking_step,
    }


def _time_us(function, threads: int, repeats: int) -> list[float]:
    torch.set_num_threads(threads)
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e6)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--busy",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[0, 1, 2],
        help="numbers of busy-loop processes to run beside the kernel (default 0,1,2)",
    )
    parser.add_argument("--cases", default="", help="comma-separated substrings of the case names to run")
    parser.add_argument(
        "--library", help="time this build of the extension (.so) instead of the installed one"
    )
    args = parser.parse_args()
    if args.library:
        torch.ops.load_library(args.library)
        ops = torch.ops.rlhf_fast_C
    else:
        ops = _extension.kernels()
    settings = [(f"{threads}T busy{busy}", threads, busy) for busy in args.busy for threads in (1, 2)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads by default; median / min µs")
    wanted = [part for part in args.cases.split(",") if part]
    for name, function in _cases(ops).items():
        if wanted and not any(part in name for part in wanted):
            continue
        samples: dict[str, list[float]] = {label: [] for label, _, _ in settings}
        for _ in range(args.rounds):
            for label, threads, busy in settings:
                with busy_cores(busy):
                    samples[label].append(statistics.median(_time_us(function, threads, args.repeats)))
                    samples[label + " min"] = [
                        *samples.get(label + " min", []),
                        min(_time_us(function, threads, 20)),
                    ]
        cells = [
            f"{label} {statistics.median(samples[label]):8.1f}/{min(samples[label + ' min']):.1f}"
            for label, _, _ in settings
        ]
        base = statistics.median(samples[settings[0][0]])
        worst = max(statistics.median(samples[label]) for label, threads, _ in settings if threads == 2)
        print(f"{name:30s} " + " | ".join(cells) + f" | worst 2T / 1T idle {worst / base:6.1f}x")


if __name__ == "__main__":
    main()
