"""Runs the demo's stages as a graph: each after the stages whose models it reads, up to `workers` at once.

A small model's training step gains little from a second intra-op thread (the demo's: 1.0x for the tiny
model, 1.3x for the small one, 2 cores), while two one-thread processes each run at full speed. So stages that
do not depend on each other (the two sizes' pretraining, the PPO runs) run side by side, one process each, and
a stage that no other can run beside (the reward model, between SFT and PPO) gets every core:
`plan_threads`. One worker runs the stages one after another in this process.

The thread counts follow from the graph and the core count alone, not from which stage happens to finish
first, so a run's numbers do not depend on the order the stages ran in: a stage rounds the same way in a
worker process as in this one. Workers are spawned (a fresh interpreter: OpenMP and torch start clean) and build
what they share with the caller once (`open_context`); their progress bars and warnings go to a log file per
stage, their console lines to the caller's console. The first stage that fails stops the others.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Job:
    """One stage: `name` (its output directory) runs after every job in `after`."""

    name: str
    after: tuple[str, ...] = ()


def in_order(jobs: Sequence[Job]) -> list[Job]:
    """`jobs` in an order that runs every job after its `after` (the given order wherever it allows)."""
    by_name = {job.name: job for job in jobs}
    if len(by_name) != len(jobs):
        raise ValueError(f"job names must be unique, got {[job.name for job in jobs]}")
    for job in jobs:
        unknown = [name for name in job.after if name not in by_name]
        if unknown:
            raise ValueError(f"job {job.name!r} runs after unknown job(s) {unknown}")
    ordered: list[Job] = []
    placed: set[str] = set()
    while len(ordered) < len(jobs):
        ready = [job for job in jobs if job.name not in placed and set(job.after) <= placed]
        if not ready:
            raise ValueError(f"jobs depend on each other in a cycle: {sorted(set(by_name) - placed)}")
        ordered.append(ready[0])
        placed.add(ready[0].name)
    return ordered


def _ancestors(jobs: Sequence[Job]) -> dict[str, set[str]]:
    by_name = {job.name: job for job in jobs}
    found: dict[str, set[str]] = {}
    for job in in_order(jobs):
        found[job.name] = set(job.after).union(*(found[name] for name in job.after))
    return {name: found[name] for name in by_name}


def concurrency(jobs: Sequence[Job]) -> dict[str, int]:
    """For each job, how many jobs could run at the same time as it, itself included: those that are neither
    its ancestors nor its descendants."""
    ancestors = _ancestors(jobs)

    def related(a: str, b: str) -> bool:
        return a in ancestors[b] or b in ancestors[a]

    return {job.name: sum(not related(job.name, other.name) for other in jobs) for job in jobs}


def plan_threads(jobs: Sequence[Job], cores: int, workers: int) -> dict[str, int]:
    """Intra-op threads per job: the cores shared among the jobs that may run beside it (at most
    `workers`)."""
    width = concurrency(jobs)
    return {job.name: max(1, cores // min(max(1, workers), width[job.name])) for job in jobs}


def run_jobs(
    jobs: Sequence[Job],
    run_job: Callable[[Any, str], Any],
    context: Any,
    workers: int,
    *,
    open_context: Callable[..., Any] | None = None,
    open_args: tuple = (),
    log_dir: Path | None = None,
    console: Callable[[str], None] = print,
    on_done: Callable[[str, Any], None] | None = None,
    poll_seconds: float = 0.2,
) -> None:
    """Runs `run_job(context, job.name)` for every job, each after its `after`, at most `workers` at once.

    With one worker the jobs run here, in `in_order`, on `context`. With more, each runs in a spawned worker
    process on the context `open_context(*open_args, console=...)` built once per worker (its console lines
    reach `console`); `run_job` and `open_context` must be module-level functions, their arguments and results
    picklable. A job's stdout and stderr go to `log_dir/<name>.log`. `on_done(name, result)` runs here after
    each job. A job's exception stops the others and is raised here."""
    ordered = in_order(jobs)
    if workers <= 1:
        for job in ordered:
            result = run_job(context, job.name)
            if on_done is not None:
                on_done(job.name, result)
        return
    if open_context is None or log_dir is None:
        raise ValueError("run_jobs with more than one worker needs open_context and log_dir")
    log_dir.mkdir(parents=True, exist_ok=True)
    spawn = multiprocessing.get_context("spawn")
    lines = spawn.Queue()

    def drain() -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                console(lines.get_nowait())

    pending, running, done = list(ordered), {}, set()
    pool = spawn.Pool(workers, initializer=_open_worker, initargs=(lines, open_context, open_args))
    try:
        while pending or running:
            for job in [job for job in pending if set(job.after) <= done][: workers - len(running)]:
                pending.remove(job)
                log = log_dir / f"{job.name}.log"
                running[job.name] = pool.apply_async(_run_in_worker, (run_job, job.name, log))
            time.sleep(poll_seconds)
            drain()
            for name, result in list(running.items()):
                if not result.ready():
                    continue
                del running[name]
                try:
                    value = result.get()
                except BaseException:
                    drain()
                    console(f"[{name}] failed; its log: {log_dir / f'{name}.log'}")
                    raise
                done.add(name)
                if on_done is not None:
                    on_done(name, value)
        pool.close()
        pool.join()
        drain()
    finally:
        pool.terminate()  # a failed or interrupted run stops every stage still running


_WORKER: dict[str, Any] = {}


def _open_worker(lines, open_context: Callable[..., Any], open_args: tuple) -> None:
    _WORKER["context"] = open_context(*open_args, console=lines.put)


def _run_in_worker(run_job: Callable[[Any, str], Any], name: str, log: Path) -> Any:
    """Runs one job with this process's stdout and stderr (Python's and the C library's) in `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w", encoding="utf-8") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            return run_job(_WORKER["context"], name)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
