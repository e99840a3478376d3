"""Stage bookkeeping for the demo: run a stage or reuse its finished output, and what each stage depends on.

A stage directory holds `stage.json` with the key it ran with (its settings, the digests of the data files it
read, the keys of the stages whose models it used) once it finished; a rerun with the same key reuses it, a
changed or unfinished one runs again from scratch, and so does everything whose key holds its key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_fast.pipeline.presets import DemoPreset

# Part of every stage's key: bump it when a stage's code changes what the stage produces. STAGE_VERSIONS:
# the same for the stages of one kind alone (and, through their keys, the stages that use them).
PIPELINE_VERSION = 2
STAGE_VERSIONS = {"ppo": 2, "eval": 2}
STAGE_FILE = "stage.json"


class Stages:
    """Runs stages, each announced by one line and finished by another (the trainers draw their progress bars
    in between), and skips a stage whose directory holds a finished run with the same key. Each stage runs
    with its entry in `threads` (by directory name) intra-op CPU threads, or `default_threads`
    (`rlhf_fast.pipeline.parallel.plan_threads` chooses them)."""

    def __init__(
        self,
        console: Callable[[str], None],
        fresh: bool,
        default_threads: int = 1,
        threads: dict[str, int] | None = None,
    ):
        self.console = console
        self.fresh = fresh
        self.default_threads = default_threads
        self.threads = dict(threads or {})
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        # Intra-op threads each stage ran with (a reused stage: as recorded when it ran). The results depend on
        # them through rounding: the same counts reproduce a run bit for bit.
        self.stage_threads: dict[str, int] = {}

    def _set_threads(self, name: str) -> int:
        import torch

        threads = self.threads.get(name, self.default_threads)
        torch.set_num_threads(threads)
        self.stage_threads[name] = threads
        return threads

    def take_record(self) -> dict[str, Any]:
        """What this object recorded so far (seconds per stage kind, reused and per-stage threads), cleared:
        a worker process hands it to the caller's `Stages` (`add_record`)."""
        record = {"seconds": self.seconds, "reused": self.reused, "stage_threads": self.stage_threads}
        self.seconds, self.reused, self.stage_threads = {}, [], {}
        return record

    def add_record(self, record: dict[str, Any]) -> None:
        for name, seconds in record["seconds"].items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.reused += record["reused"]
        self.stage_threads.update(record["stage_threads"])

    @staticmethod
    def finished_record(directory: Path) -> dict:
        """The finished stage's record (key, seconds, threads), or {} when there is none."""
        try:
            record = json.loads((directory / STAGE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def finished(self, directory: Path, key: Any) -> bool:
        """Whether `run` would reuse `directory` for `key`."""
        return not self.fresh and self.finished_record(directory).get("key") == as_stored(key)

    def run(self, name: str, what: str, directory: Path, key: Any, body: Callable[[], None]) -> None:
        """Runs `body` (which writes into `directory`) unless `directory` already holds its result for `key`."""
        key = as_stored(key)
        if self.finished(directory, key):
            self.console(f"[{name}] {what}: reused from {directory}")
            self.reused.append(directory.name)
            recorded = self.finished_record(directory).get("threads")
            if recorded is not None:
                self.stage_threads[directory.name] = int(recorded)
            return
        self.console(f"[{name}] {what}")
        threads = self._set_threads(directory.name)
        started = time.perf_counter()
        shutil.rmtree(directory, ignore_errors=True)  # a stale or half-written run must not be resumed
        body()
        seconds = time.perf_counter() - started
        directory.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "seconds": round(seconds, 2), "threads": threads}
        (directory / STAGE_FILE).write_text(json.dumps(record, indent=1))
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.console(f"[{name}] done in {seconds:.1f} s")

    def timed(self, name: str, what: str, body: Callable[[], Any]) -> Any:
        """Runs an uncached stage."""
        self.console(f"[{name}] {what}")
        self._set_threads(name)
        started = time.perf_counter()
        result = body()
        seconds = time.perf_counter() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.console(f"[{name}] done in {seconds:.1f} s")
        return result


def as_stored(key: Any) -> Any:
    """`key` as it reads back from JSON (tuples as lists, keys sorted), so keys compare equal across runs."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _fields(preset: DemoPreset, *names: str) -> dict[str, Any]:
    return {name: getattr(preset, name) for name in names}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def world_code_digest() -> str:
    """The world's source: its scorers and labelers decide the rankings and every evaluation."""
    import rlhf_fast.world

    package = Path(rlhf_fast.world.__file__).parent
    return _digest(b"".join(path.read_bytes() for path in sorted(package.glob("*.py"))))


def rm_size(preset: DemoPreset) -> str:
    return preset.rm_size or preset.model_sizes[-1]


def rm_sample_sizes(preset: DemoPreset) -> tuple[str, ...]:
    return tuple(preset.rm_sample_sizes or preset.model_sizes)


def rm_backbone(preset: DemoPreset) -> str:
    """The stage whose model the RM starts from: an SFT model of its own (`DemoPreset.rm_pretrain_steps`), or
    the policy's of its size."""
    return f"rm_sft-{rm_size(preset)}" if preset.rm_pretrain_steps else f"sft-{rm_size(preset)}"


def oracle_ppo_name(preset: DemoPreset) -> str:
    """The stage and model name of PPO against the labelers' utility (`DemoPreset.oracle_ppo`)."""
    from rlhf_fast.eval.report import ORACLE_PPO_KIND

    return f"{ORACLE_PPO_KIND}-{preset.model_sizes[-1]}"


def stage_keys(
    preset: DemoPreset, seed: int, paths: dict[str, Path], vocabulary: list[str]
) -> dict[str, Any]:
    """What each stage's output depends on: its settings, the digests of the data files it reads, and the keys
    of the stages whose models it uses. Pretraining and SFT depend on their data files only, so a change of
    world settings that leaves the corpus and the demonstrations alone keeps them."""
    files = {name: _digest(Path(path).read_bytes()) for name, path in paths.items()}
    world = {
        "version": PIPELINE_VERSION,
        "seed": seed,
        "world": preset.world,
        "corpus": preset.corpus,
        "code": world_code_digest(),
    }
    keys: dict[str, Any] = {"world": world}
    for size in preset.model_sizes:
        keys[f"base-{size}"] = {
            "version": PIPELINE_VERSION,
            "seed": seed,
            "corpus": files["pretrain"],
            "vocabulary": _digest(" ".join(vocabulary).encode()),
            "size": size,
            "device": preset.device,
            **_fields(preset, "max_positions", "pretrain_block_size", "pretrain_batch_size"),
            "steps": preset.per_size("pretrain_steps", size),
            "learning_rate": preset.per_size("pretrain_learning_rate", size),
        }
        keys[f"sft-{size}"] = {
            "base": keys[f"base-{size}"],
            "demonstrations": files["demonstrations"],
            **_fields(preset, "sft_epochs", "sft_batch_size", "sft_learning_rate", "max_length"),
        }
        if preset.sft_pretrain_mix:  # SFT on demonstrations alone depends on them alone
            keys[f"sft-{size}"].update(pretrain=files["pretrain"], pretrain_mix=preset.sft_pretrain_mix)
    if preset.rm_pretrain_steps:
        size = rm_size(preset)
        keys[f"rm_base-{size}"] = {
            "from": keys[f"base-{size}"],
            "steps": preset.rm_pretrain_steps,
            "learning_rate": preset.per_size("pretrain_learning_rate", size),
        }
        keys[f"rm_sft-{size}"] = {**keys[f"sft-{size}"], "base": keys[f"rm_base-{size}"]}
    sampling = _fields(
        preset, "rm_min_k", "rm_max_k", "rm_sample_temperature", "max_new_tokens", "eval_batch_size"
    )
    for size in rm_sample_sizes(preset):
        keys[f"rm_samples-{size}"] = {
            "policy": keys[f"sft-{size}"],
            "policies": list(rm_sample_sizes(preset)),  # the share of each prompt's samples it draws
            "prompts": files["prompts_rm"],
            **sampling,
        }
    keys["rm"] = {
        "policy": keys[rm_backbone(preset)],
        "samples_from": [keys[f"rm_samples-{size}"] for size in rm_sample_sizes(preset)],
        "prompts": files["prompts_rm"],
        "world": world,
        **_fields(
            preset,
            "rm_epochs",
            "rm_batch_size",
            "rm_learning_rate",
        ),
    }
    for size in preset.model_sizes:
        for kind in ("ppo", "ppo_ptx"):
            keys[f"{kind}-{size}"] = {
                "version": STAGE_VERSIONS["ppo"],
                "policy": keys[f"sft-{size}"],
                "rm": keys["rm"],
                "prompts": files["prompts_train"],
                **_fields(
                    preset,
                    "ppo_iterations",
                    "ppo_batch_size",
                    "ppo_minibatches",
                    "ppo_epochs",
                    "ppo_learning_rate",
                    "ppo_output_norm_learning_rate",
                    "kl_coef",
                    "max_new_tokens",
                    "max_positions",
                ),
            }
            if kind == "ppo_ptx":
                keys[f"{kind}-{size}"].update(
                    {"pretrain": files["pretrain"], **_fields(preset, "ptx_coef", "pretrain_block_size")}
                )
    if preset.oracle_ppo:
        largest = preset.model_sizes[-1]
        keys[oracle_ppo_name(preset)] = {**keys[f"ppo-{largest}"], "reward": "labelers", "world": world}
    keys["eval"] = {
        "version": STAGE_VERSIONS["eval"],
        **_fields(preset, "eval_prompts", "eval_temperature", "max_new_tokens", "eval_batch_size"),
    }
    return keys
