"""The K-wise reward model (InstructGPT §3.5, "RM").

A batch element is one prompt with its K ranked completions (K varies, 2..16). Each completion is encoded once
and, with `share_prompt` (the default) where it is the cheaper layout, so is the prompt: one row per prompt
holds the prompt and its K completions, each completion seeing only the prompt and itself
(`collate_rankings_shared_prompt`), which scores as K rows of prompt + completion would (`collate_rankings`)
with the prompt's tokens computed once instead of K times. The fused `ranking_loss` takes all C(K, 2)
comparisons of a prompt as one element: no completion is re-encoded per pair. After training the score is
shifted so that a reference set (the labelers' demonstrations) scores 0 on average
(`RewardModel.set_normalization`), and that offset is saved with the model.

Distributed: each rank takes a contiguous share of the prompts of every global batch; the loss is rescaled to
the global mean over prompts (and accuracy to the global pair count), so N processes match one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from rlhf_fast.models.loading import check_token_ids, load_reward_model
from rlhf_fast.models.masks import parameter_dtype, reads_prepared_masks
from rlhf_fast.trainers._common import EpochTrainer, gradient_sync, guarded_step, rank_share
from rlhf_fast.trainers.phases import phase
from rlhf_fast.trainers.run_config import RunConfig, check_epoch_settings


@dataclasses.dataclass
class RewardConfig(RunConfig):
    """Reward-model hyperparameters; defaults follow InstructGPT (1 epoch, cosine schedule, lr 9e-6)."""

    learning_rate: float = 9e-6
    batch_size: int = 64  # prompts (each with all its K completions) per optimizer step, over all processes
    micro_batch_size: int | None = None  # prompts per forward on one process; None = all
    epochs: int = 1
    max_steps: int | None = None
    warmup: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    margin: float | None = None  # a fixed margin every preferred completion must win by
    # One row per prompt, its K completions after it (the prompt's tokens computed once, not K times), for
    # each micro-batch where that is the cheaper layout (`rlhf_fast.data.prompt_sharing_pays`); needs an
    # attention implementation that reads a prepared 4-D mask ("eager", "sdpa"), else rows of prompt +
    # completion are used.
    share_prompt: bool = True
    eval_every: int = 0  # steps between validations; 0 = at the end of each epoch
    eval_batch_size: int = 32  # prompts
    normalize: bool = True  # shift scores so the reference set has mean 0 after training
    output_dir: str = "runs/rm"

    def check(self) -> None:
        super().check()
        check_epoch_settings(self)


def _field(item: Any, name: str):
    return item[name] if isinstance(item, dict) else getattr(item, name)


def _pair_counts(items: Sequence[Any]) -> tuple[int, int]:
    """(prompts with at least one untied pair, untied pairs) of a list of rankings."""
    prompts, pairs = 0, 0
    for item in items:
        ranks = list(_field(item, "ranks"))
        untied = sum(1 for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] != ranks[j])
        prompts += untied > 0
        pairs += untied
    return prompts, pairs


class RewardTrainer(EpochTrainer):
    """Trains a reward model on K-wise rankings.

    Args:
        config: `RewardConfig`.
        model: a `RewardModel`, or the SFT model to initialize one from (`PolicyModel`, transformers causal
            LM, or a directory): its backbone is copied and a fresh scalar head added.
        train_data / eval_data: encoded rankings (`encode_rankings(...)` items: `prompt_ids`,
            `completion_ids`, `ranks`).
        normalization_data: the reference set whose mean score becomes 0: SFT examples (`input_ids`) or token
            id sequences, e.g. the encoded demonstrations.
        tokenizer: saved with the final model; its pad id is used unless `pad_token_id` is given.
    """

    _progress_desc = "rm"
    _progress_keys = ("train/loss", "train/accuracy", "eval/accuracy")
    _eval_log_key = "eval/accuracy"
    _items_name, _item_name = "rankings", "prompt"
    _checkpoint_name = "reward_model"

    def __init__(
        self,
        config: RewardConfig,
        model,
        train_data: Sequence[Any],
        *,
        eval_data: Sequence[Any] | None = None,
        normalization_data: Sequence[Any] | None = None,
        tokenizer=None,
        pad_token_id: int | None = None,
    ):
        self._start(config, train_data, eval_data, tokenizer)
        self.normalization_data = list(normalization_data) if normalization_data is not None else []
        self.model = self._take_model(load_reward_model(model), pad_token_id)
        check_token_ids(self.model.backbone, _ranking_ids(self.train_data + self.eval_data))
        self._share_prompt = config.share_prompt and reads_prepared_masks(self.model.backbone)
        self._hidden_size = self.model.backbone.get_input_embeddings().embedding_dim
        self._set_up_training(self.model, exported=self.model)

    # ------------------------------------------------------------------------------------------ compute
    def compute_loss(self, model, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of a micro-batch of rankings: `ranking_loss` over the model's ΣK scores."""
        from rlhf_fast.data import collate_rankings, collate_rankings_shared_prompt, prompt_sharing_pays
        from rlhf_fast.models.masks import shared_prefix_causal_mask
        from rlhf_fast.ops import ranking_loss

        device = self.ctx.device
        with phase("data"):
            if self._share_prompt and prompt_sharing_pays(items, self._hidden_size):  # prompt once, then K
                batch = collate_rankings_shared_prompt(items, self.pad_token_id)
                segment_ids = batch["segment_ids"].to(device, non_blocking=True)
                mask = shared_prefix_causal_mask(segment_ids, parameter_dtype(self.model))
                readout = {
                    "position_ids": batch["position_ids"].to(device, non_blocking=True),
                    "last_index": batch["last_token_index"].to(device, non_blocking=True),
                    "score_rows": batch["score_rows"].to(device, non_blocking=True),
                }
            else:  # one row per completion: prompt + completion
                batch = collate_rankings(items, self.pad_token_id)
                mask, readout = batch["attention_mask"].to(device, non_blocking=True), {}
        with phase("forward"):
            scores = model(batch["input_ids"].to(device, non_blocking=True), mask, **readout)
            return ranking_loss(
                scores, batch["group_sizes"], batch["ranks"].to(device), margin=self.config.margin
            )

    def _micro_batches(self, items: list) -> list[list]:
        size = self.config.micro_batch_size or max(len(items), 1)
        return [items[start : start + size] for start in range(0, len(items), size)]

    def train_step(self, items: list, global_items: list) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's prompts; the loss is scaled to the global mean over prompts.

        The ops run with their value checks off (each is a host read): the rankings were validated when encoded
        and their token ids at load; a non-finite loss skips the step on the device."""
        from rlhf_fast.ops import value_checks

        with value_checks(False):
            return self._train_step(items, global_items)

    def _train_step(self, items: list, global_items: list) -> dict[str, torch.Tensor]:
        global_prompts, global_pairs = _pair_counts(global_items)
        micro_batches = self._micro_batches(items)
        loss_total = torch.zeros((), device=self.ctx.device)
        correct_total = torch.zeros((), device=self.ctx.device)
        for index, micro in enumerate(micro_batches):
            prompts, pairs = _pair_counts(micro)
            with gradient_sync(self.wrapped, enabled=index == len(micro_batches) - 1):
                loss, accuracy = self.compute_loss(self.wrapped, micro)
                share = prompts / max(global_prompts, 1)
                with phase("backward"):
                    (loss * (share * self.ctx.world_size)).backward()
            loss_total = loss_total + loss.detach().float() * share
            correct_total = correct_total + accuracy.detach().float() * pairs
        with phase("optimizer"):
            totals = self.ctx.all_reduce_sum(torch.stack([loss_total, correct_total]))
            loss = totals[0]
            grad_norm, bad = guarded_step(
                self.optimizer, self.parameters, loss, self.ctx, max_grad_norm=self.config.max_grad_norm
            )
        return {
            "loss": loss,
            "accuracy": totals[1] / max(global_pairs, 1),
            "grad_norm": grad_norm,
            "skipped": bad,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and pairwise accuracy over `eval_data` (empty dict without eval data)."""
        if not self.eval_data:
            return {}
        was_training = self.model.training
        self.model.eval()
        total_prompts, total_pairs = _pair_counts(self.eval_data)
        mine = [self.eval_data[i] for i in rank_share(list(range(len(self.eval_data))), self.ctx)]
        totals = torch.zeros(2, device=self.ctx.device)
        for start in range(0, len(mine), self.config.eval_batch_size):
            chunk = mine[start : start + self.config.eval_batch_size]
            prompts, pairs = _pair_counts(chunk)
            loss, accuracy = self.compute_loss(self.model, chunk)
            totals += torch.stack([loss.float() * prompts, accuracy.float() * pairs])
        self.ctx.all_reduce_sum(totals)
        self.model.train(was_training)
        loss_sum, correct = totals.tolist()
        return {"eval/loss": loss_sum / max(total_prompts, 1), "eval/accuracy": correct / max(total_pairs, 1)}

    @torch.no_grad()
    def normalize(self, reference: Sequence[Any] | None = None, batch_size: int = 64) -> float:
        """Sets the model's offset so that `reference` (default: `normalization_data`) scores mean 0; returns
        the offset. Items are SFT examples (`input_ids`) or token id sequences."""
        from rlhf_fast.data import pad_rows

        reference = list(reference) if reference is not None else self.normalization_data
        if not reference:
            raise ValueError("normalize needs a reference set: pass normalization_data= or reference=")
        was_training = self.model.training
        self.model.eval()
        self.model.set_normalization(0.0)
        mine = [reference[i] for i in rank_share(list(range(len(reference))), self.ctx)]
        totals = torch.zeros(2, device=self.ctx.device, dtype=torch.float64)
        for start in range(0, len(mine), batch_size):
            rows = [
                list(getattr(item, "input_ids", item) if not isinstance(item, dict) else item["input_ids"])
                for item in mine[start : start + batch_size]
            ]
            input_ids, attention_mask = pad_rows(rows, self.pad_token_id)
            scores = self.model(input_ids.to(self.ctx.device), attention_mask.to(self.ctx.device))
            totals += torch.stack(
                [
                    scores.double().sum(),
                    torch.tensor(float(len(rows)), device=self.ctx.device, dtype=torch.float64),
                ]
            )
        self.ctx.all_reduce_sum(totals)
        self.model.train(was_training)
        score_sum, count = totals.tolist()
        bias = -score_sum / count
        self.model.set_normalization(bias)
        return bias

    # ---------------------------------------------------------------------------------------- training
    def _train_batch(self, batch: list[int]) -> dict[str, torch.Tensor]:
        global_items = [self.train_data[i] for i in batch]
        mine = [self.train_data[i] for i in rank_share(batch, self.ctx)]
        return self.train_step(mine, global_items)

    def _step_metrics(self, values: dict[str, float], common: dict[str, float]) -> dict[str, float]:
        return {"train/loss": values["loss"], "train/accuracy": values["accuracy"], **common}

    def _eval_metrics(self) -> dict[str, float]:
        return self.evaluate()

    def _trained_model(self):
        return self.model

    def _checkpointed_model(self):
        return self.model

    def _run_state(self) -> dict:
        return {"normalization_bias": self.model.normalization_bias}

    def _load_run_state(self, state: dict) -> None:
        self.model.set_normalization(state.get("normalization_bias", 0.0))

    def _before_final_checkpoint(self, log) -> dict[str, float]:
        """Normalizes the scores (when asked), logged with the last step."""
        if not (self.config.normalize and self.normalization_data):
            return {}
        bias = self.normalize()
        log.log(self.global_step, {"normalization/bias": bias})
        return {"normalization/bias": bias}


def _ranking_ids(items):
    """The token id sequences of rankings (``EncodedRanking`` or mappings: prompt and completions)."""
    for item in items:
        field = item.__getitem__ if isinstance(item, dict) else lambda name, item=item: getattr(item, name)
        yield list(field("prompt_ids"))
        for completion in field("completion_ids"):
            yield list(completion)


__all__ = ["RewardConfig", "RewardTrainer"]
