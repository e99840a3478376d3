"""SFT: the loss falls on a learnable toy, only response tokens count, packing changes nothing, dropout."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import SFTConfig
from rlhf_fast.data import collate_sft
from rlhf_fast.models import PolicyModel
from rlhf_fast.trainers._common import set_residual_dropout
from tests.trainers import toy
from tests.trainers.conftest import read_jsonl


def test_loss_falls_and_metrics_are_logged(tmp_path):
    trainer = toy.make_trainer("sft", tmp_path, epochs=4, save_every=0)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after < before - 0.3, (before, after)

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, trainer.total_steps + 1))
    assert {"train/loss", "train/lr", "train/grad_norm", "time/seconds", "time/tokens_per_second"} <= set(
        records[0]
    )
    assert "eval/loss" in records[-1]
    losses = [r["train/loss"] for r in records]
    assert sum(losses[-3:]) < sum(losses[:3])

    exported = PolicyModel.from_pretrained(tmp_path / "final")
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, trainer.policy.state_dict()[name], rtol=0, atol=0)


def test_loss_counts_response_tokens_only(tmp_path):
    trainer = toy.make_trainer("sft", tmp_path)
    examples = trainer.eval_data
    batch = collate_sft(examples, trainer.pad_token_id)
    with torch.no_grad():
        policy = trainer.policy.double()
        hidden = policy(batch["input_ids"], batch["attention_mask"])
        logprobs = policy.logits(hidden)[:, :-1].log_softmax(-1)
        token_logprobs = logprobs.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        mask = batch["loss_mask"][:, 1:]
        expected = -(token_logprobs * mask).sum() / mask.sum()
        policy.float()
    # The prompt is excluded: the loss over every real token would differ.
    everything = batch["attention_mask"][:, 1:]
    assert not torch.isclose(expected, -(token_logprobs * everything).sum() / everything.sum())
    assert trainer.evaluate() == pytest.approx(float(expected), rel=1e-5)


def test_packing_gives_the_same_loss_and_update(tmp_path):
    padded = toy.make_trainer("sft", tmp_path / "padded", max_steps=1, save_every=0)
    packed = toy.make_trainer("sft", tmp_path / "packed", max_steps=1, save_every=0, pack=True, block_size=24)
    batch = packed._micro_batches(packed.train_data[:8])[0]
    assert batch["input_ids"].shape[0] < 8, "the toy examples should share rows when packed"
    assert packed.evaluate() == pytest.approx(padded.evaluate(), rel=1e-6)
    padded.train()
    packed.train()
    for (name, a), b in zip(padded.policy.named_parameters(), packed.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_residual_dropout_option():
    policy = toy.policy()
    changed = set_residual_dropout(policy.hf_model, 0.2)
    assert changed == 2 * policy.config.n_layer  # attention output and MLP output of each block
    assert policy.config.resid_pdrop == 0.2
    assert policy.hf_model.transformer.h[0].attn.attn_dropout.p == 0.0  # attention dropout untouched
    policy.train()
    ids = torch.randint(4, 20, (2, 6))
    assert not torch.equal(policy(ids), policy(ids))
    policy.eval()
    assert torch.equal(policy(ids), policy(ids))


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("epochs", 0),
        ("learning_rate", 0.0),
        ("micro_batch_size", 0),
        ("save_every", -1),
        ("max_bad_steps", 0),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SFTConfig(**{field: value}).check()


def test_micro_batches_accumulate_to_the_full_batch_update(tmp_path):
    whole = toy.make_trainer("sft", tmp_path / "whole", max_steps=2, save_every=0)
    split = toy.make_trainer("sft", tmp_path / "split", max_steps=2, save_every=0, micro_batch_size=3)
    whole.train()
    split.train()
    for (name, a), b in zip(whole.policy.named_parameters(), split.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_token_ids_outside_the_vocabulary_are_refused_at_load(tmp_path):
    """The steps run the ops without value checks: token ids are checked once, when the trainer is built."""
    from dataclasses import replace

    from rlhf_fast import SFTTrainer

    bad = toy.demonstrations(4)
    bad[2] = replace(bad[2], input_ids=[*bad[2].input_ids[:-1], 10_000])
    with pytest.raises(ValueError, match="vocabulary"):
        SFTTrainer(SFTConfig(batch_size=2, output_dir=str(tmp_path)), toy.policy(), bad, tokenizer=toy.tokenizer())
