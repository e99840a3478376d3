"""Atomic, resumable training checkpoints.

Layout under `<output_dir>/checkpoints/`:

    last/                      the newest complete checkpoint
        <name>.safetensors     each model's full state dict (tied tensors stored once, see `ALIAS_PREFIX`)
        optimizer.pt           optimizer state (full, unsharded)
        scheduler.pt           LR scheduler state
        rng_rank<r>.pt         python / numpy / torch / CUDA RNG states and named generators, one per rank
        trainer_state.json     step, epoch, data position, KL controller, ... (whatever the trainer passes)
    previous/                  the one before

A checkpoint is written into a temporary directory in the same parent, every file and the directory are
fsynced, and only then is it renamed into place (rename is atomic on POSIX). The rotation is
`previous -> trash`, `last -> previous`, `tmp -> last`: a crash at any point leaves `last` or `previous`
holding a complete checkpoint, and `latest()` takes `last` first.

A state with a non-finite parameter is never written, so a NaN cannot replace the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_fast.trainers.distributed import DistributedContext, is_fsdp, unwrap_model

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
        for alias, canonical in _tied_aliases(model).items():  # FSDP2 lists a tied weight once
            if alias not in state and canonical in state:
                state[alias] = state[canonical]
        return state
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def _tied_aliases(model: nn.Module) -> dict[str, str]:
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

        aliases = _tied_aliases(model)
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
    """Every RNG a training step may draw from: python, numpy, torch CPU, each CUDA device, named generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


class CheckpointManager:
    """Writes and finds the `last` / `previous` checkpoints of one run (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, ctx: DistributedContext):
        self.root = Path(output_dir) / "checkpoints"
        self.ctx = ctx

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        for name in (LAST, PREVIOUS):
            candidate = self.root / name
            if (candidate / "trainer_state.json").is_file():
                return candidate
        return None

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
        (used to gather FSDP2 optimizer state). `extra` holds more picklable objects for `extra.pt`.
        Refuses (returns None, with a warning) when a parameter is not finite.
        """
        ok = torch.tensor([1.0 if all_finite(models) else 0.0], device=self.ctx.device)
        if self.ctx.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1.0:
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
            with open(tmp / "trainer_state.json", "w") as handle:
                json.dump(dict(trainer_state, world_size=self.ctx.world_size), handle, indent=1)
            written.append(tmp / "trainer_state.json")
            for path in written:
                _fsync_file(path)
        self.ctx.barrier()

        final = self.root / LAST
        if self.ctx.is_main:
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

    def load(
        self,
        path: Path,
        *,
        models: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generators: Mapping[str, torch.Generator] | None = None,
        optimizer_model: nn.Module | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores models, optimizer, scheduler and RNG states; returns (trainer_state, extra)."""
        path = Path(path)
        with open(path / "trainer_state.json") as handle:
            trainer_state = json.load(handle)
        saved_world = trainer_state.get("world_size", 1)
        for name, model in models.items():
            load_full_model_state(model, load_safetensors(path / f"{name}.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        load_full_optimizer_state(optimizer, optimizer_model, optimizer_state)
        if scheduler is not None and (path / "scheduler.pt").is_file():
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_path = path / f"rng_rank{self.ctx.rank}.pt"
        if saved_world == self.ctx.world_size and rng_path.is_file():
            set_rng_state(torch.load(rng_path, weights_only=False), generators)
        else:
            logger.warning(
                "resuming on %d processes from a checkpoint of %d: RNG streams restart from the seed",
                self.ctx.world_size,
                saved_world,
            )
        extra = torch.load(path / "extra.pt", weights_only=False) if (path / "extra.pt").is_file() else {}
        return trainer_state, extra


# ----------------------------------------------------------------------------------------------------------
# final export


def meta_skeleton(model: nn.Module) -> nn.Module | None:
    """A parameter-free (meta device) copy of `model`, kept before FSDP2 shards it so the trained weights can
    be exported with the model's own `save_pretrained` afterwards."""
    import copy

    try:
        return copy.deepcopy(model).to("meta")
    except (TypeError, RuntimeError, AttributeError):  # pragma: no cover - a model that cannot be deep-copied
        return None


def export_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    ctx: DistributedContext,
    *,
    tokenizer=None,
    skeleton: nn.Module | None = None,
    prefix: str = "",
    state_source: nn.Module | None = None,
) -> None:
    """Writes `model` with its own `save_pretrained(directory, tokenizer)` on rank 0 (a collective under FSDP2).

    Under FSDP2 the full state is gathered from `state_source` (the sharded module holding `model`, whose keys
    carry `prefix`) and loaded, strictly, into `skeleton` (see `meta_skeleton`), which is then saved: a key the
    skeleton expects but the gathered state lacks is an error, never an uninitialized weight written out.
    A model with LoRA adapters is written merged (adapters folded into the base weights, the architecture
    as before the adapters) and its adapters alone go to `directory/adapter` (peft's layout).
    """
    from rlhf_fast.models.loading import has_lora

    source = state_source if state_source is not None else model
    if any(is_fsdp(m) for m in unwrap_model(source).modules()):
        if skeleton is None:
            raise ValueError("exporting an FSDP2-sharded model needs the meta skeleton taken before sharding")
        state = full_model_state(source)
        if ctx.is_main:
            state = {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}
            replica = skeleton.to_empty(device="cpu")
            load_strictly(replica, state, what=f"the gathered state of {type(model).__name__}")
            _copy_python_attributes(model, replica)
            replica.save_pretrained(os.fspath(directory), tokenizer=tokenizer)
        ctx.barrier()
        return
    if ctx.is_main:
        if has_lora(unwrap_model(model)):
            _export_lora(unwrap_model(model), directory, tokenizer)
        else:
            unwrap_model(model).save_pretrained(os.fspath(directory), tokenizer=tokenizer)
    ctx.barrier()


def load_strictly(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """`model.load_state_dict(state)`, failing on a missing or unexpected key (a tied weight may come under
    either of its names)."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    aliases = _tied_aliases(model)
    reverse = {canonical: alias for alias, canonical in aliases.items()}
    missing = [name for name in missing if not (aliases.get(name) in state or reverse.get(name) in state)]
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing {sorted(missing)[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )


def _export_lora(model: nn.Module, directory: str | os.PathLike, tokenizer) -> None:
    """The merged model (a fresh adapter-free replica on the CPU, loaded strictly) and `adapter/`."""
    import copy

    from rlhf_fast.models.loading import lora_wrapper, merged_state_dict, save_adapter

    _, skeleton = lora_wrapper(model)
    replica = copy.deepcopy(skeleton).to_empty(device="cpu")
    merged = {name: tensor.detach().cpu() for name, tensor in merged_state_dict(model).items()}
    load_strictly(replica, merged, what="the merged LoRA state")
    if hasattr(model, "hf_model"):
        exported = type(model)(replica)
    else:  # a backbone with a scalar head (reward / value model)
        exported = type(model)(replica, copy.deepcopy(model.head).cpu())
        _copy_python_attributes(model, exported)
    exported.save_pretrained(os.fspath(directory), tokenizer=tokenizer)
    save_adapter(model, os.path.join(os.fspath(directory), "adapter"))


def _copy_python_attributes(source: nn.Module, target: nn.Module) -> None:
    """Carries plain (non-tensor) settings such as a reward model's normalization offset to the replica."""
    for name, value in vars(source).items():
        if (
            not name.startswith("_modules")
            and isinstance(value, (int, float, str, bool))
            and hasattr(target, name)
        ):
            setattr(target, name, value)
