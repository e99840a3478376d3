"""CPU benchmark of the models' tanh GELU (`rlhf_fast.ops.gelu`, the C++ kernel) on a 128-wide GPT-2 block's
MLP activations, forward and forward + backward, against torch's `F.gelu(approximate="tanh")` and
transformers' six-op `gelu_new`:

    .venv/bin/python -m pytest bench/bench_gelu.py --benchmark-group-by=group

Cases and checks: rlhf_fast/bench/gelu.py (`rlhf-fast bench --ops gelu` times them interleaved).
"""

import pytest

from rlhf_fast.bench import gelu as OP_CASES  # noqa: F401 (bench/conftest.py parametrizes over its cases)


@pytest.mark.benchmark(min_rounds=20, warmup=True)
def test_gelu_cpu(benchmark, op_case):
    case, contender = op_case
    benchmark.group = case.name
    benchmark(contender.call)
