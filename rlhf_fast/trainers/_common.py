"""Pieces the three trainers share: optimizer and schedule, the guarded optimizer step (a non-finite step is
skipped on the device, without reading anything back), the consecutive-bad-step counter, the data order,
`RunLoop` (resume, logging, checkpoint cadence, final checkpoint and export: the one run loop of all three
trainers) and `EpochTrainer` (the epoch / batch schedule of the SFT and reward trainers). The configs'
shared fields and checks are in `rlhf_fast.trainers.run_config`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.models.loading import Precision, autocast_forward, prepare_trained, resolve_pad_token_id
from rlhf_fast.ops import set_value_checks
from rlhf_fast.trainers.checkpoint import CheckpointManager, models_finite
from rlhf_fast.trainers.distributed import (
    DistributedContext,
    init_distributed,
    is_fsdp,
    local_tensor,
    seed_everything,
    wrap_model,
)
from rlhf_fast.trainers.export import export_pretrained, meta_skeleton
from rlhf_fast.trainers.lock import lock_output_dir
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


def make_optimizer(param_groups, config, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the run's `learning_rate`, `weight_decay`, `adam_betas` and `adam_eps`: the fused
    implementation where the device has one (it is also what lets a non-finite step be skipped on the device:
    the fused kernel honours `found_inf`)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        betas=tuple(config.adam_betas),
        eps=config.adam_eps,
        fused=fused,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config, total_steps: int):
    """The run's `lr_schedule` over `total_steps` with `warmup` steps, from transformers: "cosine"
    (`get_cosine_schedule_with_warmup`, or the min-LR variant when the config's `min_lr_ratio` > 0), "linear"
    or "constant" (each with linear warmup)."""
    import transformers

    schedule, warmup_steps = config.lr_schedule, config.warmup
    min_lr_ratio = getattr(config, "min_lr_ratio", 0.0)  # the epoch trainers' option
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
    grad_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips the gradients and steps, unless the loss or the gradient norm is not finite on some rank.

    `grad_norm`: the norm the caller has computed (and clipped to) already, e.g. per model; then no norm pass
    here, and `max_grad_norm` must be None. The skip happens on the device (`found_inf` of the fused AdamW): no
    host synchronization. Returns (grad_norm, bad) as 0-dim device tensors, bad = 1.0 for a skipped step.
    """
    if grad_norm is None:
        limit = float("inf") if max_grad_norm is None or max_grad_norm <= 0 else float(max_grad_norm)
        grad_norm = local_tensor(torch.nn.utils.clip_grad_norm_(parameters, limit))
    elif max_grad_norm is not None:
        raise ValueError("pass max_grad_norm=None with a grad_norm: the caller has clipped already")
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


class RunLoop:
    """The run loop all three trainers share: resume from the newest usable checkpoint, one step at a time
    (metrics read back once per step), the consecutive-bad-step counter, logging, the checkpoint cadence, and
    at the end the final checkpoint and the exported model.

    A subclass sets `config`, `ctx`, `optimizer`, `scheduler`, `checkpoints` (CheckpointManager),
    `bad_steps` (BadStepCounter), `global_step` and `total_steps`, and provides the hooks below.

    Resume is exact, log included: the checkpoint records how many lines `metrics.jsonl` held when it was
    written, and a resumed run cuts the file back to them. A run whose final checkpoint was written (then
    killed during the export, say) resumes straight to the export. Weights that are not finite at the end
    are neither checkpointed nor exported (`NonFiniteError`, the last good checkpoint stays).
    """

    _progress_desc: str = "train"
    _progress_keys: tuple[str, ...] = ()
    _step_name: str = "step"

    # ----------------------------------------------------------------------------------------- hooks
    def _checkpoint_models(self) -> dict[str, nn.Module]:
        """{file stem: module} saved in (and restored from) each checkpoint."""
        raise NotImplementedError

    def _optimizer_model(self) -> nn.Module:
        """A module holding every parameter the optimizer updates (gathers FSDP2 optimizer state)."""
        raise NotImplementedError

    def _generators(self) -> dict[str, torch.Generator]:
        return {}

    def _run_state(self) -> dict:
        """The trainer's own resumable state (plain JSON data) beside the step."""
        return {}

    def _load_run_state(self, state: dict) -> None:
        pass

    def _before_first_step(self) -> None:
        pass

    def _run_step(self, index: int) -> dict[str, torch.Tensor]:
        """Step `index` (0-based): one optimizer step (PPO: iteration); metrics as device tensors."""
        raise NotImplementedError

    def _step_problem(self, values: dict[str, float]) -> tuple[bool, str]:
        """(whether the step was skipped as non-finite, a detail for the warning)."""
        return values["skipped"] > 0, ""

    def _step_record(self, values: dict[str, float], lr: float, seconds: float) -> dict[str, float]:
        """The metrics logged for the step just run (`global_step` already counts it)."""
        raise NotImplementedError

    def _always_log(self, record: dict[str, float]) -> bool:
        return False

    def _before_final_checkpoint(self, log: MetricsLogger) -> dict[str, float]:
        """Work after the last step that the final checkpoint includes; returns metrics it logged."""
        return {}

    def _export(self) -> None:
        """Writes the trained model to `<output_dir>/final`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- save and resume
    def _save(self, *, finished: bool = False) -> None:
        log = getattr(self, "_log", None)
        if log is not None:
            log.sync()  # the log lines the checkpoint counts are on disk before it is
        state = {
            "step": self.global_step,
            "bad_steps": self.bad_steps.state_dict(),
            "seed": self.config.seed,
            "log_lines": log.lines if log is not None else 0,
            "finished": finished,
            **self._run_state(),
        }
        self.checkpoints.save(
            models=self._checkpoint_models(),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=state,
            generators=self._generators(),
            optimizer_model=self._optimizer_model(),
        )

    def _resume(self) -> dict | None:
        """Restores the newest usable checkpoint when resuming; its trainer state, or None (fresh start)."""
        if not self.config.resume:
            return None
        models = self._checkpoint_models()
        data = self.checkpoints.read_latest(list(models))
        if data is None:
            return None
        state, _ = self.checkpoints.apply(
            data,
            models=models,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            generators=self._generators(),
            optimizer_model=self._optimizer_model(),
        )
        self.global_step = int(state["step"])
        self.bad_steps.load_state_dict(state.get("bad_steps", {}))
        self._load_run_state(state)
        return state

    # ---------------------------------------------------------------------------------------- training
    def train(self) -> dict[str, float]:
        """Runs (or resumes) training, holding the output directory's lock; returns the last logged
        metrics. `resumed_step` is the step it continued from (0: a fresh start)."""
        # Value checks off: each is a host sync, and a non-finite loss is the guarded step's to skip and count.
        checks = set_value_checks(False)
        try:
            if not self.ctx.is_main:
                return self._train()
            with lock_output_dir(self.config.output_dir):
                return self._train()
        finally:
            set_value_checks(checks)

    def _train(self) -> dict[str, float]:
        config = self.config
        state = self._resume()
        self.resumed_step = int(state["step"]) if state else 0
        finished = bool(state and state.get("finished"))
        self._log = log = MetricsLogger(
            config.output_dir,
            enabled=self.ctx.is_main,
            keep_lines=int(state.get("log_lines", 0)) if state else None,
        )
        bar = ProgressBar(
            self.total_steps,
            initial=self.global_step,
            desc=self._progress_desc,
            keys=self._progress_keys,
            enabled=self.ctx.is_main,
        )
        self._before_first_step()
        last: dict[str, float] = {}
        try:
            while self.global_step < self.total_steps:
                finished = False
                started = time.perf_counter()
                metrics = self._run_step(self.global_step)
                values = read_metrics(metrics)  # the one host read of the step
                seconds = time.perf_counter() - started
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                self.global_step += 1
                bad, detail = self._step_problem(values)
                self.bad_steps.update(bad, self.global_step, detail)
                record = self._step_record(values, lr, seconds)
                if self.global_step % config.log_every == 0 or self._always_log(record):
                    log.log(self.global_step, record)
                bar.update(record)
                last = record
                # No checkpoint during a run of skipped steps: the last one before it stays the newest. The
                # last step's is the final checkpoint, written after the end-of-run work.
                due = config.save_every and self.global_step % config.save_every == 0
                if due and self.bad_steps.consecutive == 0 and self.global_step < self.total_steps:
                    self._save()
            if not models_finite(self._checkpoint_models(), self.ctx):
                raise NonFiniteError(
                    f"the weights are not finite after {self._step_name} {self.global_step}: nothing was "
                    f"exported; the last good checkpoint in {self.checkpoints.root} is kept. Lower the "
                    "learning rate or check the data and the reward model."
                )
            if not finished:
                last.update(self._before_final_checkpoint(log))
                self._save(finished=True)
            self._export()
        finally:
            bar.close()
            log.close()
            self._log = None
        return last


class EpochTrainer(RunLoop):
    """The epoch / step schedule the SFT and reward trainers share: data order per epoch (step i of the run
    is batch i mod steps_per_epoch of epoch i div steps_per_epoch), evaluation cadence and step metrics. A
    subclass calls `_start` (config, process group, seeds, data, tokenizer, precision), `_take_model` with
    the model it loaded, sets the class attributes below, calls `_set_up_training` with the module it trains,
    and provides the hooks (`_train_batch`, `_step_metrics`, `_eval_metrics`, `_export`, ...)."""

    _progress_keys = ("train/loss",)
    _eval_log_key: str = "eval/loss"  # a step whose metrics hold this key is always logged
    _items_name: str = "examples"  # in the error for an epoch too small for the processes
    _item_name: str = "example"
    _checkpoint_name: str = "model"  # the model's key in the checkpoint
    _export_prefix: str = ""  # the trained model's key prefix inside the checkpointed module

    def _start(self, config, train_data: Sequence, eval_data: Sequence | None, tokenizer) -> None:
        """The checked config, the process group and seeds, the data as lists, the tokenizer and the precision."""
        config.check()
        if len(train_data) == 0:
            raise ValueError("train_data is empty")
        self.config = config
        self.ctx = init_distributed(config.device)
        seed_everything(config.seed + self.ctx.rank)
        self.train_data = list(train_data)
        self.eval_data = list(eval_data) if eval_data is not None else []
        self.tokenizer = tokenizer
        self.precision = Precision.from_config(config, self.ctx.device)

    # ----------------------------------------------------------------------------------------- hooks
    def _trained_model(self) -> nn.Module:
        """The model switched to training mode for the run."""
        raise NotImplementedError

    def _checkpointed_model(self) -> nn.Module:
        """The module saved in (and restored from) the checkpoint, also the optimizer's model."""
        raise NotImplementedError

    def _export(self) -> None:
        """The trained model to `<output_dir>/final` (under FSDP2 gathered from the checkpointed module)."""
        export_pretrained(
            self._trained_model(),
            Path(self.config.output_dir) / "final",
            self.ctx,
            tokenizer=self.tokenizer,
            skeleton=self._skeleton,
            prefix=self._export_prefix,
            state_source=self._checkpointed_model(),
        )

    def _train_batch(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """One optimizer step on a global batch (indices into `train_data`); device-tensor metrics."""
        raise NotImplementedError

    def _step_metrics(self, values: dict[str, float], common: dict[str, float]) -> dict[str, float]:
        """The logged metrics of a step: the trainer's own values around the `common` ones."""
        raise NotImplementedError

    def _eval_metrics(self) -> dict[str, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- set-up
    def _take_model(self, model: nn.Module, pad_token_id: int | None) -> nn.Module:
        """`model` made ready to train in the run's precision (`prepare_trained`: dtype, activation
        checkpointing, LoRA), with the run's pad id resolved from the argument, the tokenizer or its config."""
        model = prepare_trained(model, self.precision)
        self.pad_token_id = resolve_pad_token_id(pad_token_id, self.tokenizer, model.config)
        return model

    def _set_up_training(self, module: nn.Module, exported: nn.Module) -> None:
        """Runs `module`'s forward under the run's autocast, wraps it for the processes (DDP / FSDP) and builds
        what trains it: optimizer, LR schedule over `total_steps`, checkpoint manager and bad-step counter;
        under FSDP, the meta skeleton of `exported` (the model written at export). Needs `config`, `ctx` and
        `train_data`."""
        config = self.config
        self._skeleton = meta_skeleton(exported) if config.fsdp and self.ctx.is_distributed else None
        autocast_forward(module, self.ctx.device.type, self.precision.dtype)
        self.wrapped = wrap_model(module, self.ctx, fsdp=config.fsdp)
        self.parameters = trainable_parameters(module)
        self.optimizer = make_optimizer(self.parameters, config, self.ctx.device)
        self._batches = (-1, [])
        self.steps_per_epoch = len(self._epoch_batches(0))
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = make_scheduler(self.optimizer, config, self.total_steps)
        self.checkpoints = CheckpointManager(config.output_dir, self.ctx)
        self.bad_steps = BadStepCounter(config.max_bad_steps)
        self.global_step = 0

    # ------------------------------------------------------------------------------------------ batches
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (item indices) of one epoch; a last batch with fewer items than processes is
        dropped, so that every rank has work."""
        if self._batches[0] == epoch:
            return self._batches[1]
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
        self._batches = (epoch, batches)
        return batches

    # ------------------------------------------------------------------------------------ loop hooks
    def _checkpoint_models(self) -> dict[str, nn.Module]:
        return {self._checkpoint_name: self._checkpointed_model()}

    def _optimizer_model(self) -> nn.Module:
        return self._checkpointed_model()

    def _before_first_step(self) -> None:
        self._trained_model().train()

    def _run_step(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, self.steps_per_epoch)
        return self._train_batch(self._epoch_batches(epoch)[position])

    def _step_record(self, values: dict[str, float], lr: float, seconds: float) -> dict[str, float]:
        epoch, position = divmod(self.global_step - 1, self.steps_per_epoch)
        record = self._step_metrics(
            values,
            {
                "train/lr": lr,
                "train/grad_norm": values["grad_norm"],
                "train/skipped": values["skipped"],
                "train/epoch": epoch + (position + 1) / self.steps_per_epoch,
                "time/seconds": seconds,
            },
        )
        epoch_done = position == self.steps_per_epoch - 1
        every = self.config.eval_every
        if self.eval_data and (
            (every and self.global_step % every == 0)
            or (not every and epoch_done)
            or self.global_step == self.total_steps
        ):
            record.update(self._eval_metrics())
        return record

    def _always_log(self, record: dict[str, float]) -> bool:
        return self._eval_log_key in record
