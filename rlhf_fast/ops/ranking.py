"""The InstructGPT K-wise ranking loss for the reward model.

A labeler ranks the K completions of a prompt (K from 2 to 16, ragged across the batch). Every pair
(i ranked above j) is one comparison, and all C(K, 2) comparisons of a prompt form one batch element:

    loss_p   = 1 / #pairs_p · Σ_{i above j} −log σ(r_i − r_j − m_ij)
    loss     = mean over prompts of loss_p
    accuracy = #(untied pairs with r_i > r_j) / #(untied pairs), over the whole batch

Ties: completions with equal rank form no pair. A prompt whose completions are all tied has no pair; it is
left out of the mean (it adds no term and is not counted among the prompts). When no prompt has a
pair, loss and accuracy are 0 (and the gradient is 0).

Margins (`margin`), optional:
- a Python number or a 0-dim tensor c: m_ij = c for every pair (the pair must be won by at least c);
- a [ΣK] tensor M of per-completion scores (e.g. labeler Likert scores): m_ij = M_i − M_j for the pair
  i above j, so a pair the labeler separated more must be separated more by the rewards.
Margins receive no gradient. A 0-dim CUDA tensor is read to the host once (pass a float to avoid the sync).

Backends: `reference` (plain torch, in the custom op), `cpp` (csrc/cpu/ranking.cpp), `cuda`
(csrc/kernels/ranking.cu), `triton` (rlhf_fast/ops/triton/ranking.py). Loss and accuracy are 0-dim float32
(float64 for float64 rewards); the gradient has the dtype of `rewards`. No backend builds a [P, K, K]
tensor except the plain-torch ones.

Autograd: eager calls on the compiled backends run `torch.ops.rlhf_fast_C.ranking_loss`, whose autograd
lives in C++ (csrc/autograd/ranking.cpp; bench/RESULTS.md shows the Python machinery cost more than the
kernels at P=64, K=9). Everything else (the reference and Triton backends, and traced code under
torch.compile) goes through the custom ops below and their registered autograd.

The forward op also returns two small per-prompt tensors for the backward: each prompt's weight in the loss,
1 / (#pairs_p · #prompts with a pair) (0 for an all-tied prompt), and each group's end offset (the
inclusive cumulative sum of `group_sizes`).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

from rlhf_fast import _extension
from rlhf_fast.ops._backend import forced_backend, kernel_table, pick, select_backend, use_backend
from rlhf_fast.ops._checks import check_finite, check_tensor, value_checks_enabled
from rlhf_fast.ops._contract import MAX_GROUP, MIN_GROUP, output_dtype, ranking_outputs_from_prompt_stats

# Not yet measured on Hopper: the CUDA kernel is one launch per direction, Triton adds a few torch reductions.
GPU_ORDER = ("cuda", "triton")


# ---------------------------------------------------------------------------------------------------------
# Readable ground truth
# ---------------------------------------------------------------------------------------------------------


def ranking_loss_reference(
    rewards: torch.Tensor,
    group_sizes: torch.Tensor,
    ranks: torch.Tensor | None = None,
    margin: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch K-wise ranking loss, one prompt at a time: the ground truth (same signature and
    outputs as `ranking_loss`, differentiable through ordinary autograd)."""
    dtype = output_dtype(rewards.dtype)
    values = rewards.to(dtype)
    sizes = [int(k) for k in group_sizes.tolist()]
    if ranks is None:
        ranks = torch.cat([torch.arange(k, device=rewards.device) for k in sizes])
    scores, constant = _split_margin(margin, rewards)
    if scores is None:
        scores = torch.zeros_like(values)
    scores = scores.to(dtype)

    prompt_losses, correct, pairs = [], 0, 0
    for r, rank, score in zip(values.split(sizes), ranks.split(sizes), scores.split(sizes)):
        above = rank[:, None] < rank[None, :]  # [K, K]: row i is ranked above column j
        pair_margin = score[:, None] - score[None, :] + constant
        logits = r[:, None] - r[None, :] - pair_margin
        if above.any():
            prompt_losses.append(-F.logsigmoid(logits[above]).mean())
        correct += int((r[:, None] > r[None, :])[above].sum())
        pairs += int(above.sum())
    # `values.sum() * 0` keeps a zero loss connected to rewards, so backward gives a zero gradient.
    loss = torch.stack(prompt_losses).mean() if prompt_losses else values.sum() * 0
    accuracy = torch.tensor(correct / pairs if pairs else 0.0, dtype=dtype, device=rewards.device)
    return loss, accuracy


# ---------------------------------------------------------------------------------------------------------
# Plain-torch implementation of the two custom ops (the `reference` backend), on padded [P, 16] groups
# ---------------------------------------------------------------------------------------------------------


def _padded_groups(
    rewards: torch.Tensor,
    prompt_ends: torch.Tensor,
    ranks: torch.Tensor | None,
    margins: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt's group padded to 16: rewards, rewards − margins, ranks, validity, flat index; [P, 16]."""
    dtype = output_dtype(rewards.dtype)
    num = rewards.numel()
    ends = prompt_ends.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    position = torch.arange(MAX_GROUP, device=rewards.device)
    index = starts[:, None] + position
    valid = (position < (ends - starts)[:, None]) & (index >= 0) & (index < num)
    index = torch.where(valid, index, 0)
    values = torch.where(valid, rewards.to(dtype)[index], 0) if num else index.to(dtype) * 0
    shifted = values if margins is None else values - torch.where(valid, margins.to(dtype)[index], 0)
    rank = position.expand_as(index) if ranks is None else ranks.long()[index]
    return values, shifted, rank, valid, index, starts


def _pair_tiles(shifted, rank, valid, margin):
    """[P, 16, 16]: which ordered pairs (i above j) exist, and their logits r_i − r_j − m_ij."""
    above = valid[:, :, None] & valid[:, None, :] & (rank[:, :, None] < rank[:, None, :])
    logits = shifted[:, :, None] - shifted[:, None, :] - margin
    return above, logits


def _forward_torch(rewards, group_sizes, ranks, margins, margin):
    dtype = output_dtype(rewards.dtype)
    prompt_ends = torch.cumsum(group_sizes.long(), 0)
    values, shifted, rank, valid, _, _ = _padded_groups(rewards, prompt_ends, ranks, margins)
    above, logits = _pair_tiles(shifted, rank, valid, margin)
    terms = torch.where(above, F.softplus(-logits), 0)
    correct = above & (values[:, :, None] > values[:, None, :])
    loss, accuracy, weights = ranking_outputs_from_prompt_stats(
        terms.sum((1, 2)), above.sum((1, 2)), correct.sum((1, 2)), dtype
    )
    return loss, accuracy, weights, prompt_ends


def _backward_torch(grad_loss, rewards, ranks, margins, margin, prompt_weights, prompt_ends):
    _, shifted, rank, valid, index, _ = _padded_groups(rewards, prompt_ends, ranks, margins)
    above, logits = _pair_tiles(shifted, rank, valid, margin)
    # d/dlogit of −log σ(logit) is −σ(−logit); the logit moves with +r_i and −r_j.
    slopes = torch.where(above, -torch.sigmoid(-logits), 0)
    per_completion = slopes.sum(2) - slopes.sum(1)
    scaled = per_completion * (prompt_weights[:, None] * grad_loss.to(per_completion.dtype))
    grad = torch.zeros(rewards.numel(), dtype=scaled.dtype, device=rewards.device)
    grad.index_add_(0, index[valid], scaled[valid])
    return grad.to(rewards.dtype)


# ---------------------------------------------------------------------------------------------------------
# Custom ops and autograd
# ---------------------------------------------------------------------------------------------------------


# {backend: kernel} per direction; each takes the custom op's arguments in order.
_TRITON = "rlhf_fast.ops.triton.ranking"
_FORWARD = kernel_table(_forward_torch, "ranking_loss_forward", _TRITON, "ranking_forward_triton")
_BACKWARD = kernel_table(_backward_torch, "ranking_loss_backward", _TRITON, "ranking_backward_triton")
IMPLEMENTED = tuple(_FORWARD)


@torch.library.custom_op("rlhf_fast::ranking_loss_forward", mutates_args=())
def _ranking_forward_op(
    rewards: torch.Tensor,
    group_sizes: torch.Tensor,
    ranks: torch.Tensor | None,
    margins: torch.Tensor | None,
    margin: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, accuracy, prompt_weights [P], prompt_ends [P] int64); see the module docstring."""
    return pick("ranking_loss", rewards.device, _FORWARD, GPU_ORDER)(
        rewards, group_sizes, ranks, margins, margin
    )


@_ranking_forward_op.register_fake
def _(rewards, group_sizes, ranks, margins, margin):
    dtype = output_dtype(rewards.dtype)
    num_prompts = group_sizes.shape[0]
    return (
        rewards.new_empty((), dtype=dtype),
        rewards.new_empty((), dtype=dtype),
        rewards.new_empty((num_prompts,), dtype=dtype),
        rewards.new_empty((num_prompts,), dtype=torch.int64),
    )


_BACKWARD_SCHEMA = (
    "(Tensor grad_loss, Tensor rewards, Tensor? ranks, Tensor? margins, float margin, Tensor prompt_weights, "
    "Tensor prompt_ends) -> Tensor"
)


@torch.library.custom_op("rlhf_fast::ranking_loss_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def _ranking_backward_op(grad_loss, rewards, *rest):
    """d loss / d rewards, [ΣK] in the dtype of rewards, given d loss (0-dim) and the forward's stats."""
    return pick("ranking_loss", rewards.device, _BACKWARD, GPU_ORDER)(grad_loss, rewards, *rest)


@_ranking_backward_op.register_fake
def _(grad_loss, rewards, ranks, margins, margin, prompt_weights, prompt_ends):
    return torch.empty(rewards.shape, dtype=rewards.dtype, device=rewards.device)


def _setup_context(ctx, inputs, output):
    rewards, _, ranks, margins, margin = inputs
    _, accuracy, prompt_weights, prompt_ends = output
    ctx.save_for_backward(rewards, ranks, margins, prompt_weights, prompt_ends)
    ctx.margin = margin
    # The backward may run on another thread (CUDA autograd), where a `use_backend` block does not reach.
    ctx.forced_backend = forced_backend()
    ctx.mark_non_differentiable(accuracy, prompt_weights, prompt_ends)


def _backward(ctx, grad_loss, grad_accuracy, grad_weights, grad_ends):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    rewards, ranks, margins, prompt_weights, prompt_ends = ctx.saved_tensors
    with use_backend(ctx.forced_backend or "auto"):
        grad_rewards = _ranking_backward_op(
            grad_loss, rewards, ranks, margins, ctx.margin, prompt_weights, prompt_ends
        )
    return grad_rewards, None, None, None, None


_ranking_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Public function: argument checks, then the custom op
# ---------------------------------------------------------------------------------------------------------


def _check_integer(name: str, value) -> torch.Tensor:
    check_tensor(name, value, ndim=1)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    return value


def _split_margin(margin, rewards: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(per-completion margin tensor or None, constant pair margin) from the `margin` argument."""
    if margin is None:
        return None, 0.0
    if isinstance(margin, Real) and not isinstance(margin, bool):
        constant = float(margin)
    elif isinstance(margin, torch.Tensor) and margin.dtype != torch.bool and not margin.dtype.is_complex:
        if margin.dim() == 0:
            constant = float(margin)
        elif margin.shape == rewards.shape:
            return margin, 0.0
        else:
            raise ValueError(
                f"margin must be a number, a 0-dim tensor or a [ΣK] tensor shaped like rewards "
                f"{tuple(rewards.shape)}, got shape {tuple(margin.shape)}"
            )
    else:
        raise ValueError(f"margin must be None, a number or a real tensor, got {type(margin).__name__}")
    if not math.isfinite(constant):
        raise ValueError(f"margin must be finite, got {constant}")
    return None, constant


def _check_group_sizes(group_sizes: torch.Tensor, num_completions: int) -> None:
    sizes = group_sizes.cpu()
    smallest, largest = (int(v) for v in torch.aminmax(sizes))
    if smallest < MIN_GROUP or largest > MAX_GROUP:
        raise ValueError(
            f"group_sizes must lie in [{MIN_GROUP}, {MAX_GROUP}] (completions per prompt), "
            f"got values from {smallest} to {largest}"
        )
    total = int(sizes.sum())
    if total != num_completions:
        raise ValueError(f"group_sizes sum to {total} but rewards has {num_completions} entries")


def _check_ranks(ranks: torch.Tensor, group_sizes: torch.Tensor) -> None:
    sizes = group_sizes.to(ranks.device, torch.int64)
    sizes_per_completion = torch.repeat_interleave(sizes, sizes, output_size=ranks.numel())
    if bool(((ranks < 0) | (ranks >= sizes_per_completion)).any()):
        raise ValueError("ranks must lie in [0, K) within each group (0 = best), K being that group's size")


def ranking_loss(
    rewards: torch.Tensor,
    group_sizes: torch.Tensor,
    ranks: torch.Tensor | None = None,
    margin: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K-wise ranking loss and pair accuracy (see the module docstring for the exact definition).

    rewards: [ΣK] float32/bfloat16/float16/float64, the reward model's scores, prompt after prompt.
    group_sizes: [P] integer, K of each prompt, 2 ≤ K ≤ 16 (ragged allowed); may sit on the CPU while
        rewards are on the GPU (then it is checked without a sync and copied over).
    ranks: [ΣK] integer, each completion's rank within its group (0 = best, equal ranks are ties);
        None means every group is listed best first.
    margin: None, a number / 0-dim tensor (the same margin for every pair), or a [ΣK] real tensor of
        per-completion scores (pair margin = score_i − score_j).
    Returns (loss, accuracy): 0-dim float32 (float64 for float64 rewards); loss is differentiable in rewards.

    Checks that read values (ranges, sums, NaN) are skipped when `set_value_checks(False)`, except those on a
    CPU `group_sizes`, which cost no sync.
    """
    check_tensor("rewards", rewards, ndim=1, floating=True)
    _check_integer("group_sizes", group_sizes)
    if group_sizes.numel() == 0:
        raise ValueError("group_sizes must hold at least one prompt, got an empty tensor")
    if ranks is not None:
        _check_integer("ranks", ranks)
        if ranks.shape != rewards.shape:
            raise ValueError(
                f"ranks has shape {tuple(ranks.shape)} but rewards has shape {tuple(rewards.shape)}"
            )
        if ranks.device != rewards.device:
            raise ValueError(f"ranks is on {ranks.device} but rewards is on {rewards.device}")
    margins, constant = _split_margin(margin, rewards)
    if margins is not None and margins.device != rewards.device:
        raise ValueError(f"margin is on {margins.device} but rewards is on {rewards.device}")
    if group_sizes.device != rewards.device and group_sizes.device.type != "cpu":
        raise ValueError(f"group_sizes is on {group_sizes.device} but rewards is on {rewards.device}")

    checking = value_checks_enabled()
    if checking or (group_sizes.device.type == "cpu" and not torch.compiler.is_compiling()):
        _check_group_sizes(group_sizes, rewards.numel())
    if checking:
        if ranks is not None:
            _check_ranks(ranks, group_sizes)
        check_finite("rewards", rewards)
        if margins is not None:
            check_finite("margin", margins)

    group_sizes = group_sizes.to(rewards.device, non_blocking=True)
    if margins is not None:
        margins = margins.to(output_dtype(rewards.dtype))
    if torch.compiler.is_compiling():
        return _ranking_forward_op(rewards, group_sizes, ranks, margins, constant)[:2]
    if select_backend("ranking_loss", rewards.device, IMPLEMENTED, GPU_ORDER) in ("cpp", "cuda"):
        # Forward, autograd and backward all in C++ (csrc/autograd/ranking.cpp): no Python per call, which
        # bench/RESULTS.md measured as the difference between 0.71x and 1.33x the naive loss at P=64, K=9.
        return _extension.kernels().ranking_loss(rewards, group_sizes, ranks, margins, constant)
    return _ranking_forward_op(rewards, group_sizes, ranks, margins, constant)[:2]
