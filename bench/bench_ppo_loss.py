"""CPU benchmark of the PPO losses at B=64, T=512 fp32, forward and forward + backward: the fused C++ kernel
against the naive torch composition TRL's PPO trainer runs.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_ppo_loss.py \
        --benchmark-group-by=group

The cases, the baseline and the checks live in rlhf_fast/bench/ppo_loss.py, which
`rlhf-fast bench --ops ppo_loss` runs interleaved; here pytest-benchmark times them.
"""

import pytest

from rlhf_fast.bench import ppo_loss as OP_CASES  # noqa: F401 (bench/conftest.py parametrizes over its cases)


@pytest.mark.benchmark(min_rounds=50, warmup=True)
def test_ppo_losses_cpu(benchmark, op_case):
    case, contender = op_case
    benchmark.group = case.name
    benchmark(contender.call)
