"""CPU benchmark of the K-wise ranking loss, forward + backward, fp32: P=64 x K=9 and P=1024 x K=16.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_ranking.py --benchmark-group-by=group

The cases, the pairwise baselines (pairs prebuilt, pairs per call) and the checks live in
rlhf_fast/bench/ranking.py, which `rlhf-fast bench --ops ranking` runs interleaved; here pytest-benchmark
times them.
"""

import pytest

from rlhf_fast.bench import ranking as OP_CASES  # noqa: F401 (bench/conftest.py parametrizes over its cases)


@pytest.mark.benchmark(min_rounds=50, warmup=True)
def test_ranking_loss_cpu(benchmark, op_case):
    case, contender = op_case
    benchmark.group = case.name
    benchmark(contender.call)
