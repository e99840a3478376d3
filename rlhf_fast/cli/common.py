"""Pieces the `rlhf-fast` commands share: user errors, path checks, the run config, data loading, summaries.

Everything heavy (torch, transformers, the trainers) is imported inside functions, so `rlhf-fast --help`
stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from rlhf_fast.data.truncation import TruncationPolicy

__all__ = [
    "CLIError",
    "DataOptions",
    "Dataset",
    "PPODataOptions",
    "check_file",
    "check_model_dir",
    "format_metrics",
    "load_run_config",
    "load_tokenizer",
    "model_max_positions",
    "read_dataset",
    "say",
]


class CLIError(Exception):
    """A mistake in the command line or its inputs: reported as one line on stderr, exit status 2."""


def _is_main_process() -> bool:
    """Under torchrun every rank runs the command; only rank 0 prints reports."""
    return os.environ.get("RANK", "0") == "0"


def say(*lines: str) -> None:
    """Prints to stdout and flushes, so the lines interleave correctly with the progress bar on stderr."""
    if _is_main_process():
        for line in lines:
            print(line, flush=True)


def note(line: str) -> None:
    if _is_main_process():
        print(f"note: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- paths


def check_file(flag: str, path: str | os.PathLike, what: str = "a JSONL file") -> str:
    """`path` as a string if it is an existing, readable file; CLIError naming `flag` otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path}: is a directory, expected {what}")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{flag} {path}: not readable (permission denied)")
    return path


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # the weights `from_pretrained` reads
UNSAFE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# A tokenizer saved with `save_pretrained` leaves at least one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_model_dir(flag: str, path: str | os.PathLike, *, reward: bool = False) -> str:
    """The Hugging Face model directory `path` names. A run directory of this CLI (holding `final/`) is
    accepted for the model it produced. CLIError naming `flag` when there is no model there."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path}: no such directory")
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path}: not a directory (expected a Hugging Face model directory)")
    directory = Path(path)
    if not (directory / "config.json").is_file():
        if (directory / "final" / "config.json").is_file():
            directory = directory / "final"  # the output directory of an earlier `rlhf-fast` run
        else:
            raise CLIError(f"{flag} {path}: not a Hugging Face model directory (no config.json)")
    if reward:
        from rlhf_fast.models.reward import RewardModel  # here: the other commands' checks need no torch

        if not (directory / RewardModel.head_file).is_file():
            raise CLIError(
                f"{flag} {path}: not a reward model (no {RewardModel.head_file}); train one with `rlhf-fast rm`"
            )
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        unsafe = [name for name in UNSAFE_WEIGHT_FILES if (directory / name).is_file()]
        found = f"only {', '.join(unsafe)}, which is read by unpickling; " if unsafe else ""
        raise CLIError(
            f"{flag} {directory}: no model weights ({found}expected {' or '.join(WEIGHT_FILES)}); save the "
            "model with save_pretrained (safetensors)"
        )
    return str(directory)


def check_output_dir(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """The run's output directory (not created yet). Refuses a path below a file, and to train over an
    earlier run unless resuming or overwriting."""
    out = Path(path)
    for folder in (out, *out.parents):  # the nearest part of the path that exists must be a directory
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                what = "exists and is not a directory" if folder == out else f"{folder} is not a directory"
                raise CLIError(f"--out {out}: {what}")
            break
    has_run = (out / "checkpoints").is_dir() or (out / "metrics.jsonl").is_file()
    if has_run and not (resume or overwrite):
        raise CLIError(
            f"--out {out}: already holds a run; pass --resume to continue it, --overwrite to start over, "
            "or choose another --out"
        )
    return out


def resume_checkpoint(out: Path) -> Path | None:
    """The checkpoint `--resume` continues from (the trainers' own choice: `last`, else `previous`, each
    verified); None when the run has none. CLIError when it has checkpoints but none is usable."""
    from rlhf_fast.trainers.checkpoint import CheckpointError, latest_checkpoint

    try:
        return latest_checkpoint(out, warn=False)  # the trainer warns when it passes over `last`
    except CheckpointError as error:
        raise CLIError(f"--resume: {error}") from None


# ------------------------------------------------------------------------------------------ model metadata


def load_tokenizer(flag: str, model_dir: str):
    """The tokenizer saved in `model_dir`, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise CLIError(
            f"{flag} {model_dir}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "with the model (tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001 -- OSError, ValueError, ...: transformers raises many kinds for a bad directory
        raise CLIError(f"{flag} {model_dir}: cannot load its tokenizer ({_one_line(error)})") from None
    if tokenizer.eos_token_id is None:
        raise CLIError(
            f"{flag} {model_dir}: the tokenizer has no eos token (responses end with it); set "
            "tokenizer.eos_token and save it again"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_max_positions(flag: str, model_dir: str) -> int | None:
    """The longest sequence the model's position embeddings cover, from its config.json (no weights read)."""
    from transformers import AutoConfig

    from rlhf_fast.models._common import max_positions

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as error:  # noqa: BLE001
        raise CLIError(f"{flag} {model_dir}: cannot read config.json ({_one_line(error)})") from None
    return max_positions(config)


def one_line(text: object) -> str:
    """`text` on one line: line breaks (and the indentation around them) become one space; every other
    character, such as two spaces in a row in a file name, is kept as it is."""
    return re.sub(r"[ \t]*[\r\n]+[ \t]*", " ", str(text)).strip()


def _one_line(error: BaseException) -> str:
    text = one_line(error)
    return text if len(text) <= 300 else text[:297] + "..."


def load_weights(flag: str, path: str, loader):
    """`loader(path)`, with a load failure (a corrupt or incomplete checkpoint) turned into a CLIError."""
    try:
        return loader(path)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CLIError(f"{flag} {path}: cannot load the model ({_one_line(error)})") from None


# ---------------------------------------------------------------------------------------------- run config


@dataclasses.dataclass
class DataOptions:
    """How the data files are read and fitted to the model; the `data:` section of a config file."""

    # Tokens per sequence (prompt + response + eos); for prompts, tokens per prompt. None: the model's limit.
    max_length: int | None = None
    truncation: TruncationPolicy = TruncationPolicy.ERROR  # a record longer than max_length
    on_bad_record: Literal["error", "skip"] = "error"  # a malformed or invalid record: error | skip
    # The longest line read as a record, in bytes; checked before the line is parsed or tokenized.
    max_record_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        self.truncation = TruncationPolicy.parse(self.truncation, "data.truncation")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2 or null, got {self.max_length}")
        if self.max_record_bytes < 1:
            raise ValueError(f"data.max_record_bytes must be >= 1, got {self.max_record_bytes}")


@dataclasses.dataclass
class PPODataOptions(DataOptions):
    # PPO-ptx pretraining block length; None: the prompt limit + max_new_tokens (capped at the model's limit).
    pretrain_block_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pretrain_block_size is not None and self.pretrain_block_size < 2:
            raise ValueError(f"data.pretrain_block_size must be >= 2 or null, got {self.pretrain_block_size}")


def run_config_class(trainer_config: type, data_options: type = DataOptions) -> type:
    """The trainer's config dataclass plus a `data` section: what a config file for a command holds."""
    name = trainer_config.__name__.replace("Config", "") + "RunConfig"
    return dataclasses.make_dataclass(
        name,
        [("data", data_options, dataclasses.field(default_factory=data_options))],
        bases=(trainer_config,),
    )


def load_run_config(config_class: type, args, *, resume_config: Path | None = None):
    """Defaults < the config file (--config, or the run's own config.yaml when resuming) < --set < flags.

    ConfigError (unknown key, bad type) and the trainer's own checks become CLIErrors.
    """
    from rlhf_fast.config import ConfigError, load_config

    config_path = args.config
    if config_path is not None:
        check_file("--config", config_path, "a YAML file")
    elif resume_config is not None and resume_config.is_file():
        config_path = str(resume_config)
        note(f"resuming with the run's own config {config_path}")
    try:
        config = load_config(config_class, config_path, list(args.set or []))
    except ConfigError as error:
        raise CLIError(str(error)) from None
    except UnicodeDecodeError as error:
        raise CLIError(
            f"--config {config_path}: not valid UTF-8 ({error.reason} at byte {error.start})"
        ) from None
    data_changes = {
        name: value
        for name, value in (
            ("max_length", args.max_length),
            ("truncation", args.truncation),
            ("on_bad_record", args.on_bad_record),
        )
        if value is not None
    }
    changes: dict[str, Any] = {"output_dir": str(args.out)}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.resume:
        changes["resume"] = True
    try:
        if data_changes:
            changes["data"] = dataclasses.replace(config.data, **data_changes)
        config = dataclasses.replace(config, **changes)
        config.check()
    except (TypeError, ValueError) as error:
        raise CLIError(f"config: {error}") from None
    return config


# ---------------------------------------------------------------------------------------------------- data

READERS = {
    "demonstrations": "read_demonstrations",
    "rankings": "read_rankings",
    "prompts": "read_prompts",
    "pretrain": "read_pretrain_text",
}


@dataclasses.dataclass
class Dataset:
    """One data file of a command: as read (`loaded`) and, once fitted to the model, `encoded`."""

    flag: str  # the command-line flag that named it, e.g. "--data"
    kind: str  # "demonstrations" | "rankings" | "prompts" | "pretrain"
    path: str
    loaded: Any  # LoadResult
    encoded: Any = None  # EncodedDemonstrations | EncodedRankings | EncodedPrompts | EncodedPretrain
    limit: int | None = None  # max_length (or max prompt length, or block size) it was fitted to

    @property
    def items(self) -> list:
        """What the trainer takes: encoded examples, or the [N, L] pretraining blocks."""
        if self.kind == "pretrain":
            return self.encoded.blocks
        return list(self.encoded.items)

    def read_summary(self) -> str:
        """`demos.jsonl: 10 records` plus, when records were skipped, the count per reason."""
        loaded = self.loaded
        line = f"{self.path}: {len(loaded)} records ({self.kind})"
        if loaded.num_skipped:
            line += f", {loaded.num_skipped} bad records skipped ({_skipped_reasons(loaded)})"
        return line

    def fit_summary(self) -> str | None:
        """What fitting to the limit did (truncated / skipped as too long / dropped tail), or None."""
        report = getattr(self.encoded, "report", None)
        if report is None or not report.counts:
            return None
        parts = []
        for reason, count in sorted(report.counts.items()):
            where = f" (first at {report.first_source[reason]})" if reason in report.first_source else ""
            parts.append(f"{count} {reason}{where}")
        if report.tokens_dropped:
            parts.append(f"{report.tokens_dropped} tokens dropped")
        return f"{self.path}: " + ", ".join(parts)

    def counts(self) -> dict[str, int]:
        """Skipped and truncated counts by reason, for the summary (`skipped/<reason>`, `<report key>`)."""
        counts = {f"skipped/{reason}": count for reason, count in sorted(self.loaded.skipped.items())}
        report = getattr(self.encoded, "report", None)
        if report is not None:
            counts.update(sorted(report.counts.items()))
        return counts


def _skipped_reasons(loaded) -> str:
    parts = []
    for reason, count in loaded.skipped.most_common():
        first = loaded.first_skipped.get(reason)
        parts.append(f"{count} {reason}" + (f", first at {first.path}:{first.line}" if first else ""))
    return "; ".join(parts)


def read_dataset(
    flag: str, kind: str, path: str, tokenizer, on_bad_record: str, max_record_bytes: int | None = None
) -> Dataset:
    """Reads and validates a JSONL file (DataError on a bad record unless skipping)."""
    from rlhf_fast import data

    reader = getattr(data, READERS[kind])
    check_file(flag, path)
    limit = {} if max_record_bytes is None else {"max_record_bytes": max_record_bytes}
    loaded = reader(path, on_bad_record=on_bad_record, tokenizer=tokenizer, **limit)
    return Dataset(flag, kind, path, loaded)


def encode_dataset(dataset: Dataset, tokenizer, limit: int, truncation: str) -> Dataset:
    """Tokenizes the records and fits them to `limit` under the truncation policy (DataError if it must)."""
    from rlhf_fast import data
    from rlhf_fast.data.errors import WHOLE_RECORD, DataError

    records = dataset.loaded.records
    if dataset.kind == "demonstrations":
        encoded = data.encode_demonstrations(records, tokenizer, limit, truncation)
    elif dataset.kind == "rankings":
        encoded = data.encode_rankings(records, tokenizer, limit, truncation)
    elif dataset.kind == "prompts":
        encoded = data.encode_prompts(records, tokenizer, limit, truncation)
    else:
        encoded = data.encode_pretrain(records, tokenizer, limit)
    if len(encoded) == 0:
        raise DataError(
            dataset.path,
            0,
            WHOLE_RECORD,
            f"no record fits in {limit} tokens (all were skipped as too long); raise --max-length",
            kind="no_records",
        )
    dataset.encoded = encoded
    dataset.limit = limit
    return dataset


def describe_dataset(dataset: Dataset, tokenizer, limit: int, truncation: str) -> str:
    """The `--dry-run` statistics of one file (rlhf_fast.data.stats)."""
    from rlhf_fast.data import describe, format_stats

    policy = "error" if dataset.kind == "pretrain" else truncation
    stats = describe(dataset.loaded, tokenizer, max_length=limit, policy=policy)
    return f"[{dataset.flag}] " + format_stats(stats)


# ------------------------------------------------------------------------------------------------ summaries


def format_value(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, float) and value != int(value):
        return f"{value:.4g}"
    return str(int(value)) if float(value).is_integer() else str(value)


def format_metrics(metrics: Mapping[str, float], skip_prefixes: Iterable[str] = ("time/",)) -> list[str]:
    """`name value` lines, grouped in the order the trainer logged them, timing metrics left out."""
    skip = tuple(skip_prefixes)
    return [f"{name} {format_value(value)}" for name, value in metrics.items() if not name.startswith(skip)]


def output_lines(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    """Aligned `label  path  (how to use it)` lines."""
    width = max(len(label) for label, _, _ in rows)
    return [f"    {label:<{width}}  {path}" + (f"  ({hint})" if hint else "") for label, path, hint in rows]
