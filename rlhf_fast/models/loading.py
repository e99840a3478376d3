"""Loading the models a trainer runs, and setting them up for training: special-token ids, precision,
activation checkpointing and LoRA adapters. The one home of these choices; every trainer calls here.

Precision (`dtype`, "auto" = bfloat16 on CUDA, float32 on a CPU): **autocast with fp32 master weights.**
A trained model keeps its parameters in float32 (they are the master weights: the optimizer state, the
gradients and the checkpoints stay float32, so resume is exact and DDP / FSDP2 reduce float32 gradients),
and its forward runs under `torch.autocast(dtype)`, so the matmuls read bfloat16 copies of the weights.
A frozen model (the PPO reference, the reward model, the frozen base under LoRA adapters) needs no master
copy and is stored in `dtype` itself. The alternative, bfloat16 parameters with an fp32 copy inside the
optimizer, takes the same 16 bytes per trained parameter (2 + 2 grad + 4 master + 8 Adam vs 4 + 4 + 8, plus
autocast's 2-byte weight copies held for backward), but accumulates gradients in bfloat16, and the master copy
would live outside the model state that checkpoints and FSDP2's state-dict helpers already handle; autocast
keeps all of that unchanged. The fused ops keep fp32 accumulation whatever they are given (a bfloat16 hidden
state and LM head for a frozen model; under autocast the final norm's output and the head are float32).
float16 works the same way but without loss scaling: prefer bfloat16. Measured on the CPU development
machine (2026-12-04, one thread, interleaved A/B, min of 5): an SFT step of a 4-layer 384-wide GPT-2 on
8 × 96 tokens took 0.66× the float32 step's time under bfloat16 autocast (median 0.71×), and the peak memory
of a 6-layer 512-wide one on 4 × 128 tokens was 0.94× float32's (517 vs 550 MiB, tests/trainers/measure_peak.py).

Activation checkpointing (`gradient_checkpointing`): each transformer block's forward is wrapped in
`torch.utils.checkpoint` (non-reentrant), independently of the model's train / eval mode (PPO runs its
models in eval mode: no dropout), and only while gradients are recorded (scoring and sampling run as before).

LoRA (`lora: {r, alpha, dropout, target_modules}`, needs `pip install rlhf-fast[lora]`, i.e. `peft`):
adapters are injected into the model in place (the model keeps its class, so the backbone / LM-head split
and the fused ops are unchanged); the base stays frozen in `dtype`, the adapters train in float32. A model
with adapters can run with them switched off (`adapters_disabled`): PPO's reference policy is the policy's
own base, and the value model may be a LoRA head on the reward model's base, so neither costs a second copy
of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class LoRAConfig:
    """LoRA adapters (Hu et al., 2021) on the trained models: W + (alpha / r) · B A, A [r, d_in], B [d_out, r]."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture (e.g. q_proj, v_proj)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


# ---------------------------------------------------------------------------------------------- loading


def load_policy(policy):
    """A `PolicyModel` from a `PolicyModel`, a transformers causal LM, or a model directory."""
    from rlhf_fast.models import PolicyModel

    if isinstance(policy, (str, os.PathLike)):
        return PolicyModel.from_pretrained(policy)
    if not isinstance(policy, PolicyModel):
        if hasattr(policy, "get_output_embeddings"):
            return PolicyModel(policy)
        raise ValueError(
            "policy must be a PolicyModel, a transformers causal LM or a directory, got "
            f"{type(policy).__name__}"
        )
    return policy


def load_reward_model(model):
    """A `RewardModel` as given, or a fresh one initialized from an SFT model (`RewardModel.from_policy`)."""
    from rlhf_fast.models import RewardModel

    if isinstance(model, RewardModel):
        return model
    return RewardModel.from_policy(model)


def resolve_pad_token_id(pad_token_id: int | None, tokenizer, config) -> int:
    """The pad id: as given, else the tokenizer's, else the model config's."""
    if pad_token_id is not None:
        return int(pad_token_id)
    for source in (tokenizer, config):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    raise ValueError(
        "pad_token_id is unknown: pass pad_token_id=, or a tokenizer / model config that has one"
    )


def resolve_eos_token_id(eos_token_id: int | None, tokenizer, config) -> int:
    """The end-of-sequence id: as given, else the tokenizer's, else the model config's (first of a list)."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0] if eos_token_id else None
    if eos_token_id is None:
        raise ValueError("eos_token_id is unknown: pass eos_token_id= or a tokenizer that has one")
    return int(eos_token_id)


# -------------------------------------------------------------------------------------------- precision


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """`dtype` ("float32" | "bfloat16" | "float16" | "auto") as a torch dtype; "auto": bfloat16 on CUDA, else
    float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _hf_parts(model: nn.Module) -> list[nn.Module]:
    """The transformers models inside one of ours: a policy's causal LM, a reward / value model's backbone."""
    hf_model = getattr(model, "hf_model", None)
    if hf_model is not None:
        return [hf_model]
    backbone = getattr(model, "backbone", None)
    return [backbone] if isinstance(backbone, nn.Module) else [model]


def store_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A model that is never trained, in `dtype` (a reward model's scalar head stays float32), frozen."""
    for part in _hf_parts(model):
        part.to(dtype)
    return model.requires_grad_(False)


def autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Runs every forward of `module` under `torch.autocast(device_type, dtype)` (forward hooks: the module and
    its state-dict keys stay as they are, and DDP / FSDP2 wrappers call through them). No-op for float32."""
    if dtype == torch.float32:
        return
    contexts: list = []

    def enter(_module, _args):
        context = torch.autocast(device_type, dtype=dtype)
        context.__enter__()
        contexts.append(context)

    def leave(_module, _args, _output):
        if contexts:
            contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


# ------------------------------------------------------------------------------- activation checkpointing


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recomputes each transformer block's activations in backward instead of keeping them (non-reentrant
    `torch.utils.checkpoint`). Works in eval mode too; skipped when no gradient is recorded. Returns the
    number of blocks wrapped."""
    from rlhf_fast.models._common import transformer_blocks

    blocks = transformer_blocks(model)
    for block in blocks:
        if getattr(block, "_rlhf_fast_checkpointed", False):
            continue
        forward = block.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        block._rlhf_fast_checkpointed = True
    return len(blocks)


# ------------------------------------------------------------------------------------------------ LoRA

# The peft wrapper of each model that carries adapters (keyed by the transformers model they were put in).
_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(
            "lora needs the peft package: pip install 'rlhf-fast[lora]' (or pip install peft)"
        ) from None
    return peft


def add_lora(model: nn.Module, lora: LoRAConfig) -> nn.Module:
    """Injects LoRA adapters into `model`'s transformers part, in place: the base weights are frozen, the adapters
    (float32) train. A scalar head, if any, stays trainable. Returns `model`."""
    peft = _peft()
    (part,) = _hf_parts(model)
    if part in _ADAPTERS:
        raise ValueError(f"{type(part).__name__} already carries LoRA adapters")
    with torch.device("meta"):  # the adapter-free architecture, for the merged export (no weights copied)
        skeleton = type(part)(part.config)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else None,
        bias="none",
    )
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft switches fan_in_fan_out on, and says so
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            wrapper = peft.get_peft_model(part, config)
    except ValueError as error:
        raise ValueError(f"lora: {error}") from None
    for name, parameter in part.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
    _ADAPTERS[part] = (wrapper, skeleton)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(part in _ADAPTERS for part in _hf_parts(model))


def lora_wrapper(model: nn.Module):
    """(peft model, adapter-free meta skeleton) of a model set up by `add_lora`, or None."""
    for part in _hf_parts(model):
        if part in _ADAPTERS:
            return _ADAPTERS[part]
    return None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Runs `model` as its base, adapters off (no-op for a model without adapters)."""
    found = lora_wrapper(model)
    if found is None:
        yield
        return
    with found[0].disable_adapter():
        yield


class WithoutAdapters(nn.Module):
    """`module`'s forward with the adapters of `model` switched off: the base model, sharing its weights."""

    def __init__(self, module: nn.Module, model: nn.Module):
        super().__init__()
        self.module = module
        self._model = [model]  # not a submodule: its parameters belong to `module` already

    def forward(self, *args, **kwargs):
        with adapters_disabled(self._model[0]):
            return self.module(*args, **kwargs)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the adapter-free architecture with the adapters folded into the base weights
    (W + scale · B A, computed out of place in float32 and cast back), keys as before `add_lora`."""
    found = lora_wrapper(model)
    (part,) = _hf_parts(model)
    if found is None:
        return part.state_dict()
    peft = _peft()
    merged = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in part.state_dict().items()
        if "lora_" not in name
    }
    for name, layer in part.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            key = f"{name}.weight"
            delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in layer.lora_A)
            merged[key] = (merged[key].float() + delta).to(merged[key].dtype)
    return merged


def adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapters alone, keyed as peft saves them (`PeftModel.from_pretrained` loads them)."""
    peft = _peft()
    wrapper, _ = lora_wrapper(model)
    if state is not None:
        state = {f"base_model.model.{name}": tensor for name, tensor in state.items()}
    return peft.get_peft_model_state_dict(wrapper, state_dict=state)


def save_adapter(model: nn.Module, directory: str | os.PathLike, state: dict | None = None) -> None:
    """Writes the adapters alone (adapter_config.json + adapter_model.safetensors, peft's layout)."""
    from safetensors.torch import save_file

    wrapper, _ = lora_wrapper(model)
    os.makedirs(directory, exist_ok=True)
    wrapper.peft_config["default"].save_pretrained(os.fspath(directory))
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model, state).items()}
    save_file(
        tensors, os.path.join(os.fspath(directory), "adapter_model.safetensors"), metadata={"format": "pt"}
    )


# -------------------------------------------------------------------------------------- trainer set-up


@dataclasses.dataclass
class Precision:
    """How a trainer runs its models: the compute dtype, where, and the training-time options."""

    dtype: torch.dtype
    device: torch.device
    gradient_checkpointing: bool = False
    lora: LoRAConfig | None = None

    @classmethod
    def from_config(cls, config, device: torch.device) -> Precision:
        return cls(
            dtype=resolve_dtype(getattr(config, "dtype", "auto"), device),
            device=torch.device(device),
            gradient_checkpointing=bool(getattr(config, "gradient_checkpointing", False)),
            lora=getattr(config, "lora", None),
        )


def prepare_trained(model: nn.Module, precision: Precision, *, lora: bool = True) -> nn.Module:
    """A model about to be trained: on the device, adapters added (with `precision.lora` and `lora`; the base is
    then frozen in the compute dtype), otherwise its parameters in float32 (the master weights), and
    activation checkpointing if asked. The forward runs under autocast once `autocast_forward` is applied
    to the module the trainer calls."""
    model.to(precision.device)
    if precision.lora is not None and lora:
        for part in _hf_parts(model):
            part.to(precision.dtype)
        add_lora(model, precision.lora)
    else:
        model.float()
    if precision.gradient_checkpointing:
        for part in _hf_parts(model):
            enable_gradient_checkpointing(part)
    return model


def trained_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def shared_base_value_model(reward_model, precision: Precision):
    """PPO's value model as a LoRA head on the reward model's base: the reward model's backbone (frozen, in the
    compute dtype) with value adapters injected, and a copy of its head (float32, trained). The reward model must
    then be run with the adapters off (`adapters_disabled`)."""
    import copy

    from rlhf_fast.models import ValueModel

    reward_model.backbone.to(precision.device, precision.dtype)
    value = ValueModel(reward_model.backbone, copy.deepcopy(reward_model.head))
    value.head.requires_grad_(True)
    add_lora(value, precision.lora)
    if precision.gradient_checkpointing:
        enable_gradient_checkpointing(value.backbone)
    return value


def same_vocabulary(first, second) -> bool:
    """True when two tokenizers map every token to the same id (no re-encoding needed)."""
    if first is None or second is None or first is second:
        return True
    return first.get_vocab() == second.get_vocab()


def reencode_for_reward(
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    response_width: int,
    eos_token_id: int,
    tokenizer,
    reward_tokenizer,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy token rows [B, P+T] (the last `response_width` columns the response) as the reward model's
    tokenizer encodes the same text: prompt ids + response ids (without a trailing `eos_token_id`) + its eos,
    as the data layer encodes a ranking's completion, whether or not the response ended. Decoding and
    encoding are one batched call each; returns right-padded ids [B, L'] int64 and their mask [B, L'] bool,
    on the CPU."""
    from rlhf_fast.data.encode import tokenize_texts

    prompts, responses = [], []
    for row, mask in zip(sequences.tolist(), attention_mask.tolist()):
        prompt = [t for t, m in zip(row[:-response_width], mask[:-response_width]) if m]
        response = [t for t, m in zip(row[-response_width:], mask[-response_width:]) if m]
        prompts.append(prompt)
        responses.append(response[:-1] if response and response[-1] == eos_token_id else response)
    decode = functools.partial(tokenizer.batch_decode, skip_special_tokens=True)
    prompt_ids = tokenize_texts(reward_tokenizer, decode(prompts))
    response_ids = tokenize_texts(reward_tokenizer, decode(responses))
    eos = reward_tokenizer.eos_token_id
    pad = reward_tokenizer.pad_token_id if reward_tokenizer.pad_token_id is not None else 0
    rows = [p + r + ([eos] if eos is not None else []) for p, r in zip(prompt_ids, response_ids)]
    rows = [row or [pad] for row in rows]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.as_tensor(row)
        mask[index, : len(row)] = True
    return ids, mask


def check_token_ids(model, sequences) -> None:
    """Every token id lies in the model's vocabulary: checked once over the data, so the training steps can run
    the ops without their per-step value checks."""
    vocab = model.get_input_embeddings().num_embeddings
    for index, ids in enumerate(sequences):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(
                f"item {index} holds token id {min(ids) if min(ids) < 0 else max(ids)}, outside the model's "
                f"vocabulary [0, {vocab}): was the data encoded with this model's tokenizer?"
            )


__all__ = [
    "DTYPES",
    "LoRAConfig",
    "Precision",
    "WithoutAdapters",
    "adapters_disabled",
    "add_lora",
    "autocast_forward",
    "check_token_ids",
    "enable_gradient_checkpointing",
    "has_lora",
    "load_policy",
    "load_reward_model",
    "merged_state_dict",
    "prepare_trained",
    "reencode_for_reward",
    "resolve_dtype",
    "resolve_eos_token_id",
    "resolve_pad_token_id",
    "same_vocabulary",
    "save_adapter",
    "shared_base_value_model",
    "store_frozen",
]
