"""CPU benchmark of GAE at B=64, T=512 fp32: the C++ kernel against the Python loop RLHF peers run.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_gae.py \
        --benchmark-group-by=group

The cases, their baselines (OpenRLHF's loop; TRL's loop + masked_whiten) and the checks live in
rlhf_fast/bench/gae.py, which `rlhf-fast bench --ops gae` runs interleaved; here pytest-benchmark times them.
"""

import pytest

from rlhf_fast.bench import gae as OP_CASES  # noqa: F401 (bench/conftest.py parametrizes over its cases)


@pytest.mark.benchmark(min_rounds=20, warmup=True)
def test_gae_cpu(benchmark, op_case):
    case, contender = op_case
    benchmark.group = case.name
    benchmark(contender.call)
