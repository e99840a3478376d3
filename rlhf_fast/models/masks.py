"""Attention masks and position ids: the one home of both. Every layer above asks this module for them.

Two forms reach the models:
- the common case, a [B, L] padding mask (padding on either side) and position ids from it, passed to the
  backbone as they are: transformers then picks the attention kernel (on a GPU, SDPA's fused kernels; a batch
  without padding takes the causal flash path with no mask at all). On a CPU the prepared 4-D mask measured no
  faster (a 32 x 80 forward: 41 vs 44 ms without gradients, 184 vs 188 ms with, within the noise).
- packing and anything else that is not a padded causal batch: a prepared [B, 1, L, L] mask
  (``packed_causal_mask`` for block-diagonal documents, ``shared_prefix_causal_mask`` for continuations that
  share one prompt), which transformers passes through unchanged. Position ids must then be given, because
  they cannot be read back from it.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among its row's real tokens.

    attention_mask: [B, L] bool/int (nonzero = real token). Returns [B, L] int64: ``cumsum - 1`` clamped at 0, so a
    left-padded row sees positions 0, 1, ... from its first real token, exactly as the unpadded sequence would.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, S] bool (query, key; True = may attend) -> [B, 1, L, S] ``dtype``: 0 where allowed, else the
    dtype's minimum."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


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
    return additive_mask(allowed, dtype)


def packed_causal_allowed(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] document ids (-1 = padding) -> [B, L, L] bool, True where query q may attend to key k: a query
    sees the keys of its own document at or before it; a padding position sees only itself (no empty softmax
    row, which would give NaN), and no real token sees padding."""
    return _segment_causal_allowed(document_ids, "document_ids", shared_prefix=False)


def packed_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] document ids (-1 = padding) -> [B, 1, L, L] additive block-diagonal causal mask
    (`packed_causal_allowed`)."""
    return additive_mask(packed_causal_allowed(document_ids), dtype)


def shared_prefix_causal_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] segment ids (0 = a prefix all segments share, 1, 2, ... = the segments after it, -1 = padding)
    -> [B, L, L] bool, True where query q may attend to key k: a query sees the keys at or before it in the
    shared prefix or in its own segment, so each segment reads as if the prefix alone came before it (the K
    completions of one prompt, `rlhf_fast.data.collate_rankings_shared_prompt`). A padding position sees
    only itself."""
    return _segment_causal_allowed(segment_ids, "segment_ids", shared_prefix=True)


def _segment_causal_allowed(ids: torch.Tensor, name: str, *, shared_prefix: bool) -> torch.Tensor:
    """[B, L] ids (-1 = padding) -> [B, L, L] bool: a real query sees the keys at or before it with its own
    id, and with `shared_prefix` those with id 0 too; a padding query sees only itself."""
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [B, L], got shape {tuple(ids.shape)}")
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
    real = ids >= 0
    visible = ids[:, :, None] == ids[:, None, :]
    if shared_prefix:
        visible = visible | (ids == 0)[:, None, :]
    allowed = visible & causal & real[:, :, None]
    diagonal = torch.eye(length, dtype=torch.bool, device=ids.device)
    return allowed | (diagonal & ~real[:, :, None])


def shared_prefix_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] segment ids -> [B, 1, L, L] additive mask (`shared_prefix_causal_allowed`)."""
    return additive_mask(shared_prefix_causal_allowed(segment_ids), dtype)


def attention_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(attention mask, position ids) as the backbone is given them, from what a caller passed.

    attention_mask: None, [B, L] bool/int (1 = real token, any padding side; position ids default to
    ``position_ids_from_mask``), or a prepared [B, 1, L, L] mask (additive in any floating dtype, or bool with
    True = may attend), which needs ``position_ids`` [B, L]. A [B, L] mask goes on as it is.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return None, position_ids
    if attention_mask.dim() == 4:
        check_position_ids(position_ids, input_ids)
        return as_model_mask(attention_mask, input_ids, dtype), position_ids
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)} or a "
            f"prepared [B, 1, L, L] mask"
        )
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    return attention_mask, position_ids


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


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of `model`'s floating parameters: the one a prepared mask for it is built in."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def reads_prepared_masks(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention honours a prepared [B, 1, L, L] mask: transformers' "eager" and "sdpa"
    do; the flash-attention implementations read padding only."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in (None, "eager", "sdpa")


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
