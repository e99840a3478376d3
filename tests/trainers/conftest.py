import json
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_single_thread(monkeypatch):
    """No progress bars; one intra-op thread, so a run in this process and one in a subprocess (torchrun sets
    OMP_NUM_THREADS=1) do the same floating-point work in the same order."""
    monkeypatch.setenv("RLHF_FAST_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_jsonl(path: os.PathLike) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]
