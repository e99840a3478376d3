import json
import os

import pytest


@pytest.fixture(autouse=True)
def _quiet_single_thread(monkeypatch, one_intra_op_thread):
    """No progress bars; one intra-op thread, so a run in this process and one in a subprocess (torchrun sets
    OMP_NUM_THREADS=1) do the same floating-point work in the same order."""
    monkeypatch.setenv("RLHF_FAST_NO_PROGRESS", "1")


def read_jsonl(path: os.PathLike) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def pytest_collection_modifyitems(config, items):
    """The `slow` trainer tests (multi-process kill-and-resume) run only when asked for with `-m slow`."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    here = os.path.dirname(__file__)
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(skip)
