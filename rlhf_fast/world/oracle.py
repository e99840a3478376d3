"""The labelers' own utility as a reward function: a reward model with no error, for the world's prompts.

`LabelerReward` has a reward model's call, `(input_ids [B, L], attention_mask [B, L]) -> scores [B]`, so any
trainer that takes a reward model takes it (PPO's `reward_model=`). Each row is read as the policy's tokens
of a known prompt followed by a response (up to eos); the score is the mean over the labelers of
utility / noise: the Bradley-Terry log-odds scale that a reward model trained on their rankings learns
(`rlhf_fast.world.labelers`), so a KL coefficient means the same against either.

What it is for: separating what a reward model gets wrong from what RL makes of a reward. PPO against this
reward shows how far the policy can move the labelers' judgment in a given budget with a perfect reward
model (the "gold" reward of Gao et al., 2022, here exact rather than a larger model).

Rows are matched to prompts by their token ids: the longest prompt of `prompts` that the row's non-padding
tokens start with. When one prompt's ids are a strict prefix of another's, a response to the shorter one
that continues with exactly the longer one's remaining tokens is read as a response to the longer one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_fast.world.build import World
from rlhf_fast.world.labelers import Labeler, utility
from rlhf_fast.world.task import TaskInstance


class LabelerReward:
    """Mean utility / noise of `labelers` (default: the world's training labelers) for responses to `prompts`.

    Args:
        world: the world the prompts come from.
        tokenizer: the policy's tokenizer (decodes responses; encodes `prompts` as the data layer does).
        prompts: the prompt texts the policy will be given (e.g. the PPO prompts); each must be a world prompt.
        labelers: whose judgment; default `world.train_labelers`, the ones the reward model learns from.
    """

    def __init__(
        self, world: World, tokenizer, prompts: Sequence[str], labelers: Sequence[Labeler] | None = None
    ):
        from rlhf_fast.data.encode import tokenize_texts

        self.world = world
        self.tokenizer = tokenizer
        self.labelers = list(world.train_labelers if labelers is None else labelers)
        if not self.labelers:
            raise ValueError("LabelerReward needs at least one labeler")
        self._prompts: dict[tuple[int, ...], TaskInstance] = {}
        for text, ids in zip(prompts, tokenize_texts(tokenizer, list(prompts))):
            instance = world.instance(text)
            if instance is None:
                raise ValueError(f"not a prompt of this world: {text!r}")
            self._prompts[tuple(ids)] = instance
        if not self._prompts:
            raise ValueError("LabelerReward needs at least one prompt")
        self._lengths = sorted({len(ids) for ids in self._prompts}, reverse=True)
        self._skipped = set(tokenizer.all_special_ids)

    def score(self, instance: TaskInstance, response: str) -> float:
        """The reward of one response text: mean over the labelers of utility / noise."""
        log_odds = [utility(labeler, instance, response) / labeler.noise for labeler in self.labelers]
        return sum(log_odds) / len(log_odds)

    def split(self, tokens: Sequence[int]) -> tuple[TaskInstance, str]:
        """(the prompt's instance, the response text) of one row's non-padding tokens."""
        for length in self._lengths:
            instance = self._prompts.get(tuple(tokens[:length]))
            if instance is not None:
                response = [token for token in tokens[length:] if token not in self._skipped]
                return instance, self.tokenizer.decode(response, skip_special_tokens=True)
        raise ValueError("a row does not start with any of the prompts LabelerReward was given")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [B] float32, on the device of `input_ids`."""
        rows = input_ids.detach().cpu().tolist()
        masks = attention_mask.detach().cpu().bool().tolist()
        scores = []
        for row, mask in zip(rows, masks):
            instance, response = self.split([token for token, keep in zip(row, mask) if keep])
            scores.append(self.score(instance, response))
        return torch.tensor(scores, dtype=torch.float32, device=input_ids.device)
