"""The stage graph: jobs run after the jobs they read, side by side in worker processes where they can, with
the thread counts of the graph; a failing job stops the run with its error and its log."""

import os
import time

import pytest

from rlhf_fast.pipeline import get_preset
from rlhf_fast.pipeline.demo import demo_jobs, trained_models
from rlhf_fast.pipeline.parallel import Job, concurrency, in_order, plan_threads, remaining, run_jobs

DIAMOND = [Job("a"), Job("b", ("a",)), Job("c", ("a",)), Job("d", ("b", "c"))]


def test_jobs_run_after_what_they_read_in_the_given_order_where_it_allows():
    assert [job.name for job in in_order(DIAMOND)] == ["a", "b", "c", "d"]
    assert [job.name for job in in_order([Job("d", ("b",)), Job("b"), Job("c")])] == ["b", "d", "c"]
    with pytest.raises(ValueError, match="cycle"):
        in_order([Job("a", ("b",)), Job("b", ("a",))])
    with pytest.raises(ValueError, match="unknown job"):
        in_order([Job("a", ("z",))])
    with pytest.raises(ValueError, match="unique"):
        in_order([Job("a"), Job("a")])
    # What is left once some jobs finished: the rest, after the unfinished jobs they read.
    assert remaining(DIAMOND, {"a", "c"}) == [Job("b"), Job("d", ("b",))]


def test_a_job_that_nothing_can_run_beside_gets_every_core():
    assert concurrency(DIAMOND) == {"a": 1, "b": 2, "c": 2, "d": 1}
    assert plan_threads(DIAMOND, cores=2, workers=2) == {"a": 2, "b": 1, "c": 1, "d": 2}
    assert plan_threads(DIAMOND, cores=8, workers=2) == {"a": 8, "b": 4, "c": 4, "d": 8}
    assert plan_threads(DIAMOND, cores=2, workers=1) == {"a": 2, "b": 2, "c": 2, "d": 2}
    # The quick demo on two cores: the sizes' pretraining and SFT, the reward model's own backbone (the small
    # base model pretrained further, then SFT) and the samples the RM learns from side by side, the RM alone,
    # PPO side by side.
    preset = get_preset("quick")
    assert preset.rm_pretrain_steps > 0
    jobs = demo_jobs(preset)
    sampling = {"rm_samples-tiny", "rm_samples-small"}
    backbone = {"rm_base-small", "rm_sft-small"}
    assert {job.name for job in jobs} == set(trained_models(preset)) | sampling | backbone | {"rm"}
    after = {job.name: job.after for job in jobs}
    assert after["rm"] == ("rm_sft-small", "rm_samples-small", "rm_samples-tiny")
    assert after["rm_base-small"] == ("base-small",) and after["rm_sft-small"] == ("rm_base-small",)
    threads = plan_threads(jobs, cores=2, workers=2)
    assert threads.pop("rm") == 2 and set(threads.values()) == {1}
    assert concurrency(jobs)["ppo-small"] == 5 and concurrency(jobs)["base-tiny"] == 6
    # Without (rm_pretrain_steps=0), the RM reads the largest policy's SFT model.
    jobs = demo_jobs(preset.replace(rm_pretrain_steps=0))
    assert {job.name for job in jobs} == set(trained_models(preset)) | sampling | {"rm"}
    assert {job.name: job.after for job in jobs}["rm"] == ("sft-small", "rm_samples-small", "rm_samples-tiny")
    threads = plan_threads(jobs, cores=2, workers=2)
    assert threads.pop("rm") == 2 and set(threads.values()) == {1}
    assert concurrency(jobs)["base-tiny"] == 4

# Module level: worker processes import these by name.
def open_context(tag, *, console):
    console(f"worker {os.getpid()} opened {tag}")
    return {"tag": tag, "console": console}


def sleep_job(context, name):
    started = time.time()
    print(f"stdout of {name}", flush=True)
    time.sleep(0.5)
    context["console"](f"[{name}] done")
    return {"name": name, "pid": os.getpid(), "span": (started, time.time()), "tag": context["tag"]}


def failing_job(context, name):
    if name == "b":
        print("about to fail", flush=True)
        raise ValueError(f"job {name} failed on purpose")
    return sleep_job(context, name)


def dying_job(context, name):
    if name == "c":
        os._exit(3)
    return sleep_job(context, name)


def run_diamond_in_two_workers(job, log_dir, lines, results=None):
    run_jobs(
        DIAMOND,
        job,
        None,
        2,
        open_context=open_context,
        open_args=("ctx",),
        log_dir=log_dir,
        console=lines.append,
        on_done=None if results is None else results.__setitem__,
    )


def test_independent_jobs_run_side_by_side_in_worker_processes(tmp_path):
    results, lines = {}, []
    run_diamond_in_two_workers(sleep_job, tmp_path, lines, results)
    assert set(results) == {"a", "b", "c", "d"} and {r["tag"] for r in results.values()} == {"ctx"}
    assert os.getpid() not in {r["pid"] for r in results.values()}
    span = {name: r["span"] for name, r in results.items()}
    assert span["a"][1] <= min(span["b"][0], span["c"][0]) and max(span["b"][1], span["c"][1]) <= span["d"][0]
    assert span["b"][0] < span["c"][1] and span["c"][0] < span["b"][1]  # b and c overlap
    assert sum(line.startswith("worker ") for line in lines) == 2
    assert sorted(line for line in lines if line.endswith("done")) == [f"[{n}] done" for n in "abcd"]
    assert (tmp_path / "c.log").read_text() == "stdout of c\n"


def test_one_worker_runs_the_jobs_here_in_order():
    seen = []
    run_jobs(DIAMOND, lambda context, name: seen.append((context, name)), "here", 1)
    assert seen == [("here", name) for name in "abcd"]


def test_a_failing_job_stops_the_run_with_its_error_and_names_its_log(tmp_path):
    lines = []
    with pytest.raises(ValueError, match="job b failed on purpose"):
        run_diamond_in_two_workers(failing_job, tmp_path, lines)
    assert f"[b] failed; its log: {tmp_path / 'b.log'}" in lines
    assert "about to fail" in (tmp_path / "b.log").read_text()
    assert not (tmp_path / "d.log").exists()  # nothing after the failed job started


def test_a_job_whose_process_dies_stops_the_run(tmp_path):
    lines = []
    with pytest.raises(RuntimeError, match="the process of stage c died \\(exit code 3\\)"):
        run_diamond_in_two_workers(dying_job, tmp_path, lines)
    assert f"[c] failed; its log: {tmp_path / 'c.log'}" in lines
