"""The reward model: a transformer backbone with a scalar head read at each sequence's last real token."""

from __future__ import annotations

import math

import torch

from rlhf_fast.models._scalar_head import ScalarHeadModel, default_reward_head_std


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry of each row of a [B, L] mask, whichever side the padding is on.

    Returns [B] int64 (0 for a row with no real token)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.bool().long() * positions).argmax(-1)


def ended_with_eos(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, ended: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] token rows and mask -> [B, L+1]: `eos_token_id` after the last real token of each row not
    `ended` [B] bool, padding (masked out) after the others.

    Every row a reward model trains on ends with eos and is read there; a response cut at the token limit
    read at its last token would be scored at a position the head never learned (PPO finds and exploits
    those scores), so it is read as the text it holds, ended. The rows as token lists: `token_rows`."""
    ended = ended.bool()
    after_last = last_token_index(attention_mask)[:, None] + 1
    ids = torch.cat([input_ids, input_ids[:, -1:]], dim=1)  # the new column's padding is masked out
    ids = ids.scatter(1, after_last, torch.where(ended[:, None], ids.gather(1, after_last), eos_token_id))
    mask = torch.cat([attention_mask.bool(), torch.zeros_like(ended)[:, None]], dim=1)
    return ids, mask.scatter(1, after_last, ~ended[:, None] | mask.gather(1, after_last))


class RewardModel(ScalarHeadModel):
    """``forward(input_ids, attention_mask) -> scores [B] float32``, the head applied to the hidden state of the
    last real token of each row, plus the normalization offset (``set_normalization``)."""

    head_file = "score_head.safetensors"
    config_file = "reward_config.json"
    format_name = "rlhf_fast.reward_model"

    def __init__(self, backbone, head=None, *, head_init_std: float = 0.0):
        super().__init__(backbone, head, head_init_std=head_init_std)
        self._normalization_bias = 0.0

    @classmethod
    def from_policy(cls, policy_model_or_path, **kwargs) -> RewardModel:
        """Backbone from an SFT causal LM (``PolicyModel``, HF causal LM, or directory), LM head dropped, fresh
        head with std 1/sqrt(d + 1) (``head_init_std`` overrides). Keyword arguments as ``from_causal_lm``."""
        return cls.from_causal_lm(policy_model_or_path, **kwargs)

    @staticmethod
    def default_head_std(hidden_size: int) -> float:
        return default_reward_head_std(hidden_size)

    # ---------------------------------------------------------------------------------------- normalization
    @property
    def normalization_bias(self) -> float:
        """The additive offset included in every score."""
        return self._normalization_bias

    def set_normalization(self, bias: float) -> None:
        """Sets (replaces) the additive offset. To make a reference set score mean 0, pass
        ``-(mean of its scores computed with the offset at 0)``. Saved by ``save_pretrained``."""
        bias = float(bias)
        if not math.isfinite(bias):
            raise ValueError(f"bias must be a finite float, got {bias}")
        self._normalization_bias = bias

    def _head_config(self) -> dict:
        return {**super()._head_config(), "normalization_bias": self._normalization_bias}

    def _load_head_config(self, config: dict) -> None:
        self.set_normalization(config.get("normalization_bias", 0.0))

    # ---------------------------------------------------------------------------------------------- compute
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        last_index: torch.Tensor | None = None,
        score_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [B] float32 (normalization offset included) of the hidden state at each row's last real token.

        input_ids: [B, L] int64. attention_mask: [B, L] bool/int, left or right padded; or a prepared
        [B, 1, L, L] mask (``rlhf_fast.models.causal_mask``; additive or bool), which keeps transformers from
        reading the padding back to the host and needs ``position_ids`` [B, L] and ``last_index``.
        last_index: [B] int64, the position scored in each row; by default ``last_token_index`` of the 2-D mask.
        score_rows: [N] int64 with ``last_index`` [N]: N scores, at (``score_rows[i]``, ``last_index[i]``),
        for rows that hold several sequences (``rlhf_fast.models.shared_prefix_causal_mask``). Returns [N].
        """
        if attention_mask is None:
            raise ValueError("attention_mask is required: the score is read at each row's last real token")
        if score_rows is not None:
            if last_index is None or last_index.shape != score_rows.shape or last_index.dim() != 1:
                raise ValueError(
                    "score_rows needs last_index of the same [N] shape, got "
                    f"{tuple(score_rows.shape)} and {None if last_index is None else tuple(last_index.shape)}"
                )
            if score_rows.dtype.is_floating_point or last_index.dtype.is_floating_point:
                raise ValueError("score_rows and last_index must be integer tensors")
            hidden = self.hidden_states(input_ids, attention_mask, position_ids)
            return self.score(hidden[score_rows, last_index]) + self._normalization_bias
        if last_index is None:
            if attention_mask.dim() == 4:
                raise ValueError(
                    "last_index is required with a 4-D attention_mask (last_token_index of the [B, L] mask)"
                )
            last_index = last_token_index(attention_mask)
        elif last_index.shape != (input_ids.shape[0],) or last_index.dtype.is_floating_point:
            raise ValueError(
                f"last_index must be an integer tensor of shape {(input_ids.shape[0],)}, got "
                f"{last_index.dtype} {tuple(last_index.shape)}"
            )
        last_hidden = self.hidden_states(input_ids, attention_mask, position_ids, outputs_at=last_index)
        return self.score(last_hidden) + self._normalization_bias
