"""The tanh-approximated GELU of GPT-2 ("gelu_new") and its kin, as one op.

    gelu(x) = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))

Backends: `reference` (torch's `F.gelu(x, approximate="tanh")`; on CUDA it is one fused kernel already) and
`cpp` (csrc/cpu/gelu.cpp: x·σ(2u) with one polynomial exponential per element, vectorized per instruction
set; its autograd in C++, csrc/autograd/gelu.cpp). On the CPU torch's kernel costs as much as the matmul
that feeds it; bench/RESULTS.md has the ratio. `gelu_tanh_formula` below is the ground truth the tests
compare both against in float64. Output dtype and shape are the input's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_fast import _extension
from rlhf_fast.ops._backend import select_backend

IMPLEMENTED = ("reference", "cpp")


def gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    """The definition, term by term (GPT-2's `gelu_new`)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Tanh-approximated GELU of `x` (any shape, float32/float64/bfloat16/float16), differentiable."""
    if torch.compiler.is_compiling() or select_backend("gelu_tanh", x.device, IMPLEMENTED, ()) == "reference":
        return F.gelu(x, approximate="tanh")
    return _extension.kernels().gelu_tanh(x)
