"""rlhf_fast.ops.gelu: every backend against the float64 formula, forward and backward, and in the models.

Inputs are fresh random each run, with odd shapes, a wide range (the exponential's clamp), strided views and
every dtype the op claims.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.ops import use_backend
from rlhf_fast.ops.gelu import IMPLEMENTED, gelu_tanh, gelu_tanh_formula
from tests.helpers import TOLERANCES, fresh_generator, kernel_backends

BACKENDS = ["reference", *kernel_backends(IMPLEMENTED)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((1,), (7,), (3, 257), (2, 5, 1031), (0, 4))


def random_input(shape, generator, scale=4.0):
    """Mostly the activations' usual range, with a tail far past the exponential's clamp on both sides."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    tail = torch.rand(shape, generator=generator, dtype=torch.float64) < 0.05
    return torch.where(tail, x * 25, x)


def tolerance(dtype):
    # The formula runs in float64 on the same rounded inputs; the output is rounded to `dtype` once.
    return TOLERANCES[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_the_formula(backend, dtype, shape):
    generator = fresh_generator()
    x64 = random_input(shape, generator).to(dtype).to(torch.float64).requires_grad_()
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    expected = gelu_tanh_formula(x64)
    expected.backward(grad_out.to(torch.float64))

    x = x64.detach().to(dtype).requires_grad_()
    with use_backend(backend):
        y = gelu_tanh(x)
        y.backward(grad_out)
    assert y.dtype == dtype and y.shape == x.shape and x.grad.dtype == dtype
    torch.testing.assert_close(
        y.to(torch.float64), expected.detach(), **tolerance(dtype), msg=repr(generator)
    )
    # The gradient of a rounded input: compared with a tolerance scaled to the gradient's own size.
    grad_tolerance = dict(
        tolerance(dtype),
        atol=tolerance(dtype)["atol"] * max(1.0, grad_out.abs().amax().item() if grad_out.numel() else 0.0),
    )
    torch.testing.assert_close(x.grad.to(torch.float64), x64.grad, **grad_tolerance, msg=repr(generator))


@pytest.mark.parametrize("backend", kernel_backends(IMPLEMENTED))
def test_strided_input_and_extremes(backend):
    generator = fresh_generator()
    base = random_input((64, 130), generator).to(torch.float32)
    strided = base.t()[::3]  # non-contiguous
    special = torch.tensor([0.0, -0.0, 1e30, -1e30, 88.0, -88.0, 5.0, -5.0, float("inf"), float("nan")])
    for x in (strided, special):
        with use_backend(backend):
            y = gelu_tanh(x)
        expected = torch.nn.functional.gelu(x, approximate="tanh")
        torch.testing.assert_close(y, expected, **TOLERANCES[torch.float32], equal_nan=True)


@pytest.mark.parametrize("backend", kernel_backends(IMPLEMENTED))
def test_gradcheck_float64(backend):
    x = random_input((5, 9), fresh_generator(), scale=2.0).requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(gelu_tanh, (x,))


def test_models_run_gpt2_activations_through_the_op():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_fast.models._common import FusedGELUTanh, use_fused_activations

    config = GPT2Config(
        vocab_size=50, n_positions=16, n_layer=2, n_embd=32, n_head=2, activation_function="gelu_new"
    )
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (3, 11), generator=fresh_generator())
    with torch.no_grad():
        before = model(ids).logits
        assert use_fused_activations(model) == 2
        after = model(ids).logits
    assert all(isinstance(block.mlp.act, FusedGELUTanh) for block in model.transformer.h)
    assert model.config.activation_function == "gelu_pytorch_tanh"
    torch.testing.assert_close(after, before, **TOLERANCES[torch.float32])
