"""A transformer backbone with a scalar linear head: the shared base of the reward and value models.

Saved layout (one directory):
    config.json + model.safetensors   the backbone, as ``AutoModel.from_pretrained`` opens it
    <head_file>                       the head (safetensors: ``weight`` [1, d], ``bias`` [1])
    <config_file>                     json: the head's settings (e.g. the reward normalization offset)
    tokenizer files                   when a tokenizer is given to ``save_pretrained``
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

from rlhf_fast.models._common import (
    backbone_hidden_states,
    backbone_of,
    check_directory,
    load_kwargs,
    use_fused_activations,
)


class ScalarHeadModel(nn.Module):
    """Backbone (an HF base model returning ``last_hidden_state``) + ``nn.Linear(d, 1)`` head.

    The head's parameters are kept in float32 whatever the backbone's dtype: they are tiny, and the scalar
    outputs (rewards, values) are float32.
    """

    head_file: ClassVar[str] = "head.safetensors"
    config_file: ClassVar[str] = "head_config.json"
    format_name: ClassVar[str] = "rlhf_fast.scalar_head"

    def __init__(
        self, backbone: PreTrainedModel, head: nn.Linear | None = None, *, head_init_std: float = 0.0
    ):
        super().__init__()
        if not isinstance(backbone, PreTrainedModel):
            raise ValueError(
                f"backbone must be a transformers PreTrainedModel, got {type(backbone).__name__}"
            )
        if backbone.get_output_embeddings() is not None and backbone.base_model is not backbone:
            raise ValueError(
                f"backbone is a {type(backbone).__name__} with an LM head; pass its base model "
                f"(model.base_model) or use from_causal_lm"
            )
        self.backbone = backbone
        use_fused_activations(backbone)
        hidden_size = backbone.config.hidden_size
        device = next(backbone.parameters()).device
        if head is None:
            head = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
            with torch.no_grad():
                head.weight.normal_(0.0, head_init_std) if head_init_std > 0 else head.weight.zero_()
                head.bias.zero_()
        if head.in_features != hidden_size or head.out_features != 1:
            raise ValueError(
                f"head must be Linear({hidden_size}, 1), got Linear({head.in_features}, {head.out_features})"
            )
        self.head = head.to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_causal_lm(
        cls,
        policy_model_or_path: Any,
        *,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        head_init_std: float | None = None,
    ):
        """Backbone initialized from a causal LM (a ``PolicyModel``, an HF causal LM, or a local directory); the
        LM head is dropped and a fresh head is created (std ``head_init_std``, default ``cls.default_head_std``).

        An in-memory model is deep-copied, so the new model shares no parameters with it."""
        if isinstance(policy_model_or_path, (str, os.PathLike)):
            path = check_directory("policy_model_or_path", policy_model_or_path)
            backbone = _load_backbone(path, dtype, trust_remote_code)
        else:
            hf_model = getattr(policy_model_or_path, "hf_model", policy_model_or_path)
            if not isinstance(hf_model, PreTrainedModel):
                raise ValueError(
                    "policy_model_or_path must be a PolicyModel, a transformers causal LM or a directory, "
                    f"got {type(policy_model_or_path).__name__}"
                )
            backbone = copy.deepcopy(backbone_of(hf_model))
            if dtype is not None:
                backbone = backbone.to(dtype=_as_dtype(dtype))
        std = cls.default_head_std(backbone.config.hidden_size) if head_init_std is None else head_init_std
        return cls(backbone, head_init_std=std)

    @staticmethod
    def default_head_std(hidden_size: int) -> float:
        return 0.0

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
    ):
        """Loads a directory written by ``save_pretrained``."""
        path = check_directory("path", path)
        head_path = os.path.join(path, cls.head_file)
        if not os.path.isfile(head_path):
            raise ValueError(
                f"path={path!r} has no {cls.head_file}; was it saved by {cls.__name__}.save_pretrained?"
            )
        backbone = AutoModel.from_pretrained(path, **load_kwargs(dtype, trust_remote_code))
        tensors = load_file(head_path)
        head = nn.Linear(tensors["weight"].shape[1], 1)
        head.load_state_dict(tensors)
        model = cls(backbone, head)
        config_path = os.path.join(path, cls.config_file)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                model._load_head_config(json.load(f))
        return model

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.backbone.save_pretrained(directory)
        head_state = {
            name: t.detach().to("cpu", torch.float32).contiguous()
            for name, t in self.head.state_dict().items()
        }
        save_file(head_state, os.path.join(directory, self.head_file), metadata={"format": "pt"})
        with open(os.path.join(directory, self.config_file), "w") as f:
            json.dump({"format": self.format_name, "version": 1, **self._head_config()}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def _head_config(self) -> dict:
        return {"hidden_size": self.head.in_features}

    def _load_head_config(self, config: dict) -> None:
        pass

    # --------------------------------------------------------------------------------------------- compute
    @property
    def config(self):
        return self.backbone.config

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        outputs_at: slice | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, L] ids -> [B, L, d] final hidden states (only the positions read with ``outputs_at``: a slice gives
        [B, R, d], an index per row [B, d]; see ``backbone_hidden_states``).

        attention_mask: [B, L] bool/int (position ids from it unless given) or a prepared [B, 1, L, L] mask
        (``rlhf_fast.models.causal_mask``; additive or bool), which needs ``position_ids`` [B, L].
        """
        return backbone_hidden_states(self.backbone, input_ids, attention_mask, position_ids, outputs_at)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [...] float32 (the head, computed in float32)."""
        return (
            nn.functional.linear(hidden.to(self.head.weight.dtype), self.head.weight, self.head.bias)
            .squeeze(-1)
            .float()
        )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype")
    return resolved


def _load_backbone(path: str, dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The base model of a causal-LM checkpoint. Loaded through ``AutoModelForCausalLM`` (then the LM head is
    dropped) so that any checkpoint key layout the causal-LM class accepts works."""
    lm = AutoModelForCausalLM.from_pretrained(path, **load_kwargs(dtype, trust_remote_code))
    return backbone_of(lm)


def default_reward_head_std(hidden_size: int) -> float:
    """1/sqrt(d + 1), the reward head initialization of OpenAI's lm-human-preferences."""
    return 1.0 / math.sqrt(hidden_size + 1)
