"""The models' tanh-approximated GELU, forward and forward + backward, fp32, on the MLP activations of a
128-wide GPT-2 block (rows x 512).

Baselines: torch's `F.gelu(x, approximate="tanh")` (one ATen kernel; what `GELUTanh` calls) and transformers'
`NewGELUActivation` (GPT-2's "gelu_new", six elementwise ops: what a GPT-2 runs unless someone swaps it).
Every contender is checked against the formula in float64 before it is timed. CPU only: on CUDA the op is
torch's own kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F

from rlhf_fast.bench.case import Case, Contender, backend_call, ours_contenders
from rlhf_fast.ops.gelu import gelu_tanh, gelu_tanh_formula

SHAPES = {"cpu": ((1280, 512), (2560, 512))}


def activations(rows: int, width: int) -> torch.Tensor:
    generator = torch.Generator()
    generator.seed()
    return (torch.randn(rows, width, generator=generator) * 2).requires_grad_(True)


def forward(function, x):
    with torch.no_grad():
        return (function(x),)


def forward_backward(function, x):
    y = function(x)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y.detach(), grad


PASSES = {"fwd": forward, "fwd+bwd": forward_backward}


def _torch_tanh(x):
    return F.gelu(x, approximate="tanh")


def _gelu_new():
    from transformers.activations import NewGELUActivation

    return NewGELUActivation()


def checker(x, pass_name: str):
    x64 = x.detach().double().requires_grad_(True)
    want = PASSES[pass_name](gelu_tanh_formula, x64)

    def check(output) -> None:
        for got, expected in zip(output, want):
            torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5, rtol=1e-5)

    return check


def cases(device: torch.device) -> Iterator[Case]:
    if device.type != "cpu":
        return
    for rows, width in SHAPES["cpu"]:
        x = activations(rows, width)
        for pass_name, run_pass in PASSES.items():
            contenders = ours_contenders(
                device, lambda backend, run_pass=run_pass, x=x: backend_call(backend, run_pass, gelu_tanh, x)
            )
            contenders.append(Contender("torch F.gelu(tanh)", partial(run_pass, _torch_tanh, x), "baseline"))
            contenders.append(Contender("transformers gelu_new", partial(run_pass, _gelu_new(), x), "peer"))
            yield Case(
                op="gelu",
                name=f"gelu_tanh {rows}x{width} fp32 {pass_name}",
                contenders=contenders,
                check=checker(x, pass_name),
                rounds=10,
            )
