"""Where the time of one training step goes: `rlhf-fast profile ppo | sft | rm`.

`profile_trainer(trainer, command)` runs a built trainer's steps the way its `train()` loop does (PPO: one
`iteration()` per prompt batch; SFT / RM: one optimizer step per batch) under a `PhaseTimer`
(rlhf_fast.trainers.phases): `warmup` steps first (lazy initialization, CUDA-graph capture, autotuning), then
`iterations` measured ones. It reports

- wall time per phase (PPO: rollout, score/<model>, rewards_gae, update; SFT / RM: data, forward, backward,
  optimizer), "other" being the rest of the measured step time, so the phases add up to it. A phase the
  trainer does not mark is part of "other". On CUDA each phase edge synchronizes, so queued GPU work is
  charged to the phase that queued it;
- tokens per second (PPO: generated response tokens, as the trainer logs them; SFT / RM: the tokens of the
  batch's sequences, before padding);
- peak memory over the measured steps: CUDA max allocated, or on a CPU the process's resident high-water mark
  (VmHWM, reset before the measured steps where the kernel allows it);
- on CUDA, the host synchronizations of one more step, run with `torch.cuda.set_sync_debug_mode("warn")` and no
  phase recorder (the recorder's own syncs are not the trainer's);
- PPO: the rollout / training log-prob mismatch, the trainer's `rollout/logprob_mismatch` metric when it logs
  one, else measured once here: the log-probs the sampler returned against the policy's own recomputation of
  the same tokens (mean and max |difference| over the response tokens);
- with `trace`, a torch.profiler trace (Chrome / Perfetto JSON) of one more step, the phases as named ranges.

Nothing is written outside `trace` (the trainer's output directory is the caller's business).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from rlhf_fast.bench.timing import device_name, process_peak_rss_bytes, reset_peak_rss, synchronize
from rlhf_fast.trainers.logging import read_metrics
from rlhf_fast.trainers.phases import PhaseTimer, recording

PHASES = {
    "ppo": (
        "rollout",
        "score",
        "score/reference",
        "score/policy",
        "score/value",
        "score/reward",
        "rewards_gae",
        "update",
    ),
    "sft": ("data", "forward", "backward", "optimizer"),
    "rm": ("data", "forward", "backward", "optimizer"),
}
MISMATCH_METRIC = "rollout/logprob_mismatch"
OTHER = "other"


@dataclasses.dataclass
class ProfileReport:
    command: str
    device: str
    device_type: str
    warmup: int
    iterations: int
    step_seconds: list[float]  # each measured step, wall clock
    phase_seconds: dict[str, float]  # mean per step: the top-level phases in order, then "other"
    nested_seconds: dict[str, float]  # mean per step: phases nested in another (shown under their parent)
    tokens_per_step: float
    tokens_per_second: float
    token_kind: str
    peak_memory_bytes: int | None
    peak_memory_kind: str
    host_syncs_per_step: float | None
    logprob_mismatch: dict[str, float] | None
    logprob_mismatch_source: str | None
    trace: str | None = None

    @property
    def mean_step_seconds(self) -> float:
        return statistics.fmean(self.step_seconds)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean_step_seconds"] = self.mean_step_seconds
        return data


# ------------------------------------------------------------------------------------------------ steps


class _PPOSteps:
    """One PPO iteration as `PPOTrainer.train` runs it: the prompt batch, `iteration()`, one host read."""

    token_kind = "generated response tokens"

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self) -> tuple[dict[str, float], float]:
        trainer = self.trainer
        prompts = trainer.prompt_batch(trainer.iteration_index)
        metrics = trainer.iteration(prompts["prompt_ids"], prompts["prompt_mask"], trainer.pretrain_batches())
        values = read_metrics(metrics)
        trainer.scheduler.step()
        trainer.iteration_index += 1
        return values, values.get("train/response_tokens", 0.0)


class _EpochSteps:
    """One optimizer step of the SFT / reward trainer, as `EpochTrainer.train` runs it, cycling through the
    batches of successive epochs."""

    token_kind = "sequence tokens (unpadded)"

    def __init__(self, trainer):
        self.trainer = trainer
        self.epoch, self.batches = -1, []
        trainer._trained_model().train()

    def __call__(self) -> tuple[dict[str, float], float]:
        trainer = self.trainer
        if not self.batches:
            self.epoch += 1
            self.batches = list(trainer._epoch_batches(self.epoch))
        batch = self.batches.pop(0)
        values = read_metrics(trainer._train_batch(batch))
        trainer.scheduler.step()
        trainer.global_step += 1
        return values, float(sum(_sequence_tokens(trainer.train_data[index]) for index in batch))


def _sequence_tokens(item) -> int:
    if hasattr(item, "completion_ids"):  # a ranking: K sequences of prompt + completion
        return sum(len(item.prompt_ids) + len(completion) for completion in item.completion_ids)
    ids = item["input_ids"] if isinstance(item, dict) else item.input_ids
    return len(ids)


# -------------------------------------------------------------------------------------------- measuring


def _device(trainer) -> torch.device:
    return trainer.ctx.device


def _timed_steps(step: Callable, device: torch.device, count: int, timer: PhaseTimer | None):
    seconds, tokens, metrics = [], 0.0, []
    with recording(timer) if timer is not None else contextlib.nullcontext():
        for _ in range(count):
            synchronize(device)
            started = time.perf_counter()
            values, step_tokens = step()
            synchronize(device)
            seconds.append(time.perf_counter() - started)
            tokens += step_tokens
            metrics.append(values)
    return seconds, tokens, metrics


def _host_syncs(step: Callable, device: torch.device) -> int:
    """Synchronizing CUDA calls made by one step (sync debug mode "warn", no recorder installed)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing" in str(warning.message) for warning in caught)


def _split_phases(timer: PhaseTimer, command: str, steps: int, step_seconds: float):
    top = timer.top_level()
    order = [name for name in PHASES[command] if name in top] + sorted(set(top) - set(PHASES[command]))
    phases = {name: top[name] / steps for name in order}
    nested = {name: seconds / steps for name, seconds in timer.seconds.items() if name not in top}
    phases[OTHER] = step_seconds - sum(phases.values())
    return phases, nested


def recompute_logprob_mismatch(trainer) -> dict[str, float]:
    """Samples one prompt batch with the trainer's policy, asking the sampler for its log-probs, and compares
    them with the policy's recomputation of the same tokens (the scoring pass of an iteration)."""
    from rlhf_fast.rollout import sample

    cfg, device = trainer.config, _device(trainer)
    prompts = trainer.prompt_batch(trainer.iteration_index)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad():
        out = sample(trainer.policy, prompts["prompt_ids"], prompts["prompt_mask"], cfg.max_new_tokens,
                     temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                     eos_token_id=trainer.eos_token_id, pad_token_id=trainer.pad_token_id, generator=generator,
                     return_logprobs=True, use_cuda_graph=cfg.sample_cuda_graph)  # fmt: skip
        attention_mask = torch.cat([prompts["prompt_mask"].bool(), out.response_mask], dim=1)
        recomputed = trainer.policy_module(out.sequences, attention_mask, out.response_ids,
                                           mask=out.response_mask, temperature=cfg.temperature).logprobs  # fmt: skip
    difference = (out.logprobs.float() - recomputed.float()).abs()[out.response_mask]
    if difference.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0}
    return {"mean_abs": difference.mean().item(), "max_abs": difference.max().item()}


def _export_trace(step: Callable, device: torch.device, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as profiler:
        with recording(PhaseTimer(device, trace=True)):
            step()
        synchronize(device)
    profiler.export_chrome_trace(str(path))


def profile_trainer(
    trainer, command: str, *, iterations: int = 3, warmup: int = 1, trace: str | None = None
) -> ProfileReport:
    """Profiles `iterations` steps of a built trainer after `warmup` unmeasured ones (see the module doc)."""
    if command not in PHASES:
        raise ValueError(f"command must be one of {', '.join(PHASES)}, got {command!r}")
    if iterations < 1 or warmup < 0:
        raise ValueError(f"iterations must be >= 1 and warmup >= 0, got {iterations}, {warmup}")
    device = _device(trainer)
    step = _PPOSteps(trainer) if command == "ppo" else _EpochSteps(trainer)
    _timed_steps(step, device, warmup, None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        memory_kind = "CUDA max allocated"
    else:
        memory_kind = "process VmHWM" + (
            "" if reset_peak_rss() else " (since start: the kernel refused a reset)"
        )
    timer = PhaseTimer(device)
    seconds, tokens, metrics = _timed_steps(step, device, iterations, timer)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else process_peak_rss_bytes()

    syncs = _host_syncs(step, device) if device.type == "cuda" else None
    mismatch, source = None, None
    if command == "ppo":
        logged = [values[MISMATCH_METRIC] for values in metrics if MISMATCH_METRIC in values]
        if logged:
            mismatch, source = {"mean": statistics.fmean(logged)}, f"the trainer's {MISMATCH_METRIC} metric"
        else:
            mismatch, source = recompute_logprob_mismatch(trainer), "recomputed once by the profiler"
    if trace is not None:
        _export_trace(step, device, trace)

    mean_step = statistics.fmean(seconds)
    phases, nested = _split_phases(timer, command, iterations, mean_step)
    return ProfileReport(
        command=command,
        device=device_name(device),
        device_type=device.type,
        warmup=warmup,
        iterations=iterations,
        step_seconds=seconds,
        phase_seconds=phases,
        nested_seconds=nested,
        tokens_per_step=tokens / iterations,
        tokens_per_second=tokens / max(sum(seconds), 1e-12),
        token_kind=step.token_kind,
        peak_memory_bytes=peak,
        peak_memory_kind=memory_kind,
        host_syncs_per_step=syncs,
        logprob_mismatch=mismatch,
        logprob_mismatch_source=source,
        trace=str(trace) if trace is not None else None,
    )


# --------------------------------------------------------------------------------------------- printing


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f} ms"


def format_report(report: ProfileReport) -> list[str]:
    step_name = "iteration" if report.command == "ppo" else "step"
    mean = report.mean_step_seconds
    times = sorted(report.step_seconds)
    lines = [
        (
            f"profile {report.command} on {report.device} [{report.device_type}]: {report.iterations} "
            f"measured {step_name}s after {report.warmup} warm-up"
        ),
        (
            f"  {step_name} time: mean {mean * 1e3:.1f} ms, min {times[0] * 1e3:.1f} ms, "
            f"median {statistics.median(times) * 1e3:.1f} ms"
        ),
        f"  phases (mean per {step_name}; they add up to the {step_name} time):",
    ]
    for name, seconds in report.phase_seconds.items():
        share = seconds / mean * 100 if mean > 0 else 0.0
        lines.append(f"    {name:<18}{_ms(seconds)}  {share:5.1f}%")
        for nested, nested_seconds in report.nested_seconds.items():
            if nested.split("/")[0] == name:
                lines.append(f"      {nested:<16}{_ms(nested_seconds)}")
    if not any(name != OTHER for name in report.phase_seconds):
        lines.append(f"    (the trainer marks no phases here: the whole {step_name} is 'other')")
    lines.append(
        f"  throughput: {report.tokens_per_second:,.0f} tokens/s ({report.tokens_per_step:,.0f} "
        f"{report.token_kind} per {step_name})"
    )
    if report.peak_memory_bytes is not None:
        lines.append(
            f"  peak memory: {report.peak_memory_bytes / 2**20:,.1f} MiB ({report.peak_memory_kind})"
        )
    if report.host_syncs_per_step is not None:
        lines.append(
            f"  host syncs: {report.host_syncs_per_step:g} per {step_name} (torch.cuda sync debug mode)"
        )
    if report.logprob_mismatch is not None:
        values = ", ".join(f"{key} {value:.3g}" for key, value in report.logprob_mismatch.items())
        lines.append(f"  rollout/training log-prob mismatch: {values} ({report.logprob_mismatch_source})")
    if report.trace:
        lines.append(f"  trace of one {step_name}: {report.trace} (chrome://tracing or ui.perfetto.dev)")
    return lines


__all__ = ["PHASES", "ProfileReport", "format_report", "profile_trainer", "recompute_logprob_mismatch"]
