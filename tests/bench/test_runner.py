"""The packaged benchmark runner: interleaving, checks before timing, skipped contenders, the ops' cases."""

from __future__ import annotations

import json
import time

import pytest
import torch

from rlhf_fast.bench import gae as gae_bench
from rlhf_fast.bench import gelu as gelu_bench
from rlhf_fast.bench import logprob as logprob_bench
from rlhf_fast.bench import ppo_loss as ppo_bench
from rlhf_fast.bench import ranking as ranking_bench
from rlhf_fast.bench import sample_tokens as sample_tokens_bench
from rlhf_fast.bench.case import Case, Contender
from rlhf_fast.bench.runner import OPS, BenchError, format_table, parse_ops, run, run_case
from rlhf_fast.bench.timing import interleaved

CPU = torch.device("cpu")


def test_parse_ops():
    assert parse_ops(None) == list(OPS) and parse_ops("all") == list(OPS)
    assert parse_ops("gae, ranking") == ["gae", "ranking"]
    with pytest.raises(BenchError, match="unknown op 'nope'"):
        parse_ops("gae,nope")


def test_contenders_are_interleaved():
    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, rounds=3,
                          round_seconds=0.0)  # fmt: skip
    # two untimed calls each (warm-up, calibration), then one call per round, alternating
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert all(t.rounds == 3 and t.calls_per_round == 1 for t in timings.values())


def test_run_case_times_against_the_baseline_and_skips_what_fails():
    def slow():
        time.sleep(0.004)
        return 1

    def fast():
        time.sleep(0.001)
        return 1

    def missing_peer():
        raise ImportError("no peer", name="peer_library")

    case = Case(
        op="toy",
        name="toy case",
        contenders=[
            Contender("ours", fast),
            Contender("naive", slow, "baseline"),
            Contender("wrong", lambda: 2),
            Contender("peer", missing_peer, "peer"),
        ],
        check=lambda output: _equal(output, 1),
        rounds=3,
    )
    result = run_case(case, CPU)
    rows = {row["contender"]: row for row in result["rows"]}
    assert set(rows) == {"ours", "naive"}
    assert result["baseline"] == "naive" and rows["naive"]["speedup_vs_baseline"] == 1.0
    assert rows["ours"]["speedup_vs_baseline"] > 1.5  # 4 ms against 1 ms
    assert rows["ours"]["min_s"] <= rows["ours"]["median_s"]
    assert result["skipped"]["wrong"].startswith("disagrees with the reference")
    assert result["skipped"]["peer"] == "not installed (peer_library)"
    lines = format_table([result], CPU)
    assert lines[0].startswith("| case | contender | min | median |") and "floor" not in lines[0]
    assert any("naive (baseline)" in line and "1.00x" in line for line in lines)


def _equal(got, want):
    assert got == want, f"{got} != {want}"


@pytest.mark.parametrize(
    "module",
    [gae_bench, ranking_bench, ppo_bench, gelu_bench, sample_tokens_bench],
    ids=["gae", "ranking", "ppo_loss", "gelu", "sample_tokens"],
)
def test_every_cpu_case_checks_its_contenders(module):
    """Each contender agrees with the reference, and the check rejects a wrong answer (the first case of
    each op: the others differ in shape only)."""
    for case in [next(iter(module.cases(CPU)))]:
        assert any(c.role == "baseline" for c in case.contenders) and any(
            c.role == "ours" for c in case.contenders
        )
        outputs = {}
        for contender in case.contenders:
            if contender.name.startswith("rlhf_fast cpp"):
                from rlhf_fast import _extension

                if not _extension.has_cpp_kernels():
                    continue
            outputs[contender.name] = contender.call()
            case.check(outputs[contender.name])
        wrong = _perturbed(next(iter(outputs.values())))
        with pytest.raises(AssertionError):
            case.check(wrong)


def _perturbed(output):
    """The same structure with every tensor moved by 1."""
    if isinstance(output, torch.Tensor):
        return output.detach() + 1
    if isinstance(output, dict):
        return {key: _perturbed(value) for key, value in output.items()}
    return type(output)(_perturbed(value) for value in output)


def test_logprob_contenders_agree_on_a_small_shape():
    for shape in (
        logprob_bench.Shape("logits", "logits", 37, 101, backward=True),
        logprob_bench.Shape("hidden", "hidden", 37, 101, 16, backward=True),
        logprob_bench.Shape("hidden fwd", "hidden", 37, 101, 16, extras=False),
    ):
        inputs = logprob_bench.make_inputs(shape, "cpu", torch.float32)
        naive = logprob_bench.prepared_call(shape, inputs, logprob_bench.naive)
        ours = logprob_bench.prepared_call(
            shape, inputs, lambda s, i: logprob_bench.ours(s, i, backend="chunked")
        )()
        check = logprob_bench.checker(naive, low_precision=False)
        check(ours)
        with pytest.raises(AssertionError):
            check(ours + 0.1)


def test_run_gae_on_the_cpu_is_plain_data():
    lines = []
    report = run(["gae"], "cpu", rounds=2, threads=1, echo=lines.append)
    assert report["device_type"] == "cpu" and report["suite"] == "cpu"
    assert [result["case"] for result in report["results"]] == [
        "gae B=64 T=512 fp32 raw",
        "gae B=64 T=512 fp32 whiten",
    ]
    for result in report["results"]:
        names = [row["contender"] for row in result["rows"]]
        assert result["baseline"] in names and "rlhf_fast reference" in names
    json.dumps(report)  # --json writes it as is
    assert lines[0].startswith("device: ") and any(line.startswith("| gae B=64") for line in lines)


def test_gpu_suite_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchError, match="CUDA device"):
        run(["gae"], "gpu")


def test_gpu_table_has_memory_and_floor_columns():
    result = {
        "case": "c",
        "baseline": "naive",
        "floor_s": 2e-6,
        "rows": [
            {
                "contender": "ours",
                "min_s": 1e-5,
                "median_s": 2e-5,
                "speedup_vs_baseline": 5.0,
                "peak_extra_bytes": 0,
            },
            {
                "contender": "naive",
                "min_s": 9e-5,
                "median_s": 1e-4,
                "speedup_vs_baseline": 1.0,
                "peak_extra_bytes": 3 * 10**9,
            },
        ],
    }
    lines = format_table([result], torch.device("cuda"))
    assert "peak extra memory" in lines[0] and "floor (H200)" in lines[0]
    assert lines[2] == "| c | ours | 10 µs | 20 µs | 5.00x | 0.00 GB | 2 µs |"
    assert lines[3].endswith("| 3.00 GB | 2 µs |")


def test_busy_cores_runs_the_processes_for_the_block_only():
    import multiprocessing

    from rlhf_fast.bench.timing import busy_cores

    before = len(multiprocessing.active_children())
    with busy_cores(2, settle_seconds=0.0):
        assert len(multiprocessing.active_children()) == before + 2
    assert len(multiprocessing.active_children()) == before
