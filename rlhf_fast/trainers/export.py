"""The final export: a trained model written with its own `save_pretrained` (gathered from its FSDP2 shards
into a meta skeleton taken before sharding, or merged from LoRA adapters, whose adapters go beside it)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from rlhf_fast.trainers.checkpoint import full_model_state, tied_aliases
from rlhf_fast.trainers.distributed import DistributedContext, is_fsdp, unwrap_model


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
    aliases = tied_aliases(model)
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
