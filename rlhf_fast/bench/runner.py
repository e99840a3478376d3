"""Runs the packaged op benchmarks and prints one markdown table per op (the rows start with `|`).

    python -m rlhf_fast.bench [--suite cpu|gpu] [--ops gae,ranking,ppo_loss,logprob] [--json FILE]

Each case times rlhf_fast against its baseline (naive torch always; Liger-Kernel and Cut Cross-Entropy where
importable) in the same run, interleaved A B A B, and reports min and median per call, the speed-up of the
median over the baseline's, and on a GPU the floor and the peak extra memory of one call. A contender whose
output disagrees with the reference, or that this installation cannot run, is listed as skipped with the
reason, and the others are timed. Needs neither pytest nor the source tree.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from rlhf_fast.bench.case import Case, Contender
from rlhf_fast.bench.timing import (
    FLOOR_MACHINE,
    device_name,
    graph_replay,
    interleaved,
    peak_extra_bytes,
    synchronize,
)

OPS = {
    "gae": "rlhf_fast.bench.gae",
    "ranking": "rlhf_fast.bench.ranking",
    "ppo_loss": "rlhf_fast.bench.ppo_loss",
    "logprob": "rlhf_fast.bench.logprob",
    "gelu": "rlhf_fast.bench.gelu",
    "sample_tokens": "rlhf_fast.bench.sample_tokens",
}
SUITES = ("cpu", "gpu")


class BenchError(Exception):
    """The benchmarks cannot run as asked (unknown op, no CUDA device for the GPU suite)."""


def parse_ops(text: str | None) -> list[str]:
    """`"gae,ranking"` -> ["gae", "ranking"]; None or "all" -> every op."""
    if text is None or text.strip() in ("", "all"):
        return list(OPS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise BenchError(f"--ops: unknown op {', '.join(map(repr, unknown))}; choose from {', '.join(OPS)}")
    return names


def suite_device(suite: str) -> torch.device:
    if suite not in SUITES:
        raise BenchError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    if suite == "gpu":
        if not torch.cuda.is_available():
            raise BenchError("the gpu suite needs a CUDA device, and torch sees none here")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def op_cases(op: str, device: torch.device) -> Iterator[Case]:
    return importlib.import_module(OPS[op]).cases(device)


# ---------------------------------------------------------------------------------------------- one case


def _first_output(contender: Contender, case: Case) -> str | None:
    """Runs the contender once and checks its output; returns why it must be skipped, or None."""
    try:
        output = contender.call()
        if case.check is not None and contender.checked:
            case.check(output)
    except ImportError as error:
        return f"not installed ({error.name or error})"
    except AssertionError as error:
        return "disagrees with the reference: " + " ".join(str(error).split())[:160]
    except Exception as error:  # noqa: BLE001 (a backend this installation lacks, a peer that fails: report it)
        return f"{type(error).__name__}: " + " ".join(str(error).split())[:160]
    return None


def run_case(case: Case, device: torch.device, *, rounds: int | None = None) -> dict:
    """Checks, then times every contender of `case` interleaved; returns the result as plain data."""
    runnable: list[Contender] = []
    for contender in case.contenders:
        reason = _first_output(contender, case)
        if reason is not None:
            case.skipped[contender.name] = reason
            continue
        runnable.append(contender)
        if contender.graph and device.type == "cuda":
            try:
                runnable.append(
                    Contender(f"{contender.name}, CUDA-graph replay", graph_replay(contender.call, device))
                )
            except Exception as error:  # noqa: BLE001 (capture unsupported for this call)
                case.skipped[f"{contender.name}, CUDA-graph replay"] = (
                    f"capture failed: {type(error).__name__}"
                )
        synchronize(device)
    timings = interleaved({c.name: c.call for c in runnable}, device, rounds=rounds or case.rounds)
    baseline = next((c.name for c in runnable if c.role == "baseline"), None)
    rows = []
    for contender in runnable:
        timing = timings[contender.name]
        speedup = timings[baseline].median_s / timing.median_s if baseline else None
        rows.append(
            {
                "contender": contender.name,
                "role": contender.role,
                "min_s": timing.min_s,
                "median_s": timing.median_s,
                "speedup_vs_baseline": speedup,
                "peak_extra_bytes": peak_extra_bytes(contender.call, device),
                "calls_per_round": timing.calls_per_round,
            }
        )
    return {
        "op": case.op,
        "case": case.name,
        "baseline": baseline,
        "rounds": rounds or case.rounds,
        "floor_s": case.floor_s,
        "floor_basis": case.floor_basis if case.floor_s is not None else None,
        "rows": rows,
        "skipped": dict(case.skipped),
    }


# ------------------------------------------------------------------------------------------------ output


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_table(results: Sequence[dict], device: torch.device) -> list[str]:
    gpu = device.type == "cuda"
    header = "| case | contender | min | median | speed-up vs baseline (median) |"
    rule = "|---|---|---|---|---|"
    if gpu:
        header += f" peak extra memory | floor ({FLOOR_MACHINE}) |"
        rule += "---|---|"
    lines = [header, rule]
    for result in results:
        for row in result["rows"]:
            speedup = row["speedup_vs_baseline"]
            marker = " (baseline)" if row["contender"] == result["baseline"] else ""
            line = (
                f"| {result['case']} | {row['contender']}{marker} | {format_seconds(row['min_s'])} | "
                f"{format_seconds(row['median_s'])} | {'n/a' if speedup is None else f'{speedup:.2f}x'} |"
            )
            if gpu:
                memory = row["peak_extra_bytes"]
                line += f" {'n/a' if memory is None else f'{memory / 1e9:.2f} GB'} | {format_seconds(result['floor_s'])} |"
            lines.append(line)
    return lines


def skipped_lines(results: Sequence[dict]) -> list[str]:
    return [
        f"  skipped in {result['case']}: {name}: {reason}"
        for result in results
        for name, reason in result["skipped"].items()
    ]


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(
    ops: Sequence[str],
    suite: str = "cpu",
    *,
    rounds: int | None = None,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Runs the cases of `ops` on the suite's device, printing each op's table as it completes; returns
    {"device", "suite", "torch", "rlhf_fast", "results": [...]} for --json."""
    from rlhf_fast import __version__

    device = suite_device(suite)
    with _threads(threads):
        name = device_name(device)
        echo(
            f"device: {name} [{device.type}], torch {torch.__version__}, rlhf_fast {__version__}; contenders "
            f"interleaved, {'CUDA events, L2 flushed' if device.type == 'cuda' else 'wall clock'}; "
            "min and median per call"
        )
        results = []
        for op in ops:
            op_results = [run_case(case, device, rounds=rounds) for case in op_cases(op, device)]
            echo("")
            for line in format_table(op_results, device) + skipped_lines(op_results):
                echo(line)
            results += op_results
    return {
        "suite": suite,
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "rlhf_fast": __version__,
        "threads": threads or torch.get_num_threads(),
        "floors_measured_on": FLOOR_MACHINE if device.type == "cuda" else None,
        "results": results,
    }


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as file:
        json.dump(report, file, indent=2)
        file.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_fast.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=SUITES, default="cpu")
    parser.add_argument("--ops", help=f"comma-separated subset of {','.join(OPS)} (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case (default: per case)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    try:
        report = run(parse_ops(args.ops), args.suite, rounds=args.rounds, threads=args.threads)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        write_json(report, args.json)
    return 0


__all__ = ["OPS", "BenchError", "format_table", "main", "parse_ops", "run", "run_case", "write_json"]
