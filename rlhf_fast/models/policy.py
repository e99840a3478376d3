"""The policy: any Hugging Face causal LM, exposing final hidden states and the LM head separately.

The trainers compute per-token log-probs with the fused op from ``hidden`` and ``lm_head_weight`` so the
``[B, L, V]`` logits are never materialized; ``logits`` exists for convenience and tests.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlhf_fast.models._common import (
    backbone_hidden_states,
    backbone_of,
    check_directory,
    load_kwargs,
    use_fused_activations,
)

# Where transformers' decoder stacks keep their final norm: GPT-2, Falcon, Bloom `ln_f`; Llama, Qwen2, Mistral,
# Gemma `norm`; GPT-NeoX, OPT `final_layer_norm`; Phi `final_layernorm`.
_OUTPUT_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


class PolicyModel(nn.Module):
    """A causal LM split into a backbone (to the final norm) and an LM head.

    Args:
        hf_model: an ``AutoModelForCausalLM`` instance (GPT-2, GPT-NeoX/Pythia, Llama, Qwen2, ...).
    """

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        if not isinstance(hf_model, PreTrainedModel):
            raise ValueError(
                f"hf_model must be a transformers PreTrainedModel, got {type(hf_model).__name__}"
            )
        if hf_model.get_output_embeddings() is None:
            raise ValueError(
                f"hf_model ({type(hf_model).__name__}) has no LM head; load it with AutoModelForCausalLM"
            )
        _check_plain_lm_head(hf_model.config)
        self.hf_model = hf_model
        backbone_of(hf_model)  # fails early on a model without a separate decoder stack
        use_fused_activations(hf_model)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
    ) -> PolicyModel:
        """Loads a local Hugging Face causal LM directory (safetensors only)."""
        path = check_directory("path", path)
        return cls(AutoModelForCausalLM.from_pretrained(path, **load_kwargs(dtype, trust_remote_code)))

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> None:
        """Writes an HF directory (config + safetensors) that ``AutoModelForCausalLM.from_pretrained`` opens,
        plus the tokenizer files if a tokenizer is given."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.hf_model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    # --------------------------------------------------------------------------------------------- structure
    @property
    def config(self):
        return self.hf_model.config

    @property
    def backbone(self) -> PreTrainedModel:
        """The decoder stack; its ``last_hidden_state`` is taken after the final norm."""
        return backbone_of(self.hf_model)

    @property
    def output_norm(self) -> nn.Module:
        """The normalization layer the LM head reads (GPT-2 ``ln_f``, Llama / Qwen2 ``norm``, GPT-NeoX
        ``final_layer_norm``, ...). Its gain scales the hidden state the head reads: raised uniformly, it sharpens
        every next-token distribution, as a lower sampling temperature does (exactly so for a norm without bias)."""
        backbone = self.backbone
        for holder in (backbone, getattr(backbone, "decoder", None)):  # OPT keeps its stack in `decoder`
            for name in _OUTPUT_NORM_NAMES:
                module = getattr(holder, name, None)
                gain = getattr(module, "weight", None)
                if isinstance(module, nn.Module) and isinstance(gain, nn.Parameter):
                    return module
        raise ValueError(
            f"{type(backbone).__name__} has none of {', '.join(_OUTPUT_NORM_NAMES)}: no output norm found"
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, d]. With tied embeddings this is the input embedding matrix itself, so gradients through it
        reach the embedding."""
        return self.hf_model.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """[V] or None."""
        return getattr(self.hf_model.get_output_embeddings(), "bias", None)

    # ------------------------------------------------------------------------------------------------ compute
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        outputs_at: slice | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states, without the LM head.

        input_ids: [B, L] int64. attention_mask: [B, L] bool/int (1 = real token), any padding side; or a prepared
        [B, 1, L, L] mask (``causal_mask``: additive in any floating dtype, or bool with True = may attend), which
        transformers uses as it is, without reading the padding back to the host.
        position_ids: [B, L] int64; with a 2-D mask computed from it by default (cumsum - 1, clamped), so a
        left-padded row gets the same hidden states as the unpadded sequence; required with a 4-D mask.
        Returns [B, L, d] in the model's dtype; with ``outputs_at`` only the positions read (a slice: [B, R, d];
        an index per row: [B, d]; see ``backbone_hidden_states``).
        """
        return backbone_hidden_states(self.backbone, input_ids, attention_mask, position_ids, outputs_at)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., d] -> logits [..., V] = hidden @ W.T + b, in the model's dtype."""
        return nn.functional.linear(hidden, self.lm_head_weight, self.lm_head_bias)


def _check_plain_lm_head(config) -> None:
    """Logits must be exactly ``hidden @ W.T + b``: models that scale or soft-cap them are refused."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap is not None or (scale is not None and scale != 1):
        raise ValueError(
            f"{type(config).__name__} post-processes its logits (final_logit_softcapping={softcap}, "
            f"logit_scale={scale}); PolicyModel supports only logits = hidden @ lm_head_weight.T + lm_head_bias"
        )
