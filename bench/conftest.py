"""The CPU benchmark files time the cases that ship in rlhf_fast.bench (the ones `rlhf-fast bench` runs
interleaved), one pytest-benchmark test per (case, contender). A file names its op module `OP_CASES`; a test
that takes the `op_case` fixture is parametrized over that module's CPU cases and their contenders, and gets
(case, contender) with the contender's output already checked against the reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch

CPU = torch.device("cpu")


def pytest_generate_tests(metafunc):
    if "op_case" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for index, case in enumerate(metafunc.module.OP_CASES.cases(CPU)):
        for contender in case.contenders:
            params.append((index, contender.name))
            ids.append(f"{case.name} | {contender.name}")
    metafunc.parametrize("op_case", params, ids=ids, indirect=True)


@pytest.fixture
def op_case(request):
    """(case, contender), checked; with one intra-op thread while the test runs: the development machines have
    2 shared cores, where a second OpenMP thread that gets descheduled turns a 0.1 ms call into a 30 ms one."""
    index, name = request.param
    case = next(itertools.islice(request.module.OP_CASES.cases(CPU), index, None))
    contender = next(c for c in case.contenders if c.name == name)
    if "cpp" in name:
        from rlhf_fast import _extension

        if not _extension.has_cpp_kernels():
            pytest.skip("rlhf_fast._C is not built")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        output = contender.call()
        if case.check is not None and contender.checked:
            case.check(output)  # every contender computes the same thing on these inputs
        yield case, contender
    finally:
        torch.set_num_threads(previous)
