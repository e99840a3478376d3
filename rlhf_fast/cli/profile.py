"""`rlhf-fast profile sft | rm | ppo`: the training command's models, data and config, a few profiled steps.

The arguments are the training command's (same option builders), read and validated by the same code
(`rlhf_fast.cli.train`), with the run's output directory replaced by a temporary one that is removed
afterwards: profiling writes nothing to --out. The measuring is `rlhf_fast.bench.profile`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rlhf_fast.cli.common import CLIError, note, say

__all__ = ["run_profile"]


def _writable(flag: str, path: str | None) -> None:
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise CLIError(f"{flag} {path}: the directory {Path(path).resolve().parent} does not exist")


def run_profile(args) -> int:
    from rlhf_fast.bench.profile import format_report, profile_trainer
    from rlhf_fast.cli import train

    if args.warmup < 0:
        raise CLIError(f"--warmup {args.warmup}: expected 0 or more")
    _writable("--trace", args.trace)
    _writable("--json", args.json)
    if args.out is not None:
        note(f"--out {args.out}: profiling writes nothing there")
    reports = []

    def execute(job, trainer) -> int:
        reports.append(
            profile_trainer(
                trainer, args.target, iterations=args.iterations, warmup=args.warmup, trace=args.trace
            )
        )
        return 0

    run = {"sft": train.run_sft, "rm": train.run_rm, "ppo": train.run_ppo}[args.target]
    with tempfile.TemporaryDirectory(prefix="rlhf_fast_profile_") as scratch:
        training_args = argparse.Namespace(
            **{**vars(args), "out": scratch, "resume": False, "overwrite": False, "dry_run": False}
        )
        status = run(training_args, execute)
    if status != 0 or not reports:
        return status
    (report,) = reports
    say(*format_report(report))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report.to_dict(), file, indent=2)
            file.write("\n")
        say(f"  profile written to {args.json}")
    return 0
