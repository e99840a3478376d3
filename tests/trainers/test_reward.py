"""Reward model: K-wise rankings encoded once, accuracy rises on a separable toy, scores normalized."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import RewardConfig
from rlhf_fast.models import RewardModel
from rlhf_fast.trainers.reward import _pair_counts
from tests.trainers import toy
from tests.trainers.conftest import read_jsonl


def test_accuracy_rises_and_reference_scores_mean_zero(tmp_path):
    trainer = toy.make_trainer("rm", tmp_path, epochs=3, save_every=0)
    before = trainer.evaluate()
    last = trainer.train()
    after = trainer.evaluate()
    assert after["eval/accuracy"] >= 0.9, after
    assert after["eval/loss"] < before["eval/loss"] - 0.1, (before, after)

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert {"train/loss", "train/accuracy", "train/lr", "train/grad_norm"} <= set(records[0])
    assert {"eval/loss", "eval/accuracy"} <= set(last)

    # The saved model scores the demonstrations at mean 0, with the offset stored beside it.
    saved = RewardModel.from_pretrained(tmp_path / "final").eval()
    assert saved.normalization_bias == pytest.approx(trainer.model.normalization_bias)
    assert saved.normalization_bias != 0.0
    rows = [example.input_ids for example in trainer.normalization_data]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows])
    with torch.no_grad():
        assert float(saved(ids, mask).mean()) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_each_completion_is_encoded_once(tmp_path, share_prompt):
    """One row per completion (prompt + completion), or with `share_prompt` one row per prompt (the prompt
    once, then its completions)."""
    trainer = toy.make_trainer("rm", tmp_path, max_steps=1, save_every=0, share_prompt=share_prompt)
    rows_seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
    trainer.train()
    first_batch = [trainer.train_data[i] for i in trainer._epoch_batches(0)[0]]
    completions = sum(len(item.completion_ids) for item in first_batch)
    assert rows_seen[0] == (len(first_batch) if share_prompt else completions)
    assert len({len(item.completion_ids) for item in first_batch}) > 1, "the toy batch should mix K"


def test_rows_per_completion_where_sharing_would_cost_more(tmp_path):
    """Short prompts before long completions: the micro-batch falls back to a row per completion."""
    from dataclasses import replace

    trainer = toy.make_trainer("rm", tmp_path, max_steps=1, save_every=0)
    items = []
    for item in trainer.train_data[:4]:
        long_completions = tuple(6 * ids for ids in item.completion_ids)
        items.append(replace(item, prompt_ids=item.prompt_ids[:1], completion_ids=long_completions))
    rows_seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
    trainer.compute_loss(trainer.model, items)
    trainer.compute_loss(trainer.model, trainer.train_data[:4])
    assert rows_seen == [sum(len(item.completion_ids) for item in items), 4]


def test_shared_prompt_rows_train_as_rows_per_completion(tmp_path):
    """The same loss, accuracy and updates with the prompt encoded once per ranking as once per completion."""
    runs = {}
    for share_prompt in (True, False):
        trainer = toy.make_trainer(
            "rm", tmp_path / str(share_prompt), max_steps=2, save_every=0, adam_eps=1e-6,
            share_prompt=share_prompt,
        )
        assert trainer._share_prompt is share_prompt
        runs[share_prompt] = (trainer, trainer.train())
    (shared, shared_log), (rows, rows_log) = runs[True], runs[False]
    for key in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy"):
        assert shared_log[key] == pytest.approx(rows_log[key], rel=1e-5, abs=1e-6), key
    for (name, a), b in zip(shared.model.named_parameters(), rows.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_pair_counts_skip_ties():
    items = [{"ranks": (0, 1, 2)}, {"ranks": (0, 0, 1)}, {"ranks": (1, 1)}]
    assert _pair_counts(items) == (2, 3 + 2)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        RewardConfig(batch_size=0).check()


def test_micro_batches_accumulate_to_the_full_batch_update(tmp_path):
    whole = toy.make_trainer("rm", tmp_path / "whole", max_steps=2, save_every=0, adam_eps=1e-6)
    split = toy.make_trainer(
        "rm", tmp_path / "split", max_steps=2, save_every=0, adam_eps=1e-6, micro_batch_size=3
    )
    whole.train()
    split.train()
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_token_ids_outside_the_vocabulary_are_refused_at_load(tmp_path):
    """The steps run the ops without value checks: token ids are checked once, when the trainer is built."""
    from dataclasses import replace

    from rlhf_fast import RewardTrainer

    bad = toy.rankings(4)
    bad[1] = replace(bad[1], prompt_ids=[*bad[1].prompt_ids, 10_000])
    with pytest.raises(ValueError, match="vocabulary"):
        RewardTrainer(RewardConfig(batch_size=2, output_dir=str(tmp_path)), toy.policy(), bad,
                      tokenizer=toy.tokenizer())
