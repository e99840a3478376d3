"""Functional forwards for architectures where module-call overhead dominates small models.

A 2-layer GPT-2 forward through transformers' modules spends about a third of its time in Python between the
ops (4 x 48 tokens on one CPU thread: 3.0 ms through the modules, 2.2 ms as a flat sequence of torch ops); a
decode step, about half. For the architectures registered here the package runs the same ops on the model's
own parameters, in the same order:

- ``forward(backbone)``: the full-sequence forward ``rlhf_fast.models.backbone_hidden_states`` runs on a CPU
  (training, scoring); on a GPU transformers' path stays, which lets SDPA take its mask-free kernels.
- ``decode_step(backbone)``: the sampler's one-token step over the ``StaticCache`` buffers transformers'
  prefill filled (rlhf_fast/rollout/decode.py). On a CPU in float32 / float64 it runs as one C++ kernel
  (csrc/cpu/gpt2_decode.cpp: ATen's matmuls, every op between them a loop over the rows, attention over the
  written slots only), for which the Python step is the reference; the rollout takes about 0.6x the time
  (bench/RESULTS.md).

Both only where running the modules would do nothing more: transformers' own module classes (not peft's LoRA
layers or any other replacement), no forward hooks (FSDP2, user hooks), no gradient checkpointing, and no
dropout that would fire. Anything else goes through the modules. The tests check both paths against
transformers' (hidden states and gradients; tokens against ``generate``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GPT2Model
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block
from transformers.pytorch_utils import Conv1D

from rlhf_fast import _extension
from rlhf_fast.models._common import FusedGELUTanh, rows_at
from rlhf_fast.ops._backend import select_backend
from rlhf_fast.ops.gelu import gelu_tanh

# forward(input_ids [B, L], position_ids [B, L], mask [B, 1, L, L] additive, outputs_at=None) -> hidden [B, L, d],
# or [B, R, d] at the positions `outputs_at` reads (`rows_at`)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# step(input_ids [B, 1], position_ids [B, 1], mask [B, 1, 1, S], cache_index [1], keys, values) -> hidden [B, d]
DecodeStep = Callable[..., torch.Tensor]


def runs_as_written(backbone: nn.Module, module_types: tuple[type, ...], *, gathered: bool = False) -> bool:
    """Whether calling ``backbone``'s modules would compute exactly their parameters' plain function: every
    module of one of ``module_types`` (no replaced layer), no forward hooks or forward replaced on an
    instance, no gradient checkpointing, no dropout that would fire.

    ``gathered``: the caller holds every FSDP2 shard gathered for the duration (the sampler runs inside the
    trainers' ``unsharded``), so FSDP2's wrapping (its subclass of each sharded module, its forward hooks, which
    only gather and free shards) is set aside and the module read by its original class."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    if getattr(backbone, "gradient_checkpointing", False) and backbone.training:
        return False
    for module in backbone.modules():
        cls, hooked = type(module), bool(module._forward_hooks or module._forward_pre_hooks)
        if gathered and _fsdp_wrapped(module):
            cls, hooked = _original_class(module), False
        if cls not in module_types or hooked:
            return False
        if "forward" in vars(module):  # a forward replaced on the instance (activation checkpointing)
            return False
        if isinstance(module, nn.Dropout) and module.training and module.p > 0:
            return False
    return True


def _fsdp_wrapped(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _original_class(module: nn.Module) -> type:
    """The module's class, under FSDP2's subclass of it (``FSDP<Class>``, FSDPModule first) if it has one."""
    if not _fsdp_wrapped(module):
        return type(module)
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


# ---------------------------------------------------------------------------------------------------- GPT-2

# transformers' tanh-approximated GELUs are all the one op ``rlhf_fast.ops.gelu.gelu_tanh`` computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_GPT2_MODULES = (GPT2Model, GPT2Block, GPT2Attention, GPT2MLP, Conv1D, nn.LayerNorm, nn.Embedding, nn.Dropout,
                 nn.ModuleList, FusedGELUTanh)  # fmt: skip


def _gpt2_supported(backbone: GPT2Model, gathered: bool) -> bool:
    config = backbone.config
    if config.add_cross_attention or config.reorder_and_upcast_attn:
        return False
    if config.activation_function not in _TANH_GELUS:
        return False
    return runs_as_written(backbone, _GPT2_MODULES, gathered=gathered)


def _gpt2_blocks(
    backbone: GPT2Model, hidden: torch.Tensor, attend, outputs_at: slice | torch.Tensor | None = None
) -> torch.Tensor:
    """hidden [B, L, d] (the embeddings) through every block and the final norm. ``attend(layer, query, key,
    value, scale, reading)`` -> [B, H, q, hd] takes [B, H, q, hd] queries and [B, H, L, hd] keys and values;
    ``reading`` is True where the queries are the ``outputs_at`` rows only.

    outputs_at: None for every position's output [B, L, d]; otherwise the last block computes its queries,
    attention output and MLP only at the positions read (``rows_at``: a slice for every row, or one index per
    row), keys and values still at every position, and the result is [B, R, d] (R = 1 for an index)."""
    config = backbone.config
    width, heads = config.hidden_size, config.num_attention_heads
    head_dim = width // heads
    batch, length = hidden.shape[:2]
    last = len(backbone.h) - 1
    for layer, block in enumerate(backbone.h):
        attn, mlp = block.attn, block.mlp
        x = F.layer_norm(hidden, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        reading = layer == last and outputs_at is not None
        if reading:
            weight, bias = attn.c_attn.weight, attn.c_attn.bias
            keys_values = torch.addmm(bias[width:], x.view(-1, width), weight[:, width:])
            key, value = keys_values.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            hidden, x = rows_at(hidden, outputs_at), rows_at(x, outputs_at)
            query = torch.addmm(bias[:width], x.reshape(-1, width), weight[:, :width])
            query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        else:
            qkv = torch.addmm(attn.c_attn.bias, x.view(-1, width), attn.c_attn.weight)
            query, key, value = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(layer, query, key, value, attn.scaling, reading).transpose(1, 2).reshape(-1, width)
        hidden = torch.addmm(attn.c_proj.bias, out, attn.c_proj.weight).view_as(hidden) + hidden
        x = F.layer_norm(hidden, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        x = gelu_tanh(torch.addmm(mlp.c_fc.bias, x.view(-1, width), mlp.c_fc.weight))
        hidden = torch.addmm(mlp.c_proj.bias, x, mlp.c_proj.weight).view_as(hidden) + hidden
    return F.layer_norm(hidden, (width,), backbone.ln_f.weight, backbone.ln_f.bias, backbone.ln_f.eps)


def _gpt2_embed(backbone: GPT2Model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(input_ids, backbone.wte.weight) + F.embedding(position_ids, backbone.wpe.weight)


def _gpt2_forward(backbone: GPT2Model) -> Forward:
    def forward(input_ids, position_ids, mask, outputs_at=None) -> torch.Tensor:
        read_mask = (
            None if outputs_at is None else rows_at(mask.expand(len(input_ids), -1, -1, -1), outputs_at, 2)
        )

        def attend(layer, query, key, value, scale, reading):
            mask_rows = read_mask if reading else mask
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask_rows, scale=scale)

        return _gpt2_blocks(backbone, _gpt2_embed(backbone, input_ids, position_ids), attend, outputs_at)

    return forward


def _gpt2_step_weights(backbone: GPT2Model) -> list[torch.Tensor]:
    """The parameters in the order the compiled step takes them (csrc/ops.cpp, ``gpt2_decode_step``)."""
    weights = [backbone.wte.weight, backbone.wpe.weight]
    for block in backbone.h:
        attn, mlp = block.attn, block.mlp
        weights += [block.ln_1.weight, block.ln_1.bias, attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight,
                    attn.c_proj.bias, block.ln_2.weight, block.ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias,
                    mlp.c_proj.weight, mlp.c_proj.bias]  # fmt: skip
    return weights + [backbone.ln_f.weight, backbone.ln_f.bias]


def _compiled_step_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the step runs as the C++ kernel (csrc/cpu/gpt2_decode.cpp): CPU, float32 / float64, no autocast
    (the Python step is the reference, and the `reference` backend forces it)."""
    if (
        device.type != "cpu"
        or dtype not in (torch.float32, torch.float64)
        or torch.is_autocast_enabled("cpu")
    ):
        return False
    return select_backend("gpt2_decode_step", device, ("reference", "cpp"), ()) == "cpp"


def _gpt2_step(backbone: GPT2Model) -> DecodeStep:
    weights = _gpt2_step_weights(backbone)
    scales = [float(block.attn.scaling) for block in backbone.h]
    eps = [norm.eps for block in backbone.h for norm in (block.ln_1, block.ln_2)] + [backbone.ln_f.eps]
    # Decided once per step function (the sampler makes one per call), not on every step of the hot loop.
    compiled = _compiled_step_runs(weights[0].device, weights[0].dtype)

    def step(input_ids, position_ids, mask, cache_index, keys, values) -> torch.Tensor:
        if compiled:
            return _extension.kernels().gpt2_decode_step(
                input_ids, position_ids, mask, cache_index, keys, values, weights, scales, eps
            )

        def attend(layer, query, key, value, scale, reading):
            keys[layer].index_copy_(2, cache_index, key)
            values[layer].index_copy_(2, cache_index, value)
            return F.scaled_dot_product_attention(
                query, keys[layer], values[layer], attn_mask=mask, scale=scale
            )

        hidden = _gpt2_blocks(backbone, _gpt2_embed(backbone, input_ids, position_ids), attend)
        return hidden.view(input_ids.shape[0], -1)

    return step


class Architecture(NamedTuple):
    supported: Callable[[nn.Module, bool], bool]  # (backbone, gathered): see `runs_as_written`
    forward: Callable[[nn.Module], Forward]
    decode_step: Callable[[nn.Module], DecodeStep]


# Backbone class -> its functional forms.
ARCHITECTURES: dict[type, Architecture] = {
    GPT2Model: Architecture(_gpt2_supported, _gpt2_forward, _gpt2_step),
}


def _architecture(backbone: nn.Module, gathered: bool) -> Architecture | None:
    entry = ARCHITECTURES.get(_original_class(backbone))
    return entry if entry is not None and entry.supported(backbone, gathered) else None


def functional_forward(backbone: nn.Module) -> Forward | None:
    """The functional full-sequence forward of this backbone, or None to call its modules."""
    entry = _architecture(backbone, gathered=False)
    return None if entry is None else entry.forward(backbone)


def functional_decode_step(backbone: nn.Module) -> DecodeStep | None:
    """The functional decode step of this backbone, or None to call its modules. The sampler calls it with
    every FSDP2 shard gathered (the trainers' ``unsharded``), so FSDP2's wrapping does not stop it."""
    entry = _architecture(backbone, gathered=True)
    return None if entry is None else entry.decode_step(backbone)
