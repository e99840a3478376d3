"""Plain torch: the public references (differentiable by autograd, the ground truth) and the `reference`
backend of the custom ops (the full log_softmax with the closed-form backward, for testing)."""

from __future__ import annotations

import torch

from rlhf_fast.ops._contract import output_dtype
from rlhf_fast.ops.logprob.spec import LogprobGrads, LogprobSpec, TokenLogprobs, kl_and_slope, kl_output


def token_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k1",
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Plain torch: full log_softmax in float32 (float64 for float64 logits). Same contract as `token_logprobs`."""
    dtype = output_dtype(logits.dtype)
    valid = torch.ones(targets.shape, dtype=torch.bool, device=logits.device) if mask is None else mask.bool()
    safe_targets = torch.where(valid, targets.long(), 0)
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logp = torch.where(valid, log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1), 0)
    entropy = kl = None
    if return_entropy:
        probs = log_probs.exp()
        plogp = torch.where(probs > 0, probs * log_probs, 0)  # p·log p → 0 where a logit is −inf
        entropy = torch.where(valid, -plogp.sum(-1), 0)
    if ref_logprobs is not None:
        kl = torch.where(valid, kl_and_slope(logp, ref_logprobs.detach().to(dtype), kl_estimator)[0], 0)
    return TokenLogprobs(logp, entropy, kl)


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k1",
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Plain torch: materializes the logits in float32 (float64 for float64 inputs)."""
    dtype = output_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs_reference(
        logits,
        targets,
        ref_logprobs=ref_logprobs,
        mask=mask,
        temperature=temperature,
        kl_estimator=kl_estimator,
        return_entropy=return_entropy,
    )


# ----------------------------------------------------------------------------------------------------------
# The `reference` backend: flat per-row outputs, as every backend returns them.
# ----------------------------------------------------------------------------------------------------------


def _safe_targets(spec: LogprobSpec) -> torch.Tensor:
    valid = spec.flat_valid()
    return spec.flat_targets() if valid is None else torch.where(valid, spec.flat_targets(), 0)


def forward(logits: torch.Tensor, spec: LogprobSpec):
    dtype = output_dtype(logits.dtype)
    z = logits.reshape(-1, logits.shape[-1]).to(dtype) / spec.temperature
    lse = torch.logsumexp(z, dim=-1) if spec.rows else z.new_empty(0)
    log_probs = z - lse.unsqueeze(-1)
    logp = log_probs.gather(-1, _safe_targets(spec).unsqueeze(-1)).squeeze(-1)
    entropy = logp.new_empty(0)
    if spec.want_entropy:
        probs = log_probs.exp()
        entropy = -torch.where(probs > 0, probs * log_probs, 0).sum(-1)
    valid = spec.flat_valid()
    if valid is not None:
        logp, lse = torch.where(valid, logp, 0), torch.where(valid, lse, 0)
        entropy = torch.where(valid, entropy, 0) if spec.want_entropy else entropy
    return logp, entropy, kl_output(logp, spec), lse


def backward(logits: torch.Tensor, spec: LogprobSpec, grads: LogprobGrads) -> torch.Tensor:
    dtype = output_dtype(logits.dtype)
    a, b = grads.row_coefficients(spec, dtype)
    log_probs = logits.reshape(-1, logits.shape[-1]).to(dtype) / spec.temperature - grads.lse.reshape(
        -1, 1
    ).to(dtype)
    probs = log_probs.exp()
    onehot = torch.zeros_like(probs).scatter_(-1, _safe_targets(spec).unsqueeze(-1), 1.0)
    grad = a.unsqueeze(-1) * (onehot - probs)
    if b is not None:
        grad = grad - torch.where(
            probs > 0, b.unsqueeze(-1) * probs * (log_probs + grads.entropy.reshape(-1, 1)), 0
        )
    valid = spec.flat_valid()
    if valid is not None:
        grad = torch.where(valid.unsqueeze(-1), grad, 0)
    return grad.to(logits.dtype).reshape(logits.shape)


def _linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    dtype = output_dtype(hidden.dtype)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    logits = flat_hidden @ weight.to(dtype).T
    return flat_hidden, (logits if bias is None else logits + bias.to(dtype))


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LogprobSpec):
    return forward(_linear_logits(hidden, weight, bias)[1], spec.flattened())


def linear_backward(
    hidden, weight, bias, spec: LogprobSpec, grads: LogprobGrads, need_hidden: bool, need_weight: bool
):
    flat_hidden, logits = _linear_logits(hidden, weight, bias)
    grad_logits = backward(logits, spec.flattened(), grads)
    grad_hidden = (
        (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype).reshape(hidden.shape)
        if need_hidden
        else hidden.new_empty(0)
    )
    grad_weight = (grad_logits.T @ flat_hidden).to(weight.dtype) if need_weight else weight.new_empty(0)
    with_bias = bias is not None and need_weight
    grad_bias = grad_logits.sum(0).to(bias.dtype) if with_bias else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias
