"""PPO's clipped surrogate and clipped value loss, as masked means over the valid response tokens.

With ratio = exp(logprobs − old_logprobs) and the mean taken over tokens where mask != 0:

    policy_loss    = mean max(−A·ratio, −A·clamp(ratio, 1 − clip_coef, 1 + clip_coef))
    clipfrac       = mean [−A·clamp(ratio) > −A·ratio]          (the clipped term is the active one)
    approx_kl      = mean (ratio − 1) − log ratio                  (Schulman's k3 estimator of KL(old‖new))
    ratio_mean     = mean ratio
    value_loss     = ½ · mean max((V − R)², (V_clipped − R)²),  V_clipped = clamp(V, V_old − c_v, V_old + c_v)
    value_clipfrac = mean [(V_clipped − R)² > (V − R)²]

as in CleanRL's `ppo.py` and TRL's PPO ("The N+ implementation details of RLHF with PPO"). V_clipped is
V_old + clamp(V − V_old, −c_v, c_v) written as TRL writes it: inside the clip range it is V itself, bit for
bit, so rounding never counts a token as clipped.

Gradients flow to `logprobs` (from policy_loss) and `values` (from value_loss) only; old_logprobs, advantages,
old_values and returns are targets. clipfrac, approx_kl, ratio_mean and value_clipfrac are diagnostics without
gradient. Where the two terms of a max tie, the gradient is the unclipped term's. Masked positions are never
used: they may hold padding garbage (inf, NaN) and get gradient 0. With no valid token at all every output is
0 and so is every gradient (never NaN). First-order only: the backward is not itself differentiable.

Backends: `reference` (below), `cpp` (csrc/cpu/ppo_loss.cpp), `cuda` (csrc/kernels/ppo_loss.cu), `triton`
(rlhf_fast/ops/triton/ppo_loss.py). Outputs are float32 0-dim tensors (float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import torch

from rlhf_fast.ops._backend import kernel_table, pick
from rlhf_fast.ops._checks import check_mask, check_same_device, check_same_shape, check_tensor
from rlhf_fast.ops._contract import output_dtype

# Not yet measured on Hopper: the CUDA kernel goes first because its forward is one launch, Triton's two.
GPU_ORDER = ("cuda", "triton")

POLICY_KEYS = ("policy_loss", "clipfrac", "approx_kl", "ratio_mean")
VALUE_KEYS = ("value_loss", "value_clipfrac")
# The custom forward op returns these 0-dim tensors in this order; valid_count (int64) is saved for backward.
FORWARD_OUTPUTS = POLICY_KEYS + VALUE_KEYS + ("valid_count",)


def ppo_losses_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    clip_coef: float = 0.2,
    value_clip: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Plain-torch PPO losses, differentiable by autograd: the ground truth. Same contract as `ppo_losses`."""
    dtype = output_dtype(logprobs.dtype)
    valid = mask.bool()
    count = valid.sum().clamp(min=1)

    def masked_mean(per_token: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, per_token, 0).sum() / count

    def valid_only(x: torch.Tensor) -> torch.Tensor:
        # Zeroes padding before any math, so inf/NaN there reaches neither the outputs nor the gradients.
        return torch.where(valid, x.to(dtype), 0)

    logprobs = valid_only(logprobs)
    old_logprobs, advantages = valid_only(old_logprobs.detach()), valid_only(advantages.detach())
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    losses = {
        "policy_loss": masked_mean(torch.maximum(unclipped, clipped)),
        "clipfrac": masked_mean((clipped > unclipped).to(dtype)),
        "approx_kl": masked_mean((ratio - 1) - log_ratio).detach(),
        "ratio_mean": masked_mean(ratio).detach(),
    }
    if values is not None:
        values = valid_only(values)
        old_values, returns = valid_only(old_values.detach()), valid_only(returns.detach())
        values_clipped = torch.clamp(values, old_values - value_clip, old_values + value_clip)
        unclipped_v = torch.square(values - returns)
        clipped_v = torch.square(values_clipped - returns)
        losses["value_loss"] = 0.5 * masked_mean(torch.maximum(unclipped_v, clipped_v))
        losses["value_clipfrac"] = masked_mean((clipped_v > unclipped_v).to(dtype))
    return losses


def _forward_reference(
    logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_coef, value_clip
) -> tuple[torch.Tensor, ...]:
    losses = ppo_losses_reference(
        logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_coef, value_clip
    )
    zero = logprobs.new_zeros((), dtype=output_dtype(logprobs.dtype))
    outputs = [losses.get(key, zero).clone() for key in POLICY_KEYS + VALUE_KEYS]
    return (*outputs, mask.bool().sum())


def _backward_reference(grad_policy_loss, grad_value_loss, logprobs, *rest) -> tuple[torch.Tensor, ...]:
    """The closed-form gradients of policy_loss and value_loss (tests check them against autograd)."""
    old_logprobs, advantages, mask, values, old_values, returns, valid_count, clip_coef, value_clip = rest
    dtype = output_dtype(logprobs.dtype)
    valid = mask.bool()
    inverse_count = 1.0 / valid_count.clamp(min=1).to(dtype)
    ratio = torch.exp(torch.where(valid, logprobs.to(dtype) - old_logprobs.to(dtype), 0))
    unclipped = -advantages.to(dtype) * ratio
    clipped = -advantages.to(dtype) * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    # d(−A·ratio)/d logprob = −A·ratio while the unclipped term is the max; the clipped term is flat.
    grad_logprobs = torch.where(valid & (unclipped >= clipped), unclipped, 0) * (
        grad_policy_loss * inverse_count
    )
    grad_logprobs = grad_logprobs.to(logprobs.dtype).contiguous()  # the kernels' layout, whatever the inputs'
    if values is None:
        return grad_logprobs, logprobs.new_empty(0)
    values_acc, old_values_acc, returns_acc = values.to(dtype), old_values.to(dtype), returns.to(dtype)
    values_clipped = torch.clamp(values_acc, old_values_acc - value_clip, old_values_acc + value_clip)
    error = values_acc - returns_acc
    unclipped_active = valid & (torch.square(error) >= torch.square(values_clipped - returns_acc))
    grad_values = torch.where(unclipped_active, error, 0) * (grad_value_loss * inverse_count)
    return grad_logprobs, grad_values.to(values.dtype).contiguous()


# {backend: kernel} per direction; each takes the custom op's arguments in order.
_TRITON = "rlhf_fast.ops.triton.ppo_loss"
_FORWARD = kernel_table(_forward_reference, "ppo_losses_forward", _TRITON, "ppo_losses_forward_triton")
_BACKWARD = kernel_table(_backward_reference, "ppo_losses_backward", _TRITON, "ppo_losses_backward_triton")
IMPLEMENTED = tuple(_FORWARD)


# The schemas: the inputs, then (backward) the count the forward saved, then the clip ranges.
_INPUTS = (
    "Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
    "Tensor? values, Tensor? old_values, Tensor? returns"
)
_FORWARD_SCHEMA = f"({_INPUTS}, float clip_coef, float value_clip) -> ({', '.join(['Tensor'] * 7)})"
_BACKWARD_SCHEMA = (
    f"(Tensor grad_policy_loss, Tensor grad_value_loss, {_INPUTS}, Tensor valid_count, "
    "float clip_coef, float value_clip) -> (Tensor, Tensor)"
)


@torch.library.custom_op("rlhf_fast::ppo_losses_forward", mutates_args=(), schema=_FORWARD_SCHEMA)
def _ppo_losses_forward_op(logprobs, *rest):
    """FORWARD_OUTPUTS as 0-dim tensors; the value terms are 0 when `values` is None."""
    return pick("ppo_losses", logprobs.device, _FORWARD, GPU_ORDER)(logprobs, *rest)


@_ppo_losses_forward_op.register_fake
def _(logprobs, *_):
    scalar = functools.partial(logprobs.new_empty, (), dtype=output_dtype(logprobs.dtype))
    return (*(scalar() for _ in POLICY_KEYS + VALUE_KEYS), logprobs.new_empty((), dtype=torch.int64))


@torch.library.custom_op("rlhf_fast::ppo_losses_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _ppo_losses_backward_op(grad_policy_loss, grad_value_loss, logprobs, *rest):
    """(grad_logprobs [B, T], grad_values [B, T]) in the inputs' dtypes; grad_values is empty without values."""
    kernel = pick("ppo_losses", logprobs.device, _BACKWARD, GPU_ORDER)
    return kernel(grad_policy_loss, grad_value_loss, logprobs, *rest)


@_ppo_losses_backward_op.register_fake
def _(grad_policy_loss, grad_value_loss, logprobs, old_logprobs, advantages, mask, values, *_):
    grad_values = logprobs.new_empty(0) if values is None else logprobs.new_empty(logprobs.shape)
    return logprobs.new_empty(logprobs.shape), grad_values


def _setup_context(ctx, inputs, output) -> None:
    logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_coef, value_clip = inputs
    ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, values, old_values, returns, output[-1])
    ctx.clip_coef, ctx.value_clip = clip_coef, value_clip
    _, clipfrac, approx_kl, ratio_mean, _, value_clipfrac, valid_count = output
    ctx.mark_non_differentiable(clipfrac, approx_kl, ratio_mean, value_clipfrac, valid_count)


def _backward(
    ctx,
    grad_policy_loss,
    grad_clipfrac,
    grad_approx_kl,
    grad_ratio_mean,
    grad_value_loss,
    grad_value_clipfrac,
    grad_valid_count,
):
    # The forward's tensor inputs, then valid_count: the backward op's arguments after the two gradients.
    saved = ctx.saved_tensors
    logprobs, values = saved[0], saved[4]
    zero = logprobs.new_zeros((), dtype=output_dtype(logprobs.dtype))
    grad_logprobs, grad_values = _ppo_losses_backward_op(
        zero if grad_policy_loss is None else grad_policy_loss,
        zero if grad_value_loss is None else grad_value_loss,
        *saved,
        ctx.clip_coef,
        ctx.value_clip,
    )
    return (
        grad_logprobs,
        None,
        None,
        None,
        (grad_values if values is not None else None),
        None,
        None,
        None,
        None,
    )


_ppo_losses_forward_op.register_autograd(_backward, setup_context=_setup_context)


def ppo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    clip_coef: float = 0.2,
    value_clip: float = 0.2,
) -> dict[str, torch.Tensor]:
    """PPO losses and diagnostics as masked means over valid tokens (see the module docstring).

    logprobs, old_logprobs, advantages: [B, T] float32/bfloat16/float16/float64; mask: [B, T] bool or integer,
    nonzero marks a response token; values, old_values, returns: [B, T] floats, all three or none.
    Returns a dict of 0-dim float32 tensors (float64 for float64 inputs): policy_loss, clipfrac, approx_kl,
    ratio_mean, and with values also value_loss, value_clipfrac. policy_loss is differentiable in logprobs and
    value_loss in values; the rest carry no gradient.
    """
    check_tensor("logprobs", logprobs, ndim=2, floating=True)
    value_args = {"values": values, "old_values": old_values, "returns": returns}
    given = [name for name, tensor in value_args.items() if tensor is not None]
    if given and len(given) < len(value_args):
        missing = [name for name in value_args if name not in given]
        raise ValueError(
            f"{', '.join(missing)} must be given with {', '.join(given)}: "
            "the value loss needs values, old_values and returns together"
        )
    floats = {
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        **{name: tensor for name, tensor in value_args.items() if tensor is not None},
    }
    for name, tensor in floats.items():
        check_tensor(name, tensor, floating=True)
    check_same_shape("logprobs", logprobs, **floats)
    check_mask("mask", mask, logprobs.shape)
    check_same_device("logprobs", logprobs, mask=mask, **floats)
    if not clip_coef >= 0.0:
        raise ValueError(f"clip_coef must be >= 0, got {clip_coef}")
    if not value_clip >= 0.0:
        raise ValueError(f"value_clip must be >= 0, got {value_clip}")
    # The kernels take one floating dtype: promote mixed inputs (autograd casts the gradients back).
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in floats.values()), logprobs.dtype)
    logprobs, old_logprobs, advantages = (t.to(dtype) for t in (logprobs, old_logprobs, advantages))
    if values is not None:
        values, old_values, returns = (t.to(dtype) for t in (values, old_values, returns))
    outputs = _ppo_losses_forward_op(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        values,
        old_values,
        returns,
        float(clip_coef),
        float(value_clip),
    )
    keys = POLICY_KEYS + (VALUE_KEYS if values is not None else ())
    return dict(zip(keys, outputs))
