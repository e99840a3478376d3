"""Atomic, verified, resumable training checkpoints.

Layout under `<output_dir>/checkpoints/`:

    last/                      the newest complete checkpoint
        <name>.safetensors     each model's full state dict (tied tensors stored once, see `ALIAS_PREFIX`)
        optimizer.pt           optimizer state (full, unsharded)
        scheduler.pt           LR scheduler state
        rng_rank<r>.pt         python / numpy / torch / CUDA RNG states and named generators, one per rank
        trainer_state.json     step, data position, KL controller, ... (whatever the trainer passes)
        manifest.json          every file above with its size and sha256, written last
    previous/                  the one before

A checkpoint is data, never code: the `.pt` files hold only tensors and plain containers and are read with
`torch.load(weights_only=True)`, whose unpickler refuses any other object.

A checkpoint is written into a temporary directory in the same parent, every file and the directory are
fsynced, the manifest is written last (itself atomically), and only then is the directory renamed into place
(rename is atomic on POSIX). The rotation is `previous -> trash`, `last -> previous`, `tmp -> last`: a crash at
any point leaves `last` or `previous` holding a complete checkpoint.

Before a checkpoint is used it is verified against its manifest and read whole into memory; a damaged `last`
falls back to `previous` with a warning naming what was wrong, and when neither is usable `CheckpointError`
names both problems (the files are left as they are).

A state with a non-finite parameter is never written, so a NaN cannot replace the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_fast.trainers.distributed import DistributedContext, is_fsdp, unwrap_model
from rlhf_fast.trainers.manifest import MANIFEST, TRAINER_STATE, verify_checkpoint, write_manifest

logger = logging.getLogger("rlhf_fast.trainers")

LAST, PREVIOUS = "last", "previous"
ALIAS_PREFIX = (
    "alias:"  # safetensors metadata key "alias:<name>" -> name of the tensor it shares storage with
)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# model and optimizer state (plain, DDP or FSDP2)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on the CPU. A collective for FSDP2 models: call on every rank."""
    model = unwrap_model(model)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for alias, canonical in tied_aliases(model).items():  # FSDP2 lists a tied weight once
            if alias not in state and canonical in state:
                state[alias] = state[canonical]
        return state
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{second name of a shared parameter: its first name}, e.g. a tied LM head -> the input embedding."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def load_full_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    model = unwrap_model(model)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        aliases = tied_aliases(model)
        state = {name: tensor for name, tensor in state.items() if name not in aliases}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(dict(state), strict=True)


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module | None) -> dict[str, Any]:
    """The optimizer's full state dict; `model` holds every parameter it updates (needed under FSDP2)."""
    if model is not None and any(is_fsdp(m) for m in unwrap_model(model).modules()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            unwrap_model(model), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module | None, state: dict) -> None:
    if model is not None and any(is_fsdp(m) for m in unwrap_model(model).modules()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            unwrap_model(model), optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
        return
    optimizer.load_state_dict(state)


def save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Writes a state dict as safetensors, storing tensors that share memory (tied weights) once."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in state.items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if tensor.numel() > 0 and key in seen:
            metadata[ALIAS_PREFIX + name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous().clone()
    save_file(tensors, str(path), metadata=metadata)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict written by `save_safetensors`, tied names restored."""
    from safetensors import safe_open

    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    for key, target in metadata.items():
        if key.startswith(ALIAS_PREFIX):
            state[key[len(ALIAS_PREFIX) :]] = state[target]
    return state


# ----------------------------------------------------------------------------------------------------------
# RNG state


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a training step may draw from: python, numpy, torch CPU, each CUDA device, named generators.

    Plain containers, numbers and tensors only, so `torch.load(weights_only=True)` reads it back."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            str(kind),
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached_gaussian),
        ),
        "torch": torch.get_rng_state(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise ValueError(
                f"checkpoint has no state for generator {name!r} (has {list(state['generators'])})"
            )
        gen.set_state(state["generators"][name])


# ----------------------------------------------------------------------------------------------------------


def _shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded DTensor) parameter."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_finite(modules: Mapping[str, nn.Module]) -> bool:
    """True when every parameter (this rank's shard of it) is finite (one host read per call)."""
    flags = [torch.isfinite(_shard(p.detach())).all() for m in modules.values() for p in m.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def models_finite(modules: Mapping[str, nn.Module], ctx: DistributedContext) -> bool:
    """True when every parameter is finite on every rank (a collective)."""
    ok = torch.tensor([1.0 if all_finite(modules) else 0.0], device=ctx.device)
    if ctx.is_distributed:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() >= 1.0)


class CheckpointError(Exception):
    """A checkpoint that cannot be used: damaged, incomplete, or not the trained models' state."""


def _brief(error: BaseException, limit: int = 200) -> str:
    """An error message on one line (line breaks become spaces), cut to `limit` characters."""
    text = re.sub(r"\s*\n\s*", " ", str(error).strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refusal(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused (e.g. "Unsupported global: GLOBAL builtins.exec ..."), without
    its advice to load the file with code execution turned on."""
    text = str(error)
    start = text.find("WeightsUnpickler error:")
    if start < 0:
        return _brief(error)
    detail = text[start + len("WeightsUnpickler error:") :].strip()
    return "refused by the weights-only loader: " + _brief(detail.split(". ")[0], 160)


def _load_data(path: Path) -> Any:
    """A `.pt` file of plain containers and tensors; never runs code from the file."""
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclasses.dataclass
class CheckpointData:
    """One checkpoint read whole into memory (on the CPU), before anything is applied."""

    path: Path
    trainer_state: dict[str, Any]
    models: dict[str, dict[str, torch.Tensor]]
    optimizer: Any
    scheduler: Any
    rng: Any  # None: no RNG state for this rank (another world size)
    extra: dict[str, Any]


def read_checkpoint(
    path: Path, model_names: Sequence[str], rank: int = 0, world_size: int = 1
) -> CheckpointData:
    """Verifies `path` against its manifest and reads the files it lists; CheckpointError naming the
    checkpoint and the file when anything is missing, damaged or not plain data."""
    path = Path(path)
    files = verify_checkpoint(path)
    if isinstance(files, str):
        raise CheckpointError(f"{path}: {files}")

    def read(name: str, reader, required: bool = True):
        if name not in files:
            if required:
                raise CheckpointError(f"{path}: {name} is missing (not in {MANIFEST})")
            return None
        try:
            return reader(path / name)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"{path}: {name} holds more than plain data ({_refusal(error)})") from None
        except Exception as error:  # noqa: BLE001 - any failure to parse a file means the checkpoint is unusable
            raise CheckpointError(
                f"{path}: cannot read {name} ({type(error).__name__}: {_brief(error)})"
            ) from None

    trainer_state = read(TRAINER_STATE, lambda p: json.loads(p.read_text()))
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step"), int):
        raise CheckpointError(f"{path}: {TRAINER_STATE} holds no integer 'step'")
    models = {name: read(f"{name}.safetensors", load_safetensors) for name in model_names}
    same_world = trainer_state.get("world_size", 1) == world_size  # else the RNG streams restart
    return CheckpointData(
        path=path,
        trainer_state=trainer_state,
        models=models,
        optimizer=read("optimizer.pt", _load_data),
        scheduler=read("scheduler.pt", _load_data, required=False),
        rng=read(f"rng_rank{rank}.pt", _load_data) if same_world else None,
        extra=read("extra.pt", _load_data, required=False) or {},
    )


def checkpoint_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint directories of a run, newest first (`last`, then `previous`), those that exist."""
    root = Path(output_dir) / "checkpoints"
    return [root / name for name in (LAST, PREVIOUS) if (root / name).is_dir()]


def latest_checkpoint(output_dir: str | os.PathLike, *, warn: bool = True) -> Path | None:
    """The newest checkpoint of a run that passes its manifest check, or None when the run has none.

    A damaged `last` is passed over for `previous` with a warning; CheckpointError when checkpoints exist
    but none is usable."""
    problems = []
    for candidate in checkpoint_candidates(output_dir):
        files = verify_checkpoint(candidate)
        if isinstance(files, str):
            problems.append(f"{candidate.name}/: {files}")
            continue
        if warn:
            _warn_fallback(candidate, problems)
        return candidate
    if problems:
        raise _no_usable_checkpoint(output_dir, problems)
    return None


def checkpoint_step(path: Path) -> int:
    """The step (PPO: iteration) a verified checkpoint holds."""
    return int(json.loads((Path(path) / TRAINER_STATE).read_text())["step"])


def _warn_fallback(chosen: Path, problems: list[str]) -> None:
    if problems:
        logger.warning(
            "checkpoint %s is unusable (%s); resuming from %s instead",
            chosen.parent / LAST,
            "; ".join(problems),
            chosen,
        )


def _no_usable_checkpoint(output_dir, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{Path(output_dir) / 'checkpoints'}: no usable checkpoint to resume from ({'; '.join(problems)}); "
        "the files were left untouched: move them away to start over"
    )


class CheckpointManager:
    """Writes, finds and restores the `last` / `previous` checkpoints of one run (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, ctx: DistributedContext):
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.ctx = ctx

    def latest(self) -> Path | None:
        """The newest verified checkpoint, or None when there is none (`latest_checkpoint`)."""
        return latest_checkpoint(self.output_dir)

    def save(
        self,
        *,
        models: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: Mapping[str, Any],
        generators: Mapping[str, torch.Generator] | None = None,
        optimizer_model: nn.Module | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path | None:
        """Writes a checkpoint atomically (a collective: call on every rank); returns its path on rank 0.

        `models` maps a file stem to a module; `optimizer_model` holds every parameter the optimizer updates
        (used to gather FSDP2 optimizer state). `extra` holds more plain data (containers, numbers, strings,
        tensors) for `extra.pt`. Refuses (returns None, with a warning) when a parameter is not finite.
        """
        if not models_finite(models, self.ctx):
            logger.warning(
                "not writing a checkpoint at step %s: the parameters are not finite",
                trainer_state.get("step"),
            )
            return None

        model_states = {name: full_model_state(model) for name, model in models.items()}
        optimizer_state = full_optimizer_state(optimizer, optimizer_model)
        tmp = self.root / f".tmp-step{trainer_state.get('step', 0)}"
        if self.ctx.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.ctx.barrier()

        rng_path = tmp / f"rng_rank{self.ctx.rank}.pt"
        torch.save(rng_state(generators), rng_path)
        _fsync_file(rng_path)
        if self.ctx.is_main:
            written = []
            for name, state in model_states.items():
                save_safetensors(state, tmp / f"{name}.safetensors")
                written.append(tmp / f"{name}.safetensors")
            torch.save(optimizer_state, tmp / "optimizer.pt")
            written.append(tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                written.append(tmp / "scheduler.pt")
            if extra:
                torch.save(dict(extra), tmp / "extra.pt")
                written.append(tmp / "extra.pt")
            with open(tmp / TRAINER_STATE, "w") as handle:
                json.dump(dict(trainer_state, world_size=self.ctx.world_size), handle, indent=1)
            written.append(tmp / TRAINER_STATE)
            for path in written:
                _fsync_file(path)
        self.ctx.barrier()  # every rank's RNG file is in place before the manifest lists them

        final = self.root / LAST
        if self.ctx.is_main:
            write_manifest(tmp)
            _fsync_dir(tmp)
            trash = self.root / ".trash"
            if trash.exists():
                shutil.rmtree(trash)
            if final.exists():  # without `last` (a crash mid-rotation), `previous` is the newest: keep it
                if (self.root / PREVIOUS).exists():
                    os.replace(self.root / PREVIOUS, trash)
                os.replace(final, self.root / PREVIOUS)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            if trash.exists():
                shutil.rmtree(trash)
        self.ctx.barrier()
        return final if self.ctx.is_main else None

    def read_latest(self, model_names: Sequence[str]) -> CheckpointData | None:
        """The newest checkpoint that verifies and reads whole, or None when the run has none; a damaged
        `last` falls back to `previous` with a warning, CheckpointError when neither is usable."""
        problems = []
        for candidate in checkpoint_candidates(self.output_dir):
            try:
                data = read_checkpoint(candidate, model_names, self.ctx.rank, self.ctx.world_size)
            except CheckpointError as error:
                problems.append(f"{candidate.name}/: {str(error).removeprefix(f'{candidate}: ')}")
                continue
            _warn_fallback(candidate, problems)
            return data
        if problems:
            raise _no_usable_checkpoint(self.output_dir, problems)
        return None

    def apply(
        self,
        data: CheckpointData,
        *,
        models: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generators: Mapping[str, torch.Generator] | None = None,
        optimizer_model: nn.Module | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores models, optimizer, scheduler and RNG states from `data`; returns (trainer_state, extra).

        CheckpointError when the checkpoint does not fit (another model, another optimizer set-up)."""
        try:
            for name, model in models.items():
                load_full_model_state(model, data.models[name])
            load_full_optimizer_state(optimizer, optimizer_model, data.optimizer)
            if scheduler is not None and data.scheduler is not None:
                scheduler.load_state_dict(data.scheduler)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            raise CheckpointError(
                f"{data.path}: does not fit the models being trained ({type(error).__name__}: {_brief(error)})"
            ) from None
        saved_world = data.trainer_state.get("world_size", 1)
        if saved_world == self.ctx.world_size and data.rng is not None:
            try:
                set_rng_state(data.rng, generators)
            except (RuntimeError, ValueError, KeyError, TypeError) as error:
                raise CheckpointError(
                    f"{data.path}: bad RNG state ({type(error).__name__}: {error})"
                ) from None
        else:
            logger.warning(
                "resuming on %d processes from a checkpoint of %d: RNG streams restart from the seed",
                self.ctx.world_size,
                saved_world,
            )
        return data.trainer_state, data.extra

    def load(self, path: Path, **restore: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Verifies, reads and restores the checkpoint at `path` (`restore`: the keywords of `apply`);
        returns (trainer_state, extra)."""
        data = read_checkpoint(path, list(restore["models"]), self.ctx.rank, self.ctx.world_size)
        return self.apply(data, **restore)
