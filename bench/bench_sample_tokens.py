"""CPU benchmark of `rlhf_fast.ops.sample_tokens` against the torch composition the peers run.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_sample_tokens.py --benchmark-group-by=group

The cases, their baselines and the checks live in rlhf_fast/bench/sample_tokens.py, which `rlhf-fast bench --ops sample_tokens`
runs interleaved; here pytest-benchmark times them.
"""

import pytest

from rlhf_fast.bench import sample_tokens as OP_CASES  # noqa: F401 (bench/conftest.py parametrizes over its cases)


@pytest.mark.benchmark(min_rounds=20, warmup=True)
def test_sample_tokens_cpu(benchmark, op_case):
    case, contender = op_case
    benchmark.group = case.name
    benchmark(contender.call)
