"""CPU benchmark of a decoding step's draw with log-probs and entropy (`rlhf_fast.ops.sample_tokens`) at
vocabularies of 2,048 and 50,257, against `generate`'s softmax + multinomial and the sampler's former torch
composition:

    .venv/bin/python -m pytest bench/bench_sample_tokens.py --benchmark-group-by=group

Cases and checks: rlhf_fast/bench/sample_tokens.py (`rlhf-fast bench --ops sample_tokens`).
"""

import pytest

from rlhf_fast.bench import sample_tokens as OP_CASES  # noqa: F401 (bench/conftest.py parametrizes over its cases)


@pytest.mark.benchmark(min_rounds=20, warmup=True)
def test_sample_tokens_cpu(benchmark, op_case):
    case, contender = op_case
    benchmark.group = case.name
    benchmark(contender.call)
