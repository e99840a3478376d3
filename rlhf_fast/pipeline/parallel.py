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

import multiprocessing
import os
import pickle
import queue
import sys
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


def remaining(jobs: Sequence[Job], finished: set[str]) -> list[Job]:
    """The jobs not `finished`, each to run after the unfinished ones among its `after`."""
    return [
        Job(job.name, tuple(name for name in job.after if name not in finished))
        for job in jobs
        if job.name not in finished
    ]


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
    each job. A job's exception, or its process's death, stops the others and is raised here."""
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
    pool = _Workers(min(workers, len(ordered)), open_context, open_args)
    pending, done = list(ordered), set()
    try:
        while pending or pool.running:
            for job in [job for job in pending if set(job.after) <= done][: pool.idle]:
                pending.remove(job)
                pool.submit(run_job, job.name, log_dir / f"{job.name}.log")
            event = pool.next_event(poll_seconds)
            if event is None:
                continue
            kind, name, value = event
            if kind == "line":
                console(value)
                continue
            if kind == "failed":
                console(f"[{name}] failed; its log: {log_dir / f'{name}.log'}")
                raise value
            done.add(name)
            if on_done is not None:
                on_done(name, value)
    finally:
        pool.stop()  # a failed or interrupted run stops every stage still running


class _Workers:
    """Spawned processes that each open the context once and then run the jobs sent to them, one at a time.
    Each has a task queue of its own, so a process that dies is known by the job it was running; all of them
    send their console lines and results through one queue, so a job's lines arrive before its result."""

    def __init__(self, count: int, open_context: Callable[..., Any], open_args: tuple):
        spawn = multiprocessing.get_context("spawn")
        self._events = spawn.Queue()
        self._tasks = [spawn.SimpleQueue() for _ in range(count)]
        self._processes = [
            spawn.Process(
                target=_worker_main,
                args=(index, tasks, self._events, open_context, open_args),
                daemon=True,
            )
            for index, tasks in enumerate(self._tasks)
        ]
        for process in self._processes:
            process.start()
        self._job_of: dict[int, str] = {}  # worker index -> the job it runs

    @property
    def running(self) -> int:
        return len(self._job_of)

    @property
    def idle(self) -> int:
        return len(self._processes) - len(self._job_of)

    def submit(self, run_job: Callable[[Any, str], Any], name: str, log: Path) -> None:
        index = next(i for i in range(len(self._processes)) if i not in self._job_of)
        self._job_of[index] = name
        self._tasks[index].put((run_job, name, log))

    def next_event(self, seconds: float) -> tuple[str, str, Any] | None:
        """The next ("line", job, text), ("done", job, result) or ("failed", job, exception), or None after
        `seconds` without one."""
        try:
            index, kind, value = self._events.get(timeout=seconds)
        except queue.Empty:
            for index, name in self._job_of.items():
                process = self._processes[index]
                if not process.is_alive():
                    error = RuntimeError(f"the process of stage {name} died (exit code {process.exitcode})")
                    return "failed", name, error
            return None
        name = self._job_of.get(index, "") if kind == "line" else self._job_of.pop(index)
        return kind, name, value

    def stop(self) -> None:
        for index, process in enumerate(self._processes):
            if index in self._job_of:
                process.terminate()  # still running a job: it will not be needed
            elif process.is_alive():
                self._tasks[index].put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def _worker_main(index: int, tasks, events, open_context: Callable[..., Any], open_args: tuple) -> None:
    def console(line: str) -> None:
        events.put((index, "line", line))

    try:
        context, opening_error = open_context(*open_args, console=console), None
    except BaseException as error:  # reported as the failure of the job it is given
        context, opening_error = None, error
    while (task := tasks.get()) is not None:
        run_job, name, log = task
        try:
            if opening_error is not None:
                raise opening_error
            events.put((index, "done", _run_logged(run_job, context, name, log)))
        except BaseException as error:
            events.put((index, "failed", _picklable(error)))


def _run_logged(run_job: Callable[[Any, str], Any], context: Any, name: str, log: Path) -> Any:
    """Runs one job with this process's stdout and stderr (Python's and the C library's) in `log`; an
    exception's traceback lands there too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w", encoding="utf-8") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            return run_job(context, name)
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


def _picklable(error: BaseException) -> BaseException:
    """`error`, or a RuntimeError with its text where it cannot cross to the caller's process."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
