"""Functional one-token decode steps for architectures where module-call overhead dominates small models.

A decode step on a small model is mostly Python and dispatcher overhead (a 2-layer GPT-2 step through
transformers' modules costs about twice the arithmetic it wraps). For the architectures registered here the
sampler runs the decode step as a flat sequence of torch ops on the model's own parameters, reading and
writing the same ``StaticCache`` buffers that transformers' prefill filled. The prefill, and any architecture
not registered, go through the transformers modules. The tests check both paths token for token against
``generate``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F
from transformers import GPT2Model

from rlhf_fast.ops.gelu import gelu_tanh

# step(input_ids [B, 1], position_ids [B, 1], mask [B, 1, 1, S], cache_index [1], keys, values) -> hidden [B, d]
DecodeStep = Callable[..., torch.Tensor]


def _gpt2_supported(backbone: GPT2Model) -> bool:
    config = backbone.config
    return not config.add_cross_attention and not config.reorder_and_upcast_attn


# transformers' tanh-approximated GELUs, all the one op ``rlhf_fast.ops.gelu.gelu_tanh`` computes (transformers'
# own versions take several elementwise kernels).
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _activation(name: str, module_activation) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in _TANH_GELUS:
        return gelu_tanh
    if name == "gelu":
        return F.gelu
    return module_activation


def _gpt2_step(backbone: GPT2Model) -> DecodeStep:
    blocks = list(backbone.h)
    activation = _activation(backbone.config.activation_function, blocks[0].mlp.act)
    heads = backbone.config.num_attention_heads
    width = backbone.config.hidden_size
    head_dim = width // heads
    ln_f = backbone.ln_f

    def step(input_ids, position_ids, mask, cache_index, keys, values) -> torch.Tensor:
        batch = input_ids.shape[0]
        hidden = F.embedding(input_ids, backbone.wte.weight) + F.embedding(position_ids, backbone.wpe.weight)
        hidden = hidden.view(batch, width)
        for block, layer_keys, layer_values in zip(blocks, keys, values):
            attn, mlp = block.attn, block.mlp
            x = F.layer_norm(hidden, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
            qkv = torch.addmm(attn.c_attn.bias, x, attn.c_attn.weight).view(batch, 3, heads, 1, head_dim)
            query, key, value = qkv.unbind(1)  # each [B, H, 1, hd]
            layer_keys.index_copy_(2, cache_index, key)
            layer_values.index_copy_(2, cache_index, value)
            out = F.scaled_dot_product_attention(
                query, layer_keys, layer_values, attn_mask=mask, scale=attn.scaling
            )
            hidden = torch.addmm(attn.c_proj.bias, out.reshape(batch, width), attn.c_proj.weight).add_(hidden)
            x = F.layer_norm(hidden, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
            x = activation(torch.addmm(mlp.c_fc.bias, x, mlp.c_fc.weight))
            hidden = torch.addmm(mlp.c_proj.bias, x, mlp.c_proj.weight).add_(hidden)
        return F.layer_norm(hidden, (width,), ln_f.weight, ln_f.bias, ln_f.eps)

    return step


# Backbone class -> (is this configuration supported, build the step).
FAST_DECODE_STEPS: dict[
    type, tuple[Callable[[torch.nn.Module], bool], Callable[[torch.nn.Module], DecodeStep]]
] = {
    GPT2Model: (_gpt2_supported, _gpt2_step),
}


def fast_decode_step(backbone: torch.nn.Module) -> DecodeStep | None:
    """The functional decode step for this backbone, or None to use the transformers modules."""
    entry = FAST_DECODE_STEPS.get(type(backbone))
    if entry is None or not entry[0](backbone):
        return None
    return entry[1](backbone)
