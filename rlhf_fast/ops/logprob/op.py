"""The custom ops of both log-prob functions, their fake kernels and autograd, and the backend table.

Four ops: `token_logprobs_{forward,backward}` (from logits) and `linear_token_logprobs_{forward,backward}`
(from hidden × LM head). Their schemas are flat, as torch.library requires; each op body builds the
`LogprobSpec` (and `LogprobGrads`) bundles once and hands them to the backend, and the forward schemas end in
the spec's fields in order, so the fake kernels and autograd take them as one slice.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from rlhf_fast.ops._backend import forced_backend, lazy, select_backend
from rlhf_fast.ops.logprob import chunked, reference
from rlhf_fast.ops.logprob.spec import LogprobGrads, LogprobSpec, empty_outputs, shape_outputs



class LogprobBackend(NamedTuple):
    """One backend: forward (logits, spec) -> flat (logp, entropy or [0], kl or [0], lse); backward
    (logits, spec, grads) -> dL/dlogits; and the same from hidden × LM head (backward -> the three grads)."""

    forward: Callable
    backward: Callable
    linear_forward: Callable
    linear_backward: Callable


def _triton(module: str, prefix: str) -> tuple[Callable, Callable]:
    return lazy(module, f"{prefix}_forward_triton"), lazy(module, f"{prefix}_backward_triton")


BACKENDS = {
    "reference": LogprobBackend(reference.forward, reference.backward, reference.linear_forward,
                                reference.linear_backward),
    "chunked": LogprobBackend(chunked.forward, chunked.backward, chunked.linear_forward, chunked.linear_backward),
    "triton": LogprobBackend(*_triton("rlhf_fast.ops.triton.logprob", "token_logprobs"),
                             *_triton("rlhf_fast.ops.triton.linear_logprob", "linear_token_logprobs")),
}
IMPLEMENTED = tuple(BACKENDS)
GPU_ORDER = ("triton", "chunked")


def backend_for(op_name: str, like: torch.Tensor) -> LogprobBackend:
    name = select_backend(op_name, like.device, IMPLEMENTED, GPU_ORDER)
    if name == "triton" and like.dtype == torch.float64:
        # float64 is a testing dtype: the Triton kernels compute in float32, so the default goes to plain torch.
        if forced_backend() == "triton":
            raise RuntimeError(f"rlhf_fast: the triton backend of {op_name} takes float32/bfloat16/float16 inputs")
        name = "chunked"
    return BACKENDS[name]


# ----------------------------------------------------------------------------------------------------------
# From logits.
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rlhf_fast::token_logprobs_forward", mutates_args=())
def token_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    temperature: float,
    kl_estimator: str,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logprobs, entropy or [0], kl or [0], lse), each of targets' shape, float32 (float64)."""
    spec = LogprobSpec(targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy)
    return shape_outputs(backend_for("token_logprobs", logits).forward(logits, spec), spec)


@token_logprobs_forward.register_fake
def _(logits, *spec_fields):
    return empty_outputs(logits, LogprobSpec(*spec_fields))


@torch.library.custom_op("rlhf_fast::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    kl_estimator: str,
) -> torch.Tensor:
    """-> dL/dlogits, contiguous, with logits' shape and dtype."""
    spec = LogprobSpec(targets, mask, ref_logprobs, temperature, kl_estimator, grad_entropy is not None)
    grads = LogprobGrads(grad_logprobs, grad_entropy, grad_kl, logprobs, entropy, lse)
    return backend_for("token_logprobs", logits).backward(logits, spec, grads)


@token_logprobs_backward.register_fake
def _(grad_logprobs, grad_entropy, grad_kl, logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


# ----------------------------------------------------------------------------------------------------------
# From hidden states × LM head.
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rlhf_fast::linear_token_logprobs_forward", mutates_args=())
def linear_token_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    temperature: float,
    kl_estimator: str,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logprobs, entropy or [0], kl or [0], lse), each of targets' shape, float32 (float64)."""
    spec = LogprobSpec(targets, mask, ref_logprobs, temperature, kl_estimator, want_entropy)
    outputs = backend_for("linear_token_logprobs", hidden).linear_forward(hidden, weight, bias, spec)
    return shape_outputs(outputs, spec)


@linear_token_logprobs_forward.register_fake
def _(hidden, weight, bias, *spec_fields):
    return empty_outputs(hidden, LogprobSpec(*spec_fields))


@torch.library.custom_op("rlhf_fast::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    kl_estimator: str,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dL/dhidden or [0], dL/dweight or [0], dL/dbias or [0]) in the inputs' dtypes."""
    spec = LogprobSpec(targets, mask, ref_logprobs, temperature, kl_estimator, grad_entropy is not None)
    grads = LogprobGrads(grad_logprobs, grad_entropy, grad_kl, logprobs, entropy, lse)
    backend = backend_for("linear_token_logprobs", hidden)
    return backend.linear_backward(hidden, weight, bias, spec, grads, need_hidden, need_weight)


@linear_token_logprobs_backward.register_fake
def _(grad_logprobs, grad_entropy, grad_kl, hidden, weight, bias, *rest):
    need_hidden, need_weight = rest[-2:]
    with_bias = bias is not None and need_weight
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty(bias.shape if with_bias else (0,)),
    )


# ----------------------------------------------------------------------------------------------------------
# Autograd, shared by both forward ops: `leading` differentiable tensors, then the spec.
# ----------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output, leading: int) -> None:
    spec = LogprobSpec(*inputs[leading:])
    logprobs, entropy, _, lse = output
    ctx.save_for_backward(*inputs[:leading], spec.targets, spec.mask, spec.ref_logprobs, logprobs, entropy, lse)
    ctx.options = (spec.temperature, spec.kl_estimator, spec.want_entropy)


def _backward_args(ctx, grad_logprobs, grad_entropy, grad_kl) -> tuple[tuple, tuple]:
    """(the backward op's arguments up to the leading tensors, those after them) from what forward saved."""
    *leading, targets, mask, ref_logprobs, logprobs, entropy, lse = ctx.saved_tensors
    temperature, kl_estimator, want_entropy = ctx.options
    grads = (
        torch.zeros_like(logprobs) if grad_logprobs is None else grad_logprobs,
        grad_entropy if want_entropy else None,
        grad_kl if ref_logprobs is not None else None,
    )
    return (*grads, *leading), (targets, mask, ref_logprobs, logprobs, entropy, lse, temperature, kl_estimator)


def _token_backward(ctx, grad_logprobs, grad_entropy, grad_kl, _grad_lse):
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    head, tail = _backward_args(ctx, grad_logprobs, grad_entropy, grad_kl)
    return (token_logprobs_backward(*head, *tail),) + (None,) * 6


def _linear_backward(ctx, grad_logprobs, grad_entropy, grad_kl, _grad_lse):
    head, tail = _backward_args(ctx, grad_logprobs, grad_entropy, grad_kl)
    bias = head[-1]
    wants = ctx.needs_input_grad[:3]
    need_hidden, need_weight = wants[0], wants[1] or (bias is not None and wants[2])
    if not (need_hidden or need_weight):
        return (None,) * 9
    grads = linear_token_logprobs_backward(*head, *tail, need_hidden, need_weight)
    with_bias = bias is not None and wants[2]
    kept = (grads[0] if wants[0] else None, grads[1] if wants[1] else None, grads[2] if with_bias else None)
    return kept + (None,) * 6


token_logprobs_forward.register_autograd(
    _token_backward, setup_context=lambda ctx, inputs, output: _setup_context(ctx, inputs, output, 1)
)
linear_token_logprobs_forward.register_autograd(
    _linear_backward, setup_context=lambda ctx, inputs, output: _setup_context(ctx, inputs, output, 3)
)
