"""CPU benchmark of `rlhf_fast.ops.gelu` against the torch composition the peers run.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_gelu.py --benchmark-group-by=group

The cases, their baselines and the checks live in rlhf_fast/bench/gelu.py, which `rlhf-fast bench --ops gelu`
runs interleaved; here pytest-benchmark times them.
"""

import pytest

from rlhf_fast.bench import gelu as OP_CASES  # noqa: F401 (bench/conftest.py parametrizes over its cases)


@pytest.mark.benchmark(min_rounds=20, warmup=True)
def test_gelu_cpu(benchmark, op_case):
    case, contender = op_case
    benchmark.group = case.name
    benchmark(contender.call)
