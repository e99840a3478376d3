"""Helpers shared by the policy, value and reward models: loading, backbone extraction, the backbone forward."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from rlhf_fast.ops.gelu import gelu_tanh


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover (None if the config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def backbone_of(causal_lm: PreTrainedModel) -> PreTrainedModel:
    """The decoder stack of a causal LM (``transformer`` for GPT-2, ``model`` for Llama, ``gpt_neox`` for
    Pythia), which returns the final hidden states after the last norm."""
    backbone = causal_lm.base_model
    if backbone is causal_lm:
        raise ValueError(
            f"{type(causal_lm).__name__} has no separate base model (base_model_prefix="
            f"{getattr(causal_lm, 'base_model_prefix', None)!r}); expected an AutoModelForCausalLM"
        )
    return backbone


def rows_at(tensor: torch.Tensor, outputs_at: slice | torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``tensor`` [B, ..., L, ...] at the positions read along ``dim``: a slice (the same positions in every row)
    gives [B, ..., R, ...]; an index per row [B] int64 gives [B, ..., 1, ...]."""
    if isinstance(outputs_at, slice):
        return tensor[(slice(None),) * dim + (outputs_at,)]
    rows = torch.arange(tensor.shape[0], device=tensor.device)
    return tensor[(rows,) + (slice(None),) * (dim - 1) + (outputs_at,)].unsqueeze(dim)


def backbone_hidden_states(
    backbone: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    outputs_at: slice | torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states [B, L, d] of a decoder stack: the one backbone call of the package.

    attention_mask: None, [B, L] bool/int (1 = real token, any padding side; position ids default to
    ``position_ids_from_mask``), or a prepared [B, 1, L, L] mask (additive in any floating dtype, or bool with
    True = may attend; see ``rlhf_fast.models.causal_mask``), which transformers uses as it is;
    ``position_ids`` [B, L] are then required. ``rlhf_fast.models.masks.attention_inputs`` decides the form.
    On a CPU, architectures registered in ``rlhf_fast.models.functional`` skip the module calls (same ops).

    outputs_at: only the positions read: a slice of positions (every row; [B, R, d]) or one index per row [B]
    int64 ([B, d]). The registered architectures then compute their last block's queries, attention output and
    MLP at those positions only; the others compute every position and select.
    """
    from rlhf_fast.models.functional import functional_forward
    from rlhf_fast.models.masks import attention_inputs, causal_mask, position_ids_from_mask

    attention_mask, position_ids = attention_inputs(input_ids, attention_mask, position_ids, backbone.dtype)
    # On a CPU the registered architectures run as a flat sequence of ops (rlhf_fast.models.functional).
    forward = functional_forward(backbone) if input_ids.device.type == "cpu" else None
    if forward is not None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        if attention_mask.dim() == 2:
            attention_mask = causal_mask(attention_mask, backbone.dtype)
        hidden = forward(input_ids, position_ids, attention_mask, outputs_at)
    else:
        output = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = output.last_hidden_state
        if outputs_at is not None:
            hidden = rows_at(hidden, outputs_at)
    return hidden.squeeze(1) if isinstance(outputs_at, torch.Tensor) else hidden


def use_fused_activations(model: torch.nn.Module) -> int:
    """Replaces transformers' tanh-approximated GELUs ("gelu_new" and "gelu_fast" written as several
    elementwise ops, GPT-2 and its kin; "gelu_pytorch_tanh") with ``FusedGELUTanh``: the same function as one
    op (``rlhf_fast.ops.gelu``), in place. Outputs agree to rounding; on a CPU the activation was about a fifth
    of a small GPT-2's training step. The config then names the one-kernel function ("gelu_pytorch_tanh"),
    so a saved model loads with it everywhere. Returns the number of modules replaced."""
    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation, GELUTanh):
                setattr(parent, name, FusedGELUTanh())
                replaced += 1
    config = getattr(model, "config", None)
    for field in ("activation_function", "hidden_act"):
        if replaced and getattr(config, field, None) in _MULTI_OP_TANH_GELUS:
            setattr(config, field, "gelu_pytorch_tanh")
    return replaced


class FusedGELUTanh(GELUTanh):
    """transformers' ``GELUTanh`` computed by ``rlhf_fast.ops.gelu.gelu_tanh``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(input)


_MULTI_OP_TANH_GELUS = ("gelu_new", "gelu_fast")


def check_directory(name: str, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{name}={path!r} is not a directory (expected a Hugging Face model directory)")
    return path


def load_kwargs(dtype: torch.dtype | str | None, trust_remote_code: bool) -> dict:
    """Keyword arguments for ``from_pretrained``: safetensors only, remote code off unless asked."""
    kwargs = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return kwargs


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer layers of `model`: the classes a Hugging Face model names in
    `_no_split_modules`, else the elements of the longest ModuleList of identical layers."""
    block_names: set[str] = set()
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            block_names.update(names)
    if block_names:
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        if blocks:
            return blocks
    best: list[nn.Module] = []
    for module in model.modules():
        same_layers = isinstance(module, nn.ModuleList) and len({type(layer) for layer in module}) == 1
        if same_layers and len(module) > len(best):
            best = list(module)
    return best
