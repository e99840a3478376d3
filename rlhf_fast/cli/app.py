"""The `rlhf-fast` command line: `sft | rm | ppo | eval | demo | bench | profile`.

    rlhf-fast sft  --model gpt2-dir --data demos.jsonl --out runs/sft
    rlhf-fast rm   --model runs/sft --data rankings.jsonl --reference demos.jsonl --out runs/rm
    rlhf-fast ppo  --policy runs/sft --reward runs/rm --prompts prompts.jsonl --pretrain text.jsonl \
                   --out runs/ppo
    rlhf-fast eval --policy runs/ppo --baseline runs/sft --reward runs/rm --prompts heldout.jsonl \
                   --out runs/eval
    rlhf-fast bench [--suite cpu|gpu] [--ops gae,ranking,ppo_loss,logprob] [--json FILE]
    rlhf-fast profile ppo --policy runs/sft --reward runs/rm --prompts prompts.jsonl [--iterations N] \
                   [--trace FILE] [--json FILE]

Bad input (a malformed record, a missing file, an unknown config key) is reported as one line on stderr naming
the file, line and field, with exit status 2, before any weights are loaded. `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from rlhf_fast.cli.common import CLIError, one_line, say

__all__ = ["build_parser", "main"]

PROG = "rlhf-fast"
USER_ERROR = 2  # bad command line, config or data
FAILURE = 1  # the run itself stopped (a safety check, a missing component)
TRAINING = ("sft", "rm", "ppo")


class Unavailable(Exception):
    """A component this command needs is not part of this installation: exit status 1."""


# ------------------------------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    parent.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parent


def _data_options(parent: argparse.ArgumentParser, *, prompts_only: bool = False) -> None:
    group = parent.add_argument_group("data")
    limit_help = (
        "longest prompt, in tokens (default: the model's positions minus --max-new-tokens)"
        if prompts_only
        else "longest sequence (prompt + response + eos), in tokens; for ppo, the longest prompt "
        "(default: the model's limit)"
    )
    group.add_argument("--max-length", type=_positive_int, metavar="N", help=limit_help)
    group.add_argument(
        "--truncation",
        choices=("error", "skip", "truncate_prompt"),
        help="a record longer than --max-length: fail naming it (default), skip it, or drop "
        "prompt tokens from the left",
    )
    group.add_argument(
        "--on-bad-record",
        choices=("error", "skip"),
        help="a malformed or invalid record: fail naming file:line and field (default), or skip "
        "it and report the count per reason",
    )


def _config_options() -> argparse.ArgumentParser:
    """--config, --set, --seed and the data options: what fixes a training run's config and data."""
    parent = argparse.ArgumentParser(add_help=False, parents=[_common_options()])
    run = parent.add_argument_group("config")
    run.add_argument(
        "--config", metavar="FILE", help="YAML file of config fields (a `data:` section included)"
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override one config field, e.g. --set learning_rate=1e-5 --set data.max_length=512 "
        "(repeatable; applied after --config)",
    )
    run.add_argument("--seed", type=int, help="random seed (config field `seed`)")
    _data_options(parent)
    return parent


def _training_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, parents=[_config_options()])
    run = parent.add_argument_group("run")
    run.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory: final/ (Hugging Face model), metrics.jsonl, config.yaml, checkpoints/",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/checkpoints (with <out>/config.yaml unless --config is given)",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="start over in an --out that holds an earlier run"
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the data and print its statistics and the run's memory plan (from the model configs), "
        "then exit without loading the weights",
    )
    run.add_argument(
        "--device-memory",
        type=float,
        metavar="GIB",
        help="with --dry-run: the memory of one device, in GiB (e.g. 139 for an H200): say whether the run "
        "fits and find the largest batch that does",
    )
    run.add_argument(
        "--processes",
        type=_positive_int,
        metavar="N",
        help="with --dry-run: plan for N processes (default: WORLD_SIZE, else 1); with fsdp, per device",
    )
    return parent


def _sft_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face causal LM directory")
    parser.add_argument("--data", required=True, metavar="FILE", help="demonstrations JSONL")
    parser.add_argument("--eval-data", metavar="FILE", help="held-out demonstrations JSONL (eval/loss)")


def _rm_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="the SFT model (its backbone starts the reward model), or a reward model to continue",
    )
    parser.add_argument("--data", required=True, metavar="FILE", help="rankings JSONL")
    parser.add_argument(
        "--eval-data", metavar="FILE", help="held-out rankings JSONL (eval/loss, eval/accuracy)"
    )
    parser.add_argument(
        "--reference",
        metavar="FILE",
        help="demonstrations JSONL whose mean reward becomes 0 (reward normalization)",
    )


def _ppo_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="DIR", help="the SFT model")
    parser.add_argument(
        "--reward", required=True, metavar="DIR", help="the reward model (from `rlhf-fast rm`)"
    )
    parser.add_argument("--prompts", required=True, metavar="FILE", help="prompts JSONL")
    parser.add_argument("--pretrain", metavar="FILE", help='pretraining text JSONL ({"text": ...}): PPO-ptx')


TRAINING_INPUTS = {"sft": _sft_inputs, "rm": _rm_inputs, "ppo": _ppo_inputs}


def _profile_parser(commands) -> None:
    profile = commands.add_parser(
        "profile",
        help="where the time of a training step goes",
        description="Run a few steps of `sft`, `rm` or `ppo` with the same models, data and config as the "
        "training command, and report wall time per phase, tokens per second, peak memory, host syncs "
        "(CUDA) and the rollout/training log-prob mismatch (PPO). Nothing is written to --out.",
    )
    targets = profile.add_subparsers(dest="target", metavar="COMMAND", required=True)
    for name in TRAINING:
        target = targets.add_parser(
            name,
            parents=[_config_options()],
            help=f"profile `rlhf-fast {name}`",
            description=f"Profile `rlhf-fast {name}`: its model and data arguments, --config and --set.",
        )
        TRAINING_INPUTS[name](target)
        group = target.add_argument_group("profile")
        group.add_argument(
            "--iterations",
            type=_positive_int,
            default=3,
            metavar="N",
            help="measured steps (PPO: iterations), after the warm-up (default 3)",
        )
        group.add_argument(
            "--warmup",
            type=int,
            default=1,
            metavar="N",
            help="unmeasured steps first: lazy initialization, CUDA-graph capture (default 1)",
        )
        group.add_argument(
            "--trace", metavar="FILE", help="write a torch.profiler trace of one step (Chrome/Perfetto JSON)"
        )
        group.add_argument("--json", metavar="FILE", help="also write the profile as JSON")
        group.add_argument(
            "--out",
            metavar="DIR",
            help="accepted so a training command line can be reused; nothing is written there",
        )
    profile.set_defaults(handler="profile")


def build_parser() -> argparse.ArgumentParser:
    from rlhf_fast import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="InstructGPT (SFT, K-wise reward model, PPO-ptx) on Hugging Face models and JSONL data.",
        epilog="Run `rlhf-fast COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    training = _training_options()

    sft_about = "Fine-tune a causal LM on {prompt, response} demonstrations."
    rm_about = (
        "Train a reward model on {prompt, completions, ranks} rankings (or {prompt, chosen, rejected} pairs)."
    )
    ppo_about = (
        "Optimize the policy against the reward model with PPO; with --pretrain, PPO-ptx mixes in the "
        "pretraining loss."
    )
    trainers = (
        ("sft", _sft_inputs, "supervised fine-tuning on demonstrations", sft_about),
        ("rm", _rm_inputs, "train a reward model on K-wise rankings", rm_about),
        ("ppo", _ppo_inputs, "PPO (PPO-ptx with --pretrain) against a reward model", ppo_about),
    )
    for name, add_inputs, summary, description in trainers:
        command = commands.add_parser(name, parents=[training], help=summary, description=description)
        add_inputs(command)
        command.set_defaults(handler=name)

    evaluate = commands.add_parser(
        "eval",
        parents=[_common_options()],
        help="generate, score, win rate",
        description="Generate responses to prompts (greedy by default) and, with "
        "--reward, report mean reward and the win rate against --baseline.",
    )
    evaluate.add_argument("--policy", required=True, metavar="DIR", help="the model to evaluate")
    evaluate.add_argument("--baseline", metavar="DIR", help="a model to compare against (e.g. the SFT model)")
    evaluate.add_argument(
        "--prompts", metavar="FILE", help="prompts JSONL (default with --world: its held-out prompts)"
    )
    evaluate.add_argument(
        "--world",
        metavar="DIR",
        help="a demo world's data directory (world.json): judge with its held-out labelers and probes",
    )
    evaluate.add_argument("--reward", metavar="DIR", help="reward model that scores the responses")
    evaluate.add_argument("--out", required=True, metavar="DIR", help="writes responses.jsonl and eval.json")
    evaluate.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    evaluate.add_argument("--top-p", type=float, default=1.0)
    evaluate.add_argument("--batch-size", type=int, default=32, metavar="N")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    evaluate.add_argument(
        "--best-of",
        type=int,
        default=1,
        metavar="N",
        help="the policy answers with the best of N samples by --reward's score (needs --temperature > 0)",
    )
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _data_options(evaluate, prompts_only=True)
    evaluate.set_defaults(handler="eval")

    demo = commands.add_parser(
        "demo",
        parents=[_common_options()],
        help="the whole paper in miniature",
        description="Run the InstructGPT pipeline on a generated miniature world: "
        "pretraining, SFT, RM, PPO, PPO-ptx, evaluation report.",
    )
    demo.add_argument("--preset", choices=("quick", "paper"), default="quick")
    demo.add_argument("--out", default="runs/demo", metavar="DIR")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads for every stage (default: each stage's share of the cores free at the start); the "
        "same seed and N reproduce a run bit for bit on the same machine",
    )
    demo.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="N",
        help="training stages run at once, each in a process of its own (default: the cores free at the "
        "start, or those over --threads); the results do not depend on it",
    )
    demo.set_defaults(handler="demo")

    bench = commands.add_parser(
        "bench",
        parents=[_common_options()],
        help="run the op benchmarks",
        description="Time each op against its baseline (naive torch; Liger-Kernel and Cut Cross-Entropy "
        "where importable), measured in the same run, interleaved; on a GPU with the floor beside it. "
        "Arguments after `--` run the repository's pytest-benchmark suite (bench/) instead, from a source "
        "checkout.",
    )
    bench.add_argument("--suite", choices=("cpu", "gpu"), default="cpu", help="cpu (default) or gpu (CUDA)")
    bench.add_argument(
        "--ops",
        metavar="OPS",
        help="comma-separated subset of gae,ranking,ppo_loss,logprob,gelu,sample_tokens",
    )
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--rounds", type=_positive_int, metavar="N", help="interleaved rounds per case")
    bench.add_argument("--threads", type=_positive_int, metavar="N", help="torch intra-op threads")
    bench.set_defaults(handler="bench")
    _profile_parser(commands)
    return parser


# ----------------------------------------------------------------------------------------------- commands


def _run_demo(args) -> int:
    try:
        from rlhf_fast.pipeline import run_demo
    except ModuleNotFoundError as error:
        if error.name in ("rlhf_fast.pipeline", None):
            raise Unavailable(
                "the demo pipeline (rlhf_fast.pipeline) is not part of this installation"
            ) from None
        raise
    except ImportError as error:  # the module is there but lacks run_demo
        raise Unavailable(f"the demo pipeline cannot be used: {error}") from None
    options = {name: getattr(args, name) for name in ("threads", "jobs") if getattr(args, name) is not None}
    result = run_demo(preset=args.preset, out_dir=args.out, seed=args.seed, **options)
    say(
        f"demo done ({args.preset}); outputs in {args.out}"
        + (f": {result}" if isinstance(result, (str, Path)) else "")
    )
    return 0


def _source_root() -> Path | None:
    """The source checkout this package runs from (one holding bench/bench_*.py), or None (a wheel)."""
    root = Path(__file__).resolve().parents[2]
    return root if any((root / "bench").glob("bench_*.py")) else None


def _run_pytest_suite(extra: Sequence[str]) -> int:
    """The repository's pytest-benchmark suite, with the arguments given after `--`."""
    root = _source_root()
    if root is None:
        raise CLIError(
            "arguments after `--` run the pytest-benchmark suite of a source checkout (bench/bench_*.py), "
            "and this installation has none; run without them for the packaged benchmarks"
        )
    files = sorted(str(path) for path in (root / "bench").glob("bench_*.py"))
    command = [sys.executable, "-m", "pytest", *files, "--benchmark-group-by=group", *extra]
    say("running: " + " ".join(command))
    return subprocess.call(command, cwd=root)


def _run_bench(args, extra: Sequence[str]) -> int:
    if extra:
        return _run_pytest_suite(extra)
    import torch

    from rlhf_fast.bench.runner import BenchError, parse_ops, run, write_json

    if args.suite == "gpu" and not torch.cuda.is_available():
        root = _source_root()
        say(
            "The GPU suite needs a CUDA device, and torch sees none here. On a machine with one:",
            "",
            "    rlhf-fast bench --suite gpu",
            "",
            "From a source checkout, the whole GPU check (build the CUDA kernels, run the CUDA tests and every",
            "GPU benchmark) is one script; results go to $OUT (default /tmp/rlhf_fast_gpu_check):",
            "",
            f"    cd {root or '<checkout>'} && bash bench/gpu_check.sh",
        )
        return 0
    try:
        report = run(parse_ops(args.ops), args.suite, rounds=args.rounds, threads=args.threads, echo=say)
    except BenchError as error:
        raise CLIError(str(error)) from None
    if args.json:
        write_json(report, args.json)
        say(f"results written to {args.json}")
    return 0


def _dispatch(args, extra: Sequence[str]) -> int:
    if extra and args.handler != "bench":
        raise CLIError(f"arguments after `--` are only for `bench`: {' '.join(extra)}")
    if args.handler == "bench":
        return _run_bench(args, extra)
    if args.handler == "profile":
        from rlhf_fast.cli.profile import run_profile

        return run_profile(args)
    if args.handler == "demo":
        return _run_demo(args)
    if args.handler == "eval":
        from rlhf_fast.cli.eval import run_eval

        return run_eval(args)
    from rlhf_fast.cli import train as cli_train

    return {"sft": cli_train.run_sft, "rm": cli_train.run_rm, "ppo": cli_train.run_ppo}[args.handler](args)


@contextlib.contextmanager
def _quiet_libraries(no_progress: bool) -> Iterator[None]:
    """transformers' warnings and save/load progress bars off (the trainer's own bar stays, unless
    --no-progress); restored afterwards so an in-process caller keeps its settings."""
    previous_progress = os.environ.get("RLHF_FAST_NO_PROGRESS")
    if no_progress:
        os.environ["RLHF_FAST_NO_PROGRESS"] = "1"
    restore = []
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        restore.append(lambda: transformers.logging.set_verbosity(verbosity))
        if bars:
            restore.append(transformers.utils.logging.enable_progress_bar)
    except ImportError:
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()
        if no_progress:
            if previous_progress is None:
                os.environ.pop("RLHF_FAST_NO_PROGRESS", None)
            else:
                os.environ["RLHF_FAST_NO_PROGRESS"] = previous_progress


def _error(command: str | None, message: str) -> None:
    where = f"{PROG} {command}" if command else PROG
    print(f"{where}: error: {one_line(message)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (0 ok, 1 the run failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error (argparse printed it)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else USER_ERROR)

    from rlhf_fast.cli.training_job import TrainingAborted
    from rlhf_fast.config import ConfigError
    from rlhf_fast.data.errors import DataError

    try:
        with _quiet_libraries(args.no_progress):
            return _dispatch(args, extra)
    except (CLIError, DataError, ConfigError) as error:
        if args.debug:
            raise
        _error(args.command, str(error))
        return USER_ERROR
    except (TrainingAborted, Unavailable) as error:
        if args.debug:
            raise
        _error(args.command, str(error))
        return FAILURE
    except KeyboardInterrupt:
        hint = (
            " (rerun with --resume to continue from the last checkpoint)" if args.command in TRAINING else ""
        )
        _error(args.command, "interrupted" + hint)
        return 130


if __name__ == "__main__":
    sys.exit(main())
