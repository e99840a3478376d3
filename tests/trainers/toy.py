"""Tiny in-memory worlds for the trainer tests: a word tokenizer, a 2-layer GPT-2, and toy tasks.

Importable from the tests and from the subprocess scripts (`run_toy.py`) alike, so a killed-and-resumed run
and an uninterrupted one build the very same models and data.
"""

from __future__ import annotations

import random

import torch

from rlhf_fast.data import (
    Demonstration,
    PretrainText,
    PromptRecord,
    Ranking,
    encode_demonstrations,
    encode_pretrain,
    encode_prompts,
    encode_rankings,
)
from rlhf_fast.models import PolicyModel, RewardModel, build_word_tokenizer, tiny_causal_lm

WORDS = [f"w{i}" for i in range(16)]
GOOD = "w0"  # the toy reward counts this word


def tokenizer():
    return build_word_tokenizer(WORDS)


def policy(seed: int = 0, dim: int = 64) -> PolicyModel:
    tok = tokenizer()
    size = "tiny"
    model = tiny_causal_lm(size, len(tok), max_positions=64, seed=seed)
    return PolicyModel(model)


def demonstrations(n: int, seed: int = 0):
    """Copy task: the response repeats the prompt's words in reverse order."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = [rng.choice(WORDS[1:]) for _ in range(rng.randint(2, 4))]
        records.append(Demonstration(prompt=" ".join(words), response=" ".join(reversed(words))))
    return encode_demonstrations(records, tokenizer(), max_length=32).examples


def rankings(n: int, seed: int = 0, k_range=(2, 5)):
    """Separable rankings: the more GOOD words a completion has, the better it ranks (K varies per prompt)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        k = rng.randint(*k_range)
        counts = rng.sample(range(6), k)
        completions = []
        for count in counts:
            words = [GOOD] * count + [rng.choice(WORDS[1:]) for _ in range(5 - count)]
            rng.shuffle(words)
            completions.append(" ".join(words))
        order = sorted(range(k), key=lambda i: -counts[i])
        ranks = [0] * k
        for rank, index in enumerate(order):
            ranks[index] = rank
        prompt = " ".join(rng.choice(WORDS[1:]) for _ in range(rng.randint(1, 3)))
        records.append(Ranking(prompt=prompt, completions=tuple(completions), ranks=tuple(ranks)))
    return encode_rankings(records, tokenizer(), max_length=32).items


def prompts(n: int, seed: int = 0):
    rng = random.Random(seed)
    records = [
        PromptRecord(prompt=" ".join(rng.choice(WORDS[1:]) for _ in range(rng.randint(1, 4))))
        for _ in range(n)
    ]
    return encode_prompts(records, tokenizer(), max_prompt_length=8).items


def pretrain(n_blocks: int, block_size: int = 16, seed: int = 0):
    rng = random.Random(seed)
    texts = [PretrainText(text=" ".join(rng.choice(WORDS) for _ in range(12))) for _ in range(n_blocks * 2)]
    return encode_pretrain(texts, tokenizer(), block_size=block_size).blocks[:n_blocks]


class CountingRewardModel(RewardModel):
    """A reward model whose score is the number of GOOD tokens in the row (plus the normalization offset).

    It keeps a real backbone (so it can initialize a value model) but ignores it for the score."""

    def forward(self, input_ids, attention_mask, position_ids=None):
        good = tokenizer().convert_tokens_to_ids(GOOD)
        return ((input_ids == good) & attention_mask.bool()).sum(-1).float() + self.normalization_bias


def counting_reward_model(seed: int = 0) -> CountingRewardModel:
    base = RewardModel.from_policy(policy(seed))
    return CountingRewardModel(base.backbone, base.head)


def make_trainer(kind: str, output_dir, **overrides):
    """The toy trainer of `kind` ("sft", "rm", "ppo"): tiny model, tiny data, settings that learn fast."""
    from rlhf_fast import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    output_dir = str(output_dir)
    torch.manual_seed(1234)  # the reward model's fresh head draws from the global RNG
    if kind == "sft":
        config = SFTConfig(
            learning_rate=3e-3,
            batch_size=8,
            epochs=2,
            warmup=1,
            residual_dropout=0.0,
            save_every=2,
            output_dir=output_dir,
        )
        config = _override(config, overrides)
        return SFTTrainer(
            config, policy(), demonstrations(32), eval_data=demonstrations(8, seed=1), tokenizer=tokenizer()
        )
    if kind == "rm":
        config = RewardConfig(learning_rate=1e-3, batch_size=8, epochs=2, save_every=2, output_dir=output_dir)
        config = _override(config, overrides)
        return RewardTrainer(
            config,
            policy(),
            rankings(32),
            eval_data=rankings(8, seed=1),
            normalization_data=demonstrations(8),
            tokenizer=tokenizer(),
        )
    if kind == "ppo":
        config = PPOConfig(
            learning_rate=1e-3,
            batch_size=8,
            num_minibatches=2,
            ppo_epochs=1,
            max_iterations=4,
            warmup=0,
            max_new_tokens=6,
            ptx_coef=0.5,
            save_every=2,
            output_dir=output_dir,
        )
        config = _override(config, overrides)
        return PPOTrainer(
            config,
            policy(),
            counting_reward_model(),
            prompts(32),
            pretrain_data=pretrain(16),
            tokenizer=tokenizer(),
        )
    raise ValueError(f"kind must be sft, rm or ppo, got {kind!r}")


def _override(config, overrides):
    import dataclasses

    return dataclasses.replace(config, **overrides)


TRAINED_FILES = {"sft": ("policy",), "rm": ("reward_model",), "ppo": ("policy", "value")}


def final_tensors(kind: str, output_dir) -> dict[str, torch.Tensor]:
    """Every tensor of the run's last checkpoint, keyed '<file>/<tensor>'."""
    from pathlib import Path

    from rlhf_fast.trainers.checkpoint import load_safetensors

    tensors = {}
    for name in TRAINED_FILES[kind]:
        for key, value in load_safetensors(
            Path(output_dir) / "checkpoints" / "last" / f"{name}.safetensors"
        ).items():
            tensors[f"{name}/{key}"] = value
    return tensors


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
