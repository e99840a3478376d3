"""Prepared 4-D attention masks: the form the models pass to transformers unchanged.

With a 2-D padding mask, transformers builds the 4-D mask itself and inspects the padding on the host on its way
(``padding_mask.all()`` and similar), a device synchronization on every forward. A mask that is already
``[B, 1, L, L]`` is passed through as it is, so a caller that prepares it once (``causal_mask``) keeps the forward
free of host reads. The models accept either form; with a 4-D mask the position ids must be given
(``position_ids_from_mask`` of the 2-D mask), because they cannot be read back from it.
"""

from __future__ import annotations

import torch


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive causal mask of a padded batch.

    attention_mask: [B, L] bool/int (or 0/1 floating), nonzero = real token, padding on either side.
    dtype: the floating dtype the attention scores are computed in (the model's).
    Returns [B, 1, L, L] ``dtype``: 0 where query i may attend to key j (j <= i and j is a real token),
    ``torch.finfo(dtype).min`` elsewhere. A padding query sees only itself,
    so no softmax row is empty; real queries never see padding, so their outputs equal the unpadded sequence's.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be a [B, L] tensor, got {getattr(attention_mask, 'shape', type(attention_mask))}"
        )
    if attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask must be bool, integer or 0/1 floating, got {attention_mask.dtype}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    length = attention_mask.shape[-1]
    real = attention_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=real.device)
    allowed = (causal[None] & real[:, None, :]) | diagonal[None]  # [B, L (query), L (key)]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=real.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def as_model_mask(
    attention_mask: torch.Tensor, input_ids: torch.Tensor, dtype: torch.dtype, *, name: str = "attention_mask"
) -> torch.Tensor:
    """A prepared [B, 1, L, L] mask, checked and put in the form every attention implementation reads.

    A bool mask (True = may attend) becomes additive in ``dtype`` (transformers' eager attention adds the mask to
    the scores, so a bool mask would be read as 0/1 offsets). A floating mask in another dtype is clamped to
    ``dtype``'s range and cast (SDPA wants the mask in the query's dtype). Device-side only, no host read.
    """
    batch, length = input_ids.shape
    if attention_mask.shape != (batch, 1, length, length):
        raise ValueError(
            f"{name} must be [B, L] or a prepared [B, 1, L, L] mask, i.e. {(batch, length)} or "
            f"{(batch, 1, length, length)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(f"{name} is on {attention_mask.device} but input_ids is on {input_ids.device}")
    if attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return additive.masked_fill_(~attention_mask, torch.finfo(dtype).min)
    if not attention_mask.dtype.is_floating_point:
        raise ValueError(f"a 4-D {name} must be bool or floating (additive), got {attention_mask.dtype}")
    if attention_mask.dtype == dtype:
        return attention_mask
    if (
        torch.finfo(dtype).min > torch.finfo(attention_mask.dtype).min
    ):  # narrower range: keep blocked keys finite
        attention_mask = attention_mask.clamp(min=torch.finfo(dtype).min)
    return attention_mask.to(dtype)


def check_position_ids(position_ids: torch.Tensor | None, input_ids: torch.Tensor) -> None:
    """Position ids are required with a prepared 4-D mask and must be [B, L] integers."""
    if position_ids is None:
        raise ValueError(
            "position_ids are required with a 4-D attention_mask (position_ids_from_mask of the [B, L] mask)"
        )
    if position_ids.shape != input_ids.shape or position_ids.dtype.is_floating_point:
        raise ValueError(
            f"position_ids must be an integer tensor of shape {tuple(input_ids.shape)}, got "
            f"{position_ids.dtype} {tuple(position_ids.shape)}"
        )
