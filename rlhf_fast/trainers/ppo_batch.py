"""The PPO iteration's data and its small statistics: the `Rollout` batch, the update metrics' names, masked
means / variances over the valid response tokens, whitening, the rollout-vs-training log-prob gap and per-model
gradient clipping."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rlhf_fast.ops.gae import whiten_masked
from rlhf_fast.trainers._common import epoch_order
from rlhf_fast.trainers.distributed import local_tensor

# Update metrics averaged over the optimizer steps of an iteration: key -> `ppo_losses` output (None: other).
UPDATE_METRICS = {
    "loss/policy": "policy_loss",
    "loss/value": "value_loss",
    "policy/approx_kl": "approx_kl",
    "policy/clipfrac": "clipfrac",
    "policy/ratio": "ratio_mean",
    "val/clipfrac": "value_clipfrac",
    "loss/ptx": None,
    "train/grad_norm": None,  # of policy and value together, before clipping
    "train/policy_grad_norm": None,
    "train/value_grad_norm": None,
    "train/skipped": None,
}


@dataclasses.dataclass
class Rollout:
    """One rollout batch, every field [B, ...]."""

    sequences: torch.Tensor  # [B, P+T] int64: prompt (left-padded) + response
    attention_mask: torch.Tensor  # [B, P+T] bool
    response_ids: torch.Tensor  # [B, T] int64
    response_mask: torch.Tensor  # [B, T] bool, True up to and including EOS
    logprobs: torch.Tensor  # [B, T] float32, the sampling policy's log-probs (at the sampling temperature)
    values: torch.Tensor  # [B, T] float32, the value of the state before each response token
    rewards: torch.Tensor  # [B, T] float32
    kl: torch.Tensor  # [B, T] float32, k1 estimate of KL(policy || reference) per token
    entropy: torch.Tensor  # [B, T] float32
    scores: torch.Tensor  # [B] float32, reward-model score (after the missing-EOS penalty)
    has_eos: torch.Tensor  # [B] bool

    def gathered(self, ctx) -> Rollout:
        """Every rank's rows, in rank order (all ranks must hold the same shapes)."""
        return Rollout(
            **{f.name: ctx.all_gather_rows(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def rows(self, index: torch.Tensor) -> Rollout:
        return Rollout(
            **{f.name: getattr(self, f.name).index_select(0, index) for f in dataclasses.fields(self)}
        )


def whiten(x: torch.Tensor, valid: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    whitened = whiten_masked(x, valid)
    if not shift_mean:
        mean = torch.where(valid, x, 0).sum() / valid.sum().clamp(min=1)
        whitened = torch.where(valid, whitened + mean, 0)
    return whitened


def token_ids(prompt: Any) -> list[int]:
    """A prompt's ids: an `EncodedPrompt`, a mapping with `input_ids`, or an id sequence / 1-D tensor."""
    if isinstance(prompt, dict):
        prompt = prompt["input_ids"]
    prompt = getattr(prompt, "input_ids", prompt)
    return prompt.tolist() if isinstance(prompt, torch.Tensor) else [int(token) for token in prompt]


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0).sum() / valid.sum().clamp(min=1)


def masked_var(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, valid)
    return masked_mean((x - mean) ** 2, valid)


def logprob_mismatch(
    sampled: torch.Tensor, recomputed: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) over valid tokens of |sampler log-prob − log-prob recomputed by the training forward|, 0-dim."""
    gap = torch.where(valid, (sampled - recomputed).abs(), 0.0)
    return masked_mean(gap, valid), gap.max()


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clips the gradients of one model to `max_norm` (None or <= 0: no clipping); returns the norm before."""
    limit = float("inf") if max_norm is None or max_norm <= 0 else float(max_norm)
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return torch.zeros((), device=parameters[0].device if parameters else None)
    return local_tensor(torch.nn.utils.clip_grad_norm_(with_grad, limit)).detach()


def minibatches(batch: int, num_minibatches: int, epochs: int, generator: torch.Generator, ctx):
    """(rows of the minibatch, this rank's share of them) for every optimizer step of an iteration: the same
    permutation on every rank (`generator` is a device generator seeded alike everywhere: no host round trip)."""
    minibatch = batch // num_minibatches
    share = minibatch // ctx.world_size
    for _ in range(epochs):
        order = torch.randperm(batch, generator=generator, device=ctx.device)
        for start in range(0, batch, minibatch):
            rows = order[start : start + minibatch]
            yield rows, rows[ctx.rank * share : (ctx.rank + 1) * share]


class PretrainRows:
    """PPO-ptx's cursor over the pretraining blocks [N, L], in an order reshuffled every pass (seeded by `seed`
    and the pass, so a resumed `position` repeats it exactly)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.position = 0
        self._order: tuple[int, list[int]] | None = None  # (pass, order of that pass)

    def take(self, blocks: torch.Tensor, steps: int, rows: int, ctx) -> torch.Tensor:
        """This rank's share of the next `steps` × `rows` of `blocks`: [steps, rows / processes, L], on the host."""
        if rows % ctx.world_size:
            raise ValueError(f"ptx_batch_size {rows} must be a multiple of the {ctx.world_size} processes")
        total = len(blocks)
        indices = []
        for _ in range(steps * rows):
            epoch, index = divmod(self.position, total)
            if index == 0 or self._order is None or self._order[0] != epoch:
                self._order = (epoch, epoch_order(total, self.seed, epoch))
            indices.append(self._order[1][index])
            self.position += 1
        taken = blocks[torch.tensor(indices)].view(steps, rows, -1)
        share = rows // ctx.world_size
        return taken[:, ctx.rank * share : (ctx.rank + 1) * share].contiguous()
