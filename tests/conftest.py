import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. It must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_intra_op_thread():
    """One intra-op thread for the test: small models on shared cores, where a second thread only waits, and the
    same floating-point work in the same order as a subprocess run with OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
