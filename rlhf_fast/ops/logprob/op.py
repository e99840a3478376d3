"""The custom ops of both log-prob functions, their fake kernels and autograd, and the backend table.

Four ops: `token_logprobs_{forward,backward}` (from logits) and `linear_token_logprobs_{forward,backward}`
(from hidden × LM head). Their schemas are flat, as torch.library requires, and written once (`SCHEMAS`)
from the bundles' fields; each op body builds the `LogprobSpec` (and `LogprobGrads`) bundles and hands them
to the backend; the forward schemas end in the spec's fields in order, so the fake kernels and autograd take
them as one slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from rlhf_fast.ops._backend import forced_backend, lazy, select_backend
from rlhf_fast.ops.logprob import chunked, cpp, reference
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
    "reference": LogprobBackend(
        reference.forward, reference.backward, reference.linear_forward, reference.linear_backward
    ),
    "chunked": LogprobBackend(
        chunked.forward, chunked.backward, chunked.linear_forward, chunked.linear_backward
    ),
    "cpp": LogprobBackend(cpp.forward, cpp.backward, cpp.linear_forward, cpp.linear_backward),
    "triton": LogprobBackend(
        *_triton("rlhf_fast.ops.triton.logprob", "token_logprobs"),
        *_triton("rlhf_fast.ops.triton.linear_logprob", "linear_token_logprobs"),
    ),
}
IMPLEMENTED = tuple(BACKENDS)
GPU_ORDER = ("triton", "chunked")


def backend_for(op_name: str, like: torch.Tensor) -> LogprobBackend:
    name = select_backend(op_name, like.device, IMPLEMENTED, GPU_ORDER)
    if name == "triton" and like.dtype == torch.float64:
        # float64 is a testing dtype: the Triton kernels compute in float32, so the default goes to plain torch.
        if forced_backend() == "triton":
            raise RuntimeError(
                f"rlhf_fast: the triton backend of {op_name} takes float32/bfloat16/float16 inputs"
            )
        name = "chunked"
    return BACKENDS[name]


# ----------------------------------------------------------------------------------------------------------
# The schemas, written once from the bundles' fields; the Python functions below take them in this order.
# ----------------------------------------------------------------------------------------------------------

_SPEC = "Tensor targets, Tensor? mask, Tensor? ref_logprobs, float temperature, str kl_estimator, bool want_entropy"
_FORWARD_OUTPUTS = "(Tensor logprobs, Tensor entropy, Tensor kl, Tensor lse)"
_GRADS = "Tensor grad_logprobs, Tensor? grad_entropy, Tensor? grad_kl"
_SAVED = "Tensor targets, Tensor? mask, Tensor? ref_logprobs, Tensor logprobs, Tensor entropy, Tensor lse"
_LINEAR = "Tensor hidden, Tensor weight, Tensor? bias"
SCHEMAS = {
    "token_logprobs_forward": f"(Tensor logits, {_SPEC}) -> {_FORWARD_OUTPUTS}",
    "token_logprobs_backward": f"({_GRADS}, Tensor logits, {_SAVED}, float temperature, str kl_estimator) -> Tensor",
    "linear_token_logprobs_forward": f"({_LINEAR}, {_SPEC}) -> {_FORWARD_OUTPUTS}",
    "linear_token_logprobs_backward": (
        f"({_GRADS}, {_LINEAR}, {_SAVED}, float temperature, str kl_estimator, bool need_hidden, bool need_weight)"
        " -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
    ),
}


def _custom_op(name: str):
    return torch.library.custom_op(f"rlhf_fast::{name}", mutates_args=(), schema=SCHEMAS[name])


# ----------------------------------------------------------------------------------------------------------
# From logits.
# ----------------------------------------------------------------------------------------------------------


@_custom_op("token_logprobs_forward")
def token_logprobs_forward(logits, *spec_fields):
    """-> (logprobs, entropy or [0], kl or [0], lse), each of targets' shape, float32 (float64)."""
    spec = LogprobSpec(*spec_fields)
    return shape_outputs(backend_for("token_logprobs", logits).forward(logits, spec), spec)


@token_logprobs_forward.register_fake
def _(logits, *spec_fields):
    return empty_outputs(logits, LogprobSpec(*spec_fields))


@_custom_op("token_logprobs_backward")
def token_logprobs_backward(grad_logprobs, grad_entropy, grad_kl, logits, *saved_and_options):
    """-> dL/dlogits, contiguous, with logits' shape and dtype."""
    spec, grads = _backward_bundles(grad_logprobs, grad_entropy, grad_kl, *saved_and_options)
    return backend_for("token_logprobs", logits).backward(logits, spec, grads)


@token_logprobs_backward.register_fake
def _(grad_logprobs, grad_entropy, grad_kl, logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _backward_bundles(
    grad_logprobs, grad_entropy, grad_kl, *saved_and_options
) -> tuple[LogprobSpec, LogprobGrads]:
    """The bundles from a backward op's arguments but its leading tensors (`_SAVED`, temperature, estimator)."""
    targets, mask, ref_logprobs, logprobs, entropy, lse, temperature, kl_estimator = saved_and_options
    spec = LogprobSpec(targets, mask, ref_logprobs, temperature, kl_estimator, grad_entropy is not None)
    return spec, LogprobGrads(grad_logprobs, grad_entropy, grad_kl, logprobs, entropy, lse)


# ----------------------------------------------------------------------------------------------------------
# From hidden states × LM head.
# ----------------------------------------------------------------------------------------------------------


@_custom_op("linear_token_logprobs_forward")
def linear_token_logprobs_forward(hidden, weight, bias, *spec_fields):
    """-> (logprobs, entropy or [0], kl or [0], lse), each of targets' shape, float32 (float64)."""
    spec = LogprobSpec(*spec_fields)
    outputs = backend_for("linear_token_logprobs", hidden).linear_forward(hidden, weight, bias, spec)
    return shape_outputs(outputs, spec)


@linear_token_logprobs_forward.register_fake
def _(hidden, weight, bias, *spec_fields):
    return empty_outputs(hidden, LogprobSpec(*spec_fields))


@_custom_op("linear_token_logprobs_backward")
def linear_token_logprobs_backward(grad_logprobs, grad_entropy, grad_kl, hidden, weight, bias, *rest):
    """-> (dL/dhidden or [0], dL/dweight or [0], dL/dbias or [0]) in the inputs' dtypes."""
    *saved_and_options, need_hidden, need_weight = rest
    spec, grads = _backward_bundles(grad_logprobs, grad_entropy, grad_kl, *saved_and_options)
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
    ctx.save_for_backward(
        *inputs[:leading], spec.targets, spec.mask, spec.ref_logprobs, logprobs, entropy, lse
    )
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
    return (*grads, *leading), (
        targets,
        mask,
        ref_logprobs,
        logprobs,
        entropy,
        lse,
        temperature,
        kl_estimator,
    )


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
