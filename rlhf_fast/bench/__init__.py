"""Benchmarks that ship with the package, so `rlhf-fast bench` runs from an installed wheel.

One module per op (`gae`, `ranking`, `ppo_loss`, `logprob`, `gelu`, `sample_tokens`): its inputs, its
baselines written as the peers write them, and `cases(device)`, each case a set of contenders checked against
the reference before they are timed. `runner` times them interleaved and prints the tables; `timing` holds the
clocks, floors and memory probes. The repository's bench/ runs the same cases under pytest-benchmark.
`profile` measures where the time of a training run goes (`rlhf-fast profile`).
"""

from rlhf_fast.bench.runner import OPS, BenchError, run

__all__ = ["OPS", "BenchError", "run"]
