"""Runs a toy trainer in its own process, for the resume-after-SIGKILL and multi-process tests.

    python tests/trainers/run_toy.py KIND[,KIND...] OUTPUT_ROOT [--resume] [--pause-after N] [--set KIND.key=value ...]

Each KIND (sft, rm, ppo) trains in OUTPUT_ROOT/KIND. With --pause-after N the process completes step N + 1
(not checkpointed) after the checkpoint of step N, writes its pid to OUTPUT_ROOT/KIND/paused.rank<RANK> and
sleeps until killed (or until its parent, e.g. a killed torchrun agent, is gone).
Under torchrun every rank runs the same trainers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("RLHF_FAST_NO_PROGRESS", "1")

from tests.trainers import toy

STEP_METHOD = {
    "sft": ("train_step", "global_step"),
    "rm": ("train_step", "global_step"),
    "ppo": ("iteration", "iteration_index"),
}


def pause_after(trainer, kind: str, step: int, directory: Path) -> None:
    method_name, counter = STEP_METHOD[kind]
    original = getattr(trainer, method_name)
    parent = os.getppid()

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        # The counter is incremented after the step returns: counter == step means step + 1 just ran.
        if getattr(trainer, counter) == step:
            name = f"paused.rank{os.environ.get('RANK', '0')}"
            temporary = directory / f".{name}.tmp"  # renamed into place: a reader never sees a partial pid
            temporary.write_text(str(os.getpid()))
            temporary.rename(directory / name)
            deadline = time.monotonic() + 600
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.1)
            os._exit(1)
        return result

    setattr(trainer, method_name, wrapped)


def parse_value(text: str):
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kinds")
    parser.add_argument("output_root")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-after", type=int, default=None)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        kind, key = key.split(".", 1)
        overrides.setdefault(kind, {})[key] = parse_value(value)
    for kind in args.kinds.split(","):
        output_dir = Path(args.output_root) / kind
        trainer = toy.make_trainer(kind, output_dir, resume=args.resume, **overrides.get(kind, {}))
        if args.pause_after is not None:
            pause_after(trainer, kind, args.pause_after, output_dir)
        trainer.train()


if __name__ == "__main__":
    main()
