"""What the three training commands share: the `Job` (paths, tokenizer, data, config), fitting the data to
the length limits, the dry run and its memory plan, starting a run (output directory, resume, lock) and
training it to a summary. `rlhf_fast.cli.train` holds the per-command runners built from these."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf_fast.cli.common import (
    CLIError,
    DataOptions,
    Dataset,
    check_output_dir,
    describe_dataset,
    encode_dataset,
    format_metrics,
    note,
    one_line,
    output_lines,
    read_dataset,
    resume_checkpoint,
    say,
)

# Runs a built trainer instead of training it (`rlhf-fast profile`): (job, trainer) -> exit status.
Execute = Callable[["Job", Any], int]


@dataclasses.dataclass
class Job:
    """A validated training command, ready to load weights."""

    command: str  # "sft" | "rm" | "ppo"
    config: Any  # the trainer config with its `data` section
    out: Path
    datasets: list[Dataset]
    plan: Callable[[], int]  # the number of steps (PPO: iterations) to run, once the data is encoded
    step_name: str = "steps"
    notes: list[str] = dataclasses.field(default_factory=list)
    resumed_from: int = 0  # the step of the checkpoint --resume continues from
    # The memory plan at a batch (rows per forward; PPO: batch_size), the configured batch, the batch step and
    # its name; set by each command, evaluated once the data is encoded.
    memory: Callable[[], tuple[Callable[[int], Any], int, int, str]] | None = None


# ------------------------------------------------------------------------------------------------- helpers


def output_dir(args) -> Path:
    if args.dry_run:
        return Path(args.out)
    return check_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)


def resume_from(args) -> Path | None:
    return Path(args.out) / "config.yaml" if args.resume else None


def length_limit(requested: int | None, positions: int | None, model_flag: str, what: str) -> int:
    """`requested` (data.max_length), checked against the model's positions; the model's limit by default."""
    if requested is None:
        if positions is None:
            raise CLIError(
                f"{model_flag}: the model's config does not say how many positions it covers; "
                "pass --max-length"
            )
        return positions
    if positions is not None and requested > positions:
        raise CLIError(
            f"--max-length {requested}: longer than the {positions} positions the model covers ({what})"
        )
    return requested


def read_all(specs: Sequence[tuple[str, str, str | None]], tokenizer, options: DataOptions) -> list[Dataset]:
    """Reads each (flag, kind, path) given; prints the skipped-record counts at the start."""
    datasets = []
    for flag, kind, path in specs:
        if path is None:
            continue
        dataset = read_dataset(flag, kind, path, tokenizer, options.on_bad_record, options.max_record_bytes)
        if dataset.loaded.num_skipped:
            note(f"{flag} {dataset.read_summary()}")
        datasets.append(dataset)
    return datasets


def epoch_steps(num_items: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    total = epochs * math.ceil(num_items / batch_size)
    return min(total, max_steps) if max_steps is not None else total


def prepare_data(job: Job, args, tokenizer, truncation: str, limits: dict[str, int]) -> int | None:
    """Fits every file to its limit and plans the run; with --dry-run, prints the statistics first and
    returns the exit status."""
    if not args.dry_run:
        _encode_all(job, tokenizer, truncation, limits)
        job.plan()  # fails now, not after the weights are loaded, if the data cannot fill a batch
        return None
    return _dry_run(job, tokenizer, truncation, limits, getattr(args, "device_memory", None))


def _dry_run(
    job: Job, tokenizer, truncation: str, limits: dict[str, int], device_gib: float | None = None
) -> int:
    """Prints each file's statistics, then fits the data to the limits exactly as training would."""
    from rlhf_fast.config import config_to_dict

    for dataset in job.datasets:
        say(describe_dataset(dataset, tokenizer, limits[dataset.flag], truncation), "")
    for dataset in job.datasets:  # raises the DataError a real run would
        encode_dataset(dataset, tokenizer, limits[dataset.flag], truncation)
    steps = job.plan()
    fitted = [line for line in (d.fit_summary() for d in job.datasets) if line]
    lines = [f"dry run: the data is valid; {job.command} would run {steps} {job.step_name}"]
    lines += [f"  {line}" for line in fitted]
    lines += [f"  {line}" for line in job.notes]
    data = config_to_dict(job.config)["data"]
    lines.append(
        "  length limits: "
        + ", ".join(
            f"{flag} {limit} tokens"
            for flag, limit in limits.items()
            if any(d.flag == flag for d in job.datasets)
        )
    )
    lines.append("  data options: " + ", ".join(f"{key}={value}" for key, value in data.items()))
    if job.memory is not None:
        lines += _memory_lines(job, device_gib)
    lines.append("  no weights were loaded; run without --dry-run to train")
    say(*lines)
    return 0


def _memory_lines(job: Job, device_gib: float | None) -> list[str]:
    """The memory plan of the configured batch and, given the device memory, the largest batch that fits."""
    from rlhf_fast.trainers.memory import largest_fitting, verdict

    plan_at, batch, step, what = job.memory()
    try:
        plan = plan_at(batch)
    except ImportError as error:  # lora without peft
        raise CLIError(f"config: {error}") from None
    device = None if device_gib is None else device_gib * 1024**3
    largest = largest_fitting(plan_at, device, step=step) if device is not None else None
    return ["", *plan.lines(), *verdict(plan, device, largest, what)]


def _plan_setting(config, args):
    """Where the plan runs: `device` of the config ("auto": cuda if this machine has it) on --processes."""
    import os

    import torch

    from rlhf_fast.trainers.memory import Setting

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
    return Setting.from_config(config, torch.device(device).type, world)


def _model_config(flag: str, model_dir: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001 (a config that does not load: say so, plan nothing)
        raise CLIError(
            f"{flag} {model_dir}: cannot read its config.json for the memory plan ({error})"
        ) from None


def _encode_all(job: Job, tokenizer, truncation: str, limits: dict[str, int]) -> None:
    for dataset in job.datasets:
        encode_dataset(dataset, tokenizer, limits[dataset.flag], truncation)
        fitted = dataset.fit_summary()
        if fitted:
            note(f"{dataset.flag} {fitted}")


def holding_resources(run: Callable[..., int]) -> Callable[..., int]:
    """Runs a command with `args.resources`, an ExitStack closed when it returns (the output lock)."""

    @functools.wraps(run)
    def wrapper(args, *rest, **options) -> int:
        with contextlib.ExitStack() as resources:
            args.resources = resources
            resources.enter_context(_trainer_warnings_as_notes())
            return run(args, *rest, **options)

    return wrapper


@contextlib.contextmanager
def _trainer_warnings_as_notes():
    """The trainers' warnings (a skipped non-finite step, a damaged checkpoint passed over) as `note:` lines
    on stderr, like the command's own."""
    import logging

    class Notes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            note(one_line(record.getMessage()))

    handler = Notes(logging.WARNING)
    trainer_logger = logging.getLogger("rlhf_fast.trainers")
    trainer_logger.addHandler(handler)
    try:
        yield
    finally:
        trainer_logger.removeHandler(handler)


def start_run(job: Job, args) -> None:
    """Before the weights load: takes the output directory (created, locked for the command's lifetime),
    checks what --resume will continue from, seeds every RNG (the fresh reward head is drawn next) and
    writes the resolved config."""
    from rlhf_fast.config import dump_config
    from rlhf_fast.trainers.checkpoint import checkpoint_step
    from rlhf_fast.trainers.distributed import seed_everything
    from rlhf_fast.trainers.lock import OutputLocked, lock_output_dir

    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 holds the lock for the run
        try:
            args.resources.enter_context(lock_output_dir(job.out))
        except OutputLocked as error:
            raise CLIError(f"--out {error}") from None
        except OSError as error:
            raise CLIError(f"--out {job.out}: cannot write there ({error.strerror or error})") from None
    if args.overwrite and not args.resume and (job.out / "checkpoints").is_dir():
        # Starting over: the earlier run's checkpoints must not be resumed later under this run's config.
        shutil.rmtree(job.out / "checkpoints")
        note(f"--overwrite: removed the earlier run's checkpoints in {job.out / 'checkpoints'}")
    if args.resume:
        checkpoint = resume_checkpoint(job.out)
        if checkpoint is None:
            note(f"--resume: no checkpoint in {job.out / 'checkpoints'}; starting from the beginning")
        else:
            job.resumed_from = checkpoint_step(checkpoint)
    seed_everything(job.config.seed + int(os.environ.get("RANK", "0")))
    dump_config(job.config, job.out / "config.yaml")


def build_trainer(make: Callable[[], Any]):
    """The trainer; its argument checks (ValueError) are user errors about the config or data."""
    try:
        return make()
    except (ValueError, ImportError) as error:  # ImportError: an optional extra the config asks for (lora)
        raise CLIError(f"config: {error}") from None


def run_training(job: Job, trainer) -> tuple[dict[str, float], int, float]:
    """Runs the trainer; returns (last metrics, the step it resumed at, seconds)."""
    from rlhf_fast.trainers._common import NonFiniteError
    from rlhf_fast.trainers.checkpoint import CheckpointError

    started = time.perf_counter()
    try:
        metrics = trainer.train()
    except NonFiniteError as error:
        raise TrainingAborted(str(error)) from None
    except CheckpointError as error:
        raise CLIError(f"--resume: {error}") from None
    return metrics, trainer.resumed_step, time.perf_counter() - started


class TrainingAborted(Exception):
    """Training stopped on its own safety check (e.g. too many non-finite steps): exit status 1."""


def training_summary(
    job: Job,
    metrics: dict[str, float],
    steps: int,
    resumed_from: int,
    seconds: float,
    outputs: list[tuple[str, str, str]],
) -> None:
    ran = steps - resumed_from
    head = f"{job.command} done: {steps} {job.step_name}"
    if resumed_from:
        head += f" ({ran} after resuming at {resumed_from})"
    lines = [f"{head} in {seconds:.1f} s"]
    key = [name for name in KEY_METRICS[job.command] if name in metrics]
    if metrics.get("train/skipped"):
        key.append("train/skipped")
    shown = format_metrics({name: metrics[name] for name in key} if key else metrics)
    lines.append("  final metrics: " + (", ".join(shown) if shown else "(no new step ran)"))
    for dataset in job.datasets:
        lines.append(f"  data {dataset.flag} {dataset.read_summary()}")
        fitted = dataset.fit_summary()
        if fitted:
            lines.append(f"       {fitted}")
    lines += [f"  {line}" for line in job.notes]
    lines.append(f"  outputs in {job.out}:")
    lines += output_lines(outputs)
    say(*lines)


# The metrics the summary shows (all of them are in metrics.jsonl).
KEY_METRICS = {
    "sft": ("train/loss", "eval/loss", "train/lr"),
    "rm": ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "normalization/bias"),
    "ppo": (
        "objective/scores",
        "objective/kl",
        "objective/rlhf_reward",
        "loss/policy",
        "loss/value",
        "loss/ptx",
        "policy/approx_kl",
        "policy/clipfrac",
        "policy/entropy",
        "episode/length",
        "episode/eos_fraction",
    ),
}


def common_outputs(out: Path) -> list[tuple[str, str, str]]:
    return [
        ("metrics", str(out / "metrics.jsonl"), "one JSON object per logged step"),
        ("config", str(out / "config.yaml"), "the resolved config; reuse it with --config"),
        ("checkpoint", str(out / "checkpoints" / "last"), "--resume continues from it"),
    ]


def epoch_memory(config, args, flag: str, model_dir: str, length: int, head: str, what: str, per_item: int):
    """SFT / RM: the plan at `rows` sequences per forward on one process (micro_batch_size, or the batch
    shared by the processes; an RM prompt brings `per_item` completions)."""
    from rlhf_fast.trainers.memory import plan_epoch_step

    model_config = _model_config(flag, model_dir)
    setting = _plan_setting(config, args)
    items = config.micro_batch_size or -(-config.batch_size // setting.world_size)

    def plan_at(rows: int):
        return plan_epoch_step(model_config, rows, length, setting, head=head, what=what)

    return (
        plan_at,
        items * per_item,
        per_item,
        "sequences per forward (micro_batch_size × completions)" if per_item > 1 else "micro_batch_size",
    )


def ppo_memory(config, args, policy_dir: str, reward_dir: str, prompt_length: int):
    from rlhf_fast.trainers.memory import plan_ppo

    policy_config = _model_config("--policy", policy_dir)
    reward_config = _model_config("--reward", reward_dir)
    setting = _plan_setting(config, args)

    def plan_at(batch: int):
        return plan_ppo(
            policy_config,
            reward_config,
            dataclasses.replace(config, batch_size=batch),
            prompt_length,
            setting,
        )

    return (
        plan_at,
        config.batch_size,
        config.num_minibatches * setting.world_size,
        "batch_size (prompts per iteration)",
    )
