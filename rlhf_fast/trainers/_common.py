"""Pieces the three trainers share: optimizer and schedule, the guarded optimizer step (a non-finite step is
skipped on the device, without reading anything back), the consecutive-bad-step counter, the data order, and
(`EpochTrainer`) the epoch / step loop of the SFT and reward trainers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from rlhf_fast.models.loading import DTYPES, LoRAConfig
from rlhf_fast.trainers.checkpoint import CheckpointManager
from rlhf_fast.trainers.distributed import DistributedContext, is_fsdp, local_tensor, wrap_model
from rlhf_fast.trainers.logging import MetricsLogger, ProgressBar, read_metrics

logger = logging.getLogger("rlhf_fast.trainers")


class NonFiniteError(RuntimeError):
    """Training met more consecutive non-finite losses / rewards than `max_bad_steps` allows."""


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_items) that depends only on (seed, epoch): resuming repeats it exactly."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def batches_of(order: Sequence[int], batch_size: int, *, drop_last: bool) -> list[list[int]]:
    batches = [list(order[start : start + batch_size]) for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def rank_share(items: Sequence[int], ctx: DistributedContext) -> list[int]:
    """This rank's contiguous share of a global batch; shares differ in size by at most one."""
    size, extra = divmod(len(items), ctx.world_size)
    start = ctx.rank * size + min(ctx.rank, extra)
    return list(items[start : start + size + (1 if ctx.rank < extra else 0)])


def make_optimizer(
    param_groups,
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW, the fused implementation where the device has one (it is also what lets a non-finite step be
    skipped on the device: the fused kernel honours `found_inf`)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups, lr=learning_rate, weight_decay=weight_decay, betas=tuple(betas), eps=eps, fused=fused
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
):
    """transformers' LR schedules: "cosine" (`get_cosine_schedule_with_warmup`, or the min-LR variant when
    `min_lr_ratio` > 0), "linear" or "constant" (each with linear warmup)."""
    import transformers

    total_steps = max(int(total_steps), 1)
    if schedule == "cosine":
        if min_lr_ratio > 0:
            return transformers.get_cosine_with_min_lr_schedule_with_warmup(
                optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio
            )
        return transformers.get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "linear":
        return transformers.get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup_steps)
    raise ValueError(f"lr_schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                params.append(parameter)
    return params


def guarded_step(
    optimizer: torch.optim.Optimizer,
    parameters: Sequence[nn.Parameter],
    loss: torch.Tensor,
    ctx: DistributedContext,
    *,
    max_grad_norm: float | None,
    extra_bad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips the gradients and steps, unless the loss or the gradient norm is not finite on some rank.

    The skip happens on the device (`found_inf` of the fused AdamW): no host synchronization. Returns
    (grad_norm, bad) as 0-dim device tensors, bad = 1.0 for a skipped step.
    """
    limit = float("inf") if max_grad_norm is None or max_grad_norm <= 0 else float(max_grad_norm)
    grad_norm = local_tensor(torch.nn.utils.clip_grad_norm_(parameters, limit))
    bad = (~torch.isfinite(loss.detach().float()) | ~torch.isfinite(grad_norm.float())).float()
    if extra_bad is not None:
        bad = torch.maximum(bad, extra_bad.float())
    bad = ctx.all_reduce_max(bad.reshape(1)).reshape(())
    optimizer.found_inf = bad.to(parameters[0].device)
    optimizer.step()
    optimizer.found_inf = None
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach(), bad


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside the block, backward passes through `module` sync gradients only if `enabled` (for gradient
    accumulation: accumulate locally, sync on the last micro-batch)."""
    if enabled:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif is_fsdp(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


class BadStepCounter:
    """Counts consecutive skipped (non-finite) steps; raises `NonFiniteError` after `max_bad_steps` of them."""

    def __init__(self, max_bad_steps: int, what: str = "step"):
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.what = what
        self.consecutive = 0
        self.total = 0

    def update(self, bad: bool, step: int, detail: str = "") -> None:
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        logger.warning(
            "non-finite loss or reward at %s %d%s: the update was skipped (%d in a row, limit %d)",
            self.what,
            step,
            f" ({detail})" if detail else "",
            self.consecutive,
            self.max_bad_steps,
        )
        if self.consecutive >= self.max_bad_steps:
            raise NonFiniteError(
                f"aborting: {self.consecutive} consecutive {self.what}s had a non-finite loss or reward "
                f"(max_bad_steps={self.max_bad_steps}); the last good checkpoint is kept. Lower the learning "
                "rate, check the data and the reward model, or raise max_bad_steps."
            )

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))


def set_residual_dropout(model: nn.Module, probability: float) -> int:
    """Sets the residual dropout of a Hugging Face transformer: the config field (`resid_pdrop`,
    `hidden_dropout`, `hidden_dropout_prob`, `residual_dropout`) and the `nn.Dropout` modules on the residual
    branches (attention output and MLP output). Returns how many dropout modules were changed."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"residual_dropout must be in [0, 1), got {probability}")
    config = getattr(model, "config", None)
    if config is not None:
        for name in ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "residual_dropout"):
            if hasattr(config, name):
                setattr(config, name, probability)
    changed = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Dropout):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if (
            "resid" in leaf
            or leaf in ("hidden_dropout", "output_dropout")
            or (parent == "mlp" and leaf == "dropout")
        ):
            module.p = probability
            changed += 1
    return changed


@dataclasses.dataclass
class RunConfig:
    """Fields every trainer shares: where the run lives, how it checkpoints and resumes, how it fails."""

    seed: int = 0
    output_dir: str = "runs/rlhf_fast"
    save_every: int = 100  # steps (PPO: iterations) between checkpoints; 0 = only at the end
    resume: bool = False  # continue from <output_dir>/checkpoints/last (or previous) if there is one
    max_bad_steps: int = 10  # consecutive non-finite steps (PPO: iterations) before aborting
    log_every: int = 1
    device: str = "auto"  # "auto": cuda:<local rank> when CUDA is available, else cpu
    fsdp: bool = False  # shard the trained models with FSDP2 (fully_shard per transformer block)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # Models' precision: "auto" = bfloat16 on CUDA, float32 on a CPU; trained weights stay float32 (autocast)
    dtype: str = "auto"
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    lora: LoRAConfig | None = None  # train LoRA adapters (peft) instead of the full weights

    def check(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


class EpochTrainer:
    """The epoch / step loop the SFT and reward trainers share: data order per epoch, resume and checkpoint,
    logging, evaluation cadence and the progress bar. A subclass sets `config`, `ctx`, `train_data`,
    `eval_data` and the class attributes below, calls `_set_up_training` with the module it trains, and
    provides the hooks (`_train_batch`, `_step_metrics`, `_eval_metrics`, `_finish`, ...)."""

    _progress_desc: str = "train"
    _progress_keys: tuple[str, ...] = ("train/loss",)
    _eval_log_key: str = "eval/loss"  # a step whose metrics hold this key is always logged
    _items_name: str = "examples"  # in the error for an epoch too small for the processes
    _item_name: str = "example"
    _checkpoint_name: str = "model"  # the model's key in the checkpoint

    # ----------------------------------------------------------------------------------------- hooks
    def _trained_model(self) -> nn.Module:
        """The model switched to training mode for the run."""
        raise NotImplementedError

    def _checkpointed_model(self) -> nn.Module:
        """The module saved in (and restored from) the checkpoint, also the optimizer's model."""
        raise NotImplementedError

    def _train_batch(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """One optimizer step on a global batch (indices into `train_data`); device-tensor metrics."""
        raise NotImplementedError

    def _step_metrics(self, values: dict[str, float], common: dict[str, float]) -> dict[str, float]:
        """The logged metrics of a step: the trainer's own values around the `common` ones."""
        raise NotImplementedError

    def _eval_metrics(self) -> dict[str, float]:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _finish(self, log, last: dict[str, float]) -> None:
        """After the last step: the final checkpoint and the exported model."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- set-up
    def _set_up_training(self, module: nn.Module) -> None:
        """Wraps `module` for the processes (DDP / FSDP) and builds what trains it: optimizer, LR schedule
        over `total_steps`, checkpoint manager and bad-step counter. Needs `config`, `ctx` and `train_data`."""
        config = self.config
        self.wrapped = wrap_model(module, self.ctx, fsdp=config.fsdp)
        self.parameters = trainable_parameters(module)
        self.optimizer = make_optimizer(
            self.parameters,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=config.adam_betas,
            eps=config.adam_eps,
            device=self.ctx.device,
        )
        self.steps_per_epoch = len(self._epoch_batches(0))
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = make_scheduler(
            self.optimizer,
            schedule=config.lr_schedule,
            warmup_steps=config.warmup,
            total_steps=self.total_steps,
            min_lr_ratio=config.min_lr_ratio,
        )
        self.checkpoints = CheckpointManager(config.output_dir, self.ctx)
        self.bad_steps = BadStepCounter(config.max_bad_steps)
        self.global_step = 0

    # ------------------------------------------------------------------------------------------ batches
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (item indices) of one epoch; a last batch with fewer items than processes is
        dropped, so that every rank has work."""
        batches = batches_of(
            epoch_order(len(self.train_data), self.config.seed, epoch),
            self.config.batch_size,
            drop_last=False,
        )
        if batches and len(batches[-1]) < self.ctx.world_size:
            batches.pop()
        if not batches:
            raise ValueError(
                f"{len(self.train_data)} {self._items_name} cannot give every one of the "
                f"{self.ctx.world_size} processes one {self._item_name}"
            )
        return batches

    # ------------------------------------------------------------------------------- save and resume
    def _save(self, epoch: int, step_in_epoch: int) -> None:
        state = {
            "step": self.global_step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "bad_steps": self.bad_steps.state_dict(),
            "seed": self.config.seed,
            **self._extra_state(),
        }
        model = self._checkpointed_model()
        self.checkpoints.save(
            models={self._checkpoint_name: model},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=state,
            optimizer_model=model,
        )

    def _resume(self) -> tuple[int, int]:
        path = self.checkpoints.latest() if self.config.resume else None
        if path is None:
            return 0, 0
        model = self._checkpointed_model()
        state, _ = self.checkpoints.load(
            path,
            models={self._checkpoint_name: model},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            optimizer_model=model,
        )
        self.global_step = state["step"]
        self.bad_steps.load_state_dict(state.get("bad_steps", {}))
        self._load_extra_state(state)
        return state["epoch"], state["step_in_epoch"]

    # ---------------------------------------------------------------------------------------- training
    def train(self) -> dict[str, float]:
        """Runs (or resumes) training; returns the last logged metrics."""
        config = self.config
        start_epoch, start_step = self._resume()
        resumed = self.global_step if config.resume and self.global_step > 0 else None
        log = MetricsLogger(config.output_dir, enabled=self.ctx.is_main, resume_step=resumed)
        bar = ProgressBar(
            self.total_steps,
            initial=self.global_step,
            desc=self._progress_desc,
            keys=self._progress_keys,
            enabled=self.ctx.is_main,
        )
        self._trained_model().train()
        last: dict[str, float] = {}
        try:
            for epoch in range(start_epoch, config.epochs):
                batches = self._epoch_batches(epoch)
                for step_in_epoch in range(start_step if epoch == start_epoch else 0, len(batches)):
                    if self.global_step >= self.total_steps:
                        break
                    started = time.perf_counter()
                    metrics = self._train_batch(batches[step_in_epoch])
                    lr = self.scheduler.get_last_lr()[0]
                    self.scheduler.step()
                    self.global_step += 1
                    values = read_metrics(metrics)
                    self.bad_steps.update(values["skipped"] > 0, self.global_step)
                    epoch_done = step_in_epoch == len(batches) - 1
                    logged = self._step_metrics(
                        values,
                        {
                            "train/lr": lr,
                            "train/grad_norm": values["grad_norm"],
                            "train/skipped": values["skipped"],
                            "train/epoch": epoch + (step_in_epoch + 1) / len(batches),
                            "time/seconds": time.perf_counter() - started,
                        },
                    )
                    if self.eval_data and (
                        (config.eval_every and self.global_step % config.eval_every == 0)
                        or (not config.eval_every and epoch_done)
                        or self.global_step == self.total_steps
                    ):
                        logged.update(self._eval_metrics())
                    if self.global_step % config.log_every == 0 or self._eval_log_key in logged:
                        log.log(self.global_step, logged)
                    bar.update(logged)
                    last = logged
                    # No checkpoint during a run of skipped steps: the last one before it stays the newest.
                    due = config.save_every and self.global_step % config.save_every == 0
                    if due and self.bad_steps.consecutive == 0:
                        next_epoch, next_step = (epoch + 1, 0) if epoch_done else (epoch, step_in_epoch + 1)
                        self._save(next_epoch, next_step)
            self._finish(log, last)
        finally:
            bar.close()
            log.close()
        return last
