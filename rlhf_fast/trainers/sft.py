"""Supervised fine-tuning on labeler demonstrations (InstructGPT §3.5, "SFT").

The loss is the mean negative log-likelihood of the response tokens (the prompt is masked), computed by the
fused `linear_token_logprobs` op from the hidden states and the LM head. With `pack=True` several examples
share a row of `block_size` tokens; a block-diagonal causal mask and per-example position ids keep them from
seeing each other, so the loss is the same as without packing.

Distributed: each rank takes a contiguous share of every global batch; the loss is normalized by the global
number of response tokens, so N processes follow the same trajectory as one process with the same batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from rlhf_fast.models import packed_causal_mask
from rlhf_fast.models.masks import parameter_dtype
from rlhf_fast.models.loading import check_token_ids, load_policy
from rlhf_fast.ops import value_checks
from rlhf_fast.trainers._common import (
    EpochTrainer,
    gradient_sync,
    guarded_step,
    rank_share,
    set_residual_dropout,
)
from rlhf_fast.trainers._modules import PolicyLogprobs
from rlhf_fast.trainers.phases import phase
from rlhf_fast.trainers.run_config import RunConfig, check_epoch_settings


@dataclasses.dataclass
class SFTConfig(RunConfig):
    """SFT hyperparameters; defaults follow InstructGPT (16 epochs, cosine decay, residual dropout 0.2)."""

    learning_rate: float = 9.65e-6
    batch_size: int = 32  # examples per optimizer step, over all processes
    micro_batch_size: int | None = None  # examples (packed: rows) per forward on one process; None = all
    epochs: int = 16
    max_steps: int | None = None  # stop early after this many optimizer steps
    warmup: int = 0  # warmup steps
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0  # > 0: cosine decays to this fraction of learning_rate
    residual_dropout: float | None = 0.2  # None keeps the model's own setting
    pack: bool = False
    block_size: int | None = None  # packed row length; default: the longest example
    eval_every: int = 0  # steps between evaluations; 0 = at the end of each epoch
    eval_batch_size: int = 32
    output_dir: str = "runs/sft"

    def check(self) -> None:
        super().check()
        check_epoch_settings(self)


class SFTTrainer(EpochTrainer):
    """Fine-tunes a causal LM on demonstrations.

    Args:
        config: `SFTConfig`.
        policy: a `PolicyModel`, a transformers causal LM, or a model directory.
        train_data: encoded demonstrations (`encode_demonstrations(...)` items: `input_ids`, `prompt_length`).
        eval_data: the same, for `eval/loss`.
        tokenizer: saved with the final model; its pad id is used unless `pad_token_id` is given.
    """

    _progress_desc = "sft"
    _progress_keys = ("train/loss", "eval/loss")
    _eval_log_key = "eval/loss"
    _items_name, _item_name = "examples", "example"
    _checkpoint_name = "policy"
    _export_prefix = "policy."  # `module` holds the policy under this name

    def __init__(
        self,
        config: SFTConfig,
        policy,
        train_data: Sequence[Any],
        *,
        eval_data: Sequence[Any] | None = None,
        tokenizer=None,
        pad_token_id: int | None = None,
    ):
        self._start(config, train_data, eval_data, tokenizer)
        self.policy = self._take_model(load_policy(policy), pad_token_id)
        if config.residual_dropout is not None:
            set_residual_dropout(self.policy.hf_model, config.residual_dropout)
        self.block_size = config.block_size or max(
            len(example.input_ids if hasattr(example, "input_ids") else example["input_ids"])
            for example in self.train_data
        )
        check_token_ids(
            self.policy.hf_model, (_ids_of(example) for example in self.train_data + self.eval_data)
        )

        self.module = PolicyLogprobs(self.policy)
        self._set_up_training(self.module, exported=self.policy)

    # ------------------------------------------------------------------------------------------ batches
    def _micro_batches(self, examples: list) -> list[dict[str, torch.Tensor]]:
        """Collated (or packed) micro-batches of this rank's examples, on the CPU."""
        from rlhf_fast.data import collate_sft, pack_sft

        if not examples:
            return []
        if self.config.pack:
            packed = pack_sft(examples, self.block_size, self.pad_token_id)
            rows = packed["input_ids"].shape[0]
            size = self.config.micro_batch_size or rows
            return [
                {key: value[start : start + size] for key, value in packed.items()}
                for start in range(0, rows, size)
            ]
        size = self.config.micro_batch_size or len(examples)
        return [
            collate_sft(examples[start : start + size], self.pad_token_id)
            for start in range(0, len(examples), size)
        ]

    def compute_loss(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of response-token NLL, number of response tokens) of one micro-batch, on the device."""
        device = self.ctx.device
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"][:, 1:].to(device, non_blocking=True)
        if "document_ids" in batch:
            document_ids = batch["document_ids"].to(device)
            attention = packed_causal_mask(document_ids, parameter_dtype(self.policy))
            position_ids = batch["position_ids"].to(device)
        else:
            attention, position_ids = batch["attention_mask"].to(device), None
        out = module(input_ids, attention, input_ids[:, 1:], mask=loss_mask, position_ids=position_ids)
        nll_sum = -(out.logprobs * loss_mask).sum()
        return nll_sum, loss_mask.sum()

    # ---------------------------------------------------------------------------------------- training
    def train_step(self, examples: list) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's share of a global batch; returns device-tensor metrics.

        The ops run with their value checks off (each is a host read); the token ids were checked at load."""
        with value_checks(False):
            return self._train_step(examples)

    def _train_step(self, examples: list) -> dict[str, torch.Tensor]:
        with phase("data"):
            micro_batches = self._micro_batches(examples)
            local_tokens = sum(int(batch["loss_mask"][:, 1:].sum()) for batch in micro_batches)
            global_tokens = self.ctx.all_reduce_sum(
                torch.tensor([float(local_tokens)], device=self.ctx.device)
            )
        scale = self.ctx.world_size / global_tokens.clamp(min=1.0)
        nll_total = torch.zeros((), device=self.ctx.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with gradient_sync(self.wrapped, enabled=last):
                with phase("forward"):
                    nll_sum, _ = self.compute_loss(self.wrapped, batch)
                with phase("backward"):
                    (nll_sum * scale).sum().backward()
            nll_total = nll_total + nll_sum.detach()
        with phase("optimizer"):
            loss = self.ctx.all_reduce_sum(nll_total.reshape(1)).reshape(()) / global_tokens.reshape(())
            grad_norm, bad = guarded_step(
                self.optimizer, self.parameters, loss, self.ctx, max_grad_norm=self.config.max_grad_norm
            )
        return {"loss": loss, "grad_norm": grad_norm, "skipped": bad, "tokens": global_tokens.reshape(())}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean response-token NLL over `eval_data` (NaN without eval data)."""
        if not self.eval_data:
            return float("nan")
        was_training = self.policy.training
        self.policy.eval()
        mine = rank_share(list(range(len(self.eval_data))), self.ctx)
        totals = torch.zeros(2, device=self.ctx.device)
        size = self.config.eval_batch_size
        for start in range(0, len(mine), size):
            for batch in self._micro_batches([self.eval_data[i] for i in mine[start : start + size]]):
                nll_sum, count = self.compute_loss(self.module, batch)
                totals += torch.stack([nll_sum.float(), count.float()])
        self.ctx.all_reduce_sum(totals)
        self.policy.train(was_training)
        nll, count = totals.tolist()
        return nll / max(count, 1.0)

    def _train_batch(self, batch: list[int]) -> dict[str, torch.Tensor]:
        return self.train_step([self.train_data[i] for i in rank_share(batch, self.ctx)])

    def _step_metrics(self, values: dict[str, float], common: dict[str, float]) -> dict[str, float]:
        logged = {"train/loss": values["loss"], **common}
        logged["time/tokens_per_second"] = values["tokens"] / max(logged["time/seconds"], 1e-9)
        return logged

    def _eval_metrics(self) -> dict[str, float]:
        return {"eval/loss": self.evaluate()}

    def _trained_model(self):
        return self.policy

    def _checkpointed_model(self):
        return self.module


def _ids_of(example) -> Sequence[int]:
    return example.input_ids if hasattr(example, "input_ids") else example["input_ids"]


__all__ = ["SFTConfig", "SFTTrainer"]
