"""PPO / PPO-ptx: the toy reward rises with the KL bounded; the iteration's pieces behave as specified."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast import PPOConfig, PPOTrainer
from rlhf_fast.rollout import sample
from rlhf_fast.trainers import AdaptiveKLController
from rlhf_fast.trainers._modules import PolicyLogprobs
from tests.trainers import toy
from tests.trainers.conftest import read_jsonl

LOGGED = (
    "objective/scores",
    "objective/kl",
    "objective/kl_coef",
    "policy/approx_kl",
    "policy/clipfrac",
    "policy/entropy",
    "loss/policy",
    "loss/value",
    "loss/ptx",
    "val/explained_variance",
    "time/seconds",
    "time/tokens_per_second",
)


def test_ppo_raises_the_toy_reward_with_bounded_kl(tmp_path):
    trainer = toy.make_trainer(
        "ppo",
        tmp_path,
        max_iterations=12,
        batch_size=16,
        learning_rate=3e-3,
        max_new_tokens=8,
        kl_coef=0.05,
        save_every=0,
    )
    trainer.train()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in LOGGED:
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in records), key
    scores = [r["objective/scores"] for r in records]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 1.0, scores
    # The first rollout comes from the reference itself: the KL is exactly 0, then it stays bounded.
    assert records[0]["objective/kl"] == 0.0
    assert max(r["objective/kl"] for r in records) < 25.0
    assert all(r["loss/ptx"] > 0 for r in records)
    assert all(r["objective/kl_coef"] == pytest.approx(0.05) for r in records)


def test_recomputed_logprobs_use_the_sampling_temperature():
    policy = toy.policy()
    prompts = torch.randint(4, 20, (3, 5))
    generator = torch.Generator().manual_seed(0)
    out = sample(
        policy,
        prompts,
        torch.ones_like(prompts, dtype=torch.bool),
        6,
        temperature=0.7,
        eos_token_id=None,
        pad_token_id=0,
        generator=generator,
        return_logprobs=True,
    )
    mask = torch.cat([torch.ones_like(prompts, dtype=torch.bool), out.response_mask], dim=1)
    with torch.no_grad():
        recomputed = PolicyLogprobs(policy)(
            out.sequences, mask, out.response_ids, mask=out.response_mask, temperature=0.7
        ).logprobs
        at_one = PolicyLogprobs(policy)(
            out.sequences, mask, out.response_ids, mask=out.response_mask
        ).logprobs
    torch.testing.assert_close(recomputed, out.logprobs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(at_one, out.logprobs, atol=1e-3)


def test_adaptive_kl_controller_follows_ziegler():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100, device=torch.device("cpu"))
    controller.update(torch.tensor(9.0), n_steps=10)  # error 0.5, clipped to 0.2
    assert float(controller.value) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(torch.tensor(5.4), n_steps=10)  # error -0.1
    assert float(controller.value) == pytest.approx(0.1 * (1 + 0.02) * (1 - 0.01))
    state = controller.state_dict()
    other = AdaptiveKLController(0.5, target=6.0, horizon=100, device=torch.device("cpu"))
    other.load_state_dict(state)
    assert float(other.value) == pytest.approx(float(controller.value))


def test_adaptive_kl_coefficient_moves_during_training(tmp_path):
    trainer = toy.make_trainer(
        "ppo", tmp_path, max_iterations=3, target_kl=0.01, horizon=8, kl_coef=0.1, save_every=0
    )
    trainer.train()
    coefs = [r["objective/kl_coef"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert coefs[0] == pytest.approx(0.1)
    assert coefs[2] > coefs[1]  # the KL is above a tiny target: the coefficient grows


def one_iteration(trainer):
    batch = trainer.prompt_batch(0)
    metrics = trainer.iteration(batch["prompt_ids"], batch["prompt_mask"], trainer.pretrain_batches())
    return {key: float(value) for key, value in metrics.items()}


def test_missing_eos_penalty_lowers_scores_of_unfinished_responses(tmp_path):
    plain = one_iteration(toy.make_trainer("ppo", tmp_path / "a", max_new_tokens=3))
    penalized = one_iteration(
        toy.make_trainer("ppo", tmp_path / "b", max_new_tokens=3, missing_eos_penalty=2.0)
    )
    assert plain["episode/eos_fraction"] < 1.0
    expected = plain["objective/scores"] - 2.0 * (1.0 - plain["episode/eos_fraction"])
    assert penalized["objective/scores"] == pytest.approx(expected, abs=1e-6)


def test_ptx_loss_only_with_pretraining_data(tmp_path):
    with_ptx = one_iteration(toy.make_trainer("ppo", tmp_path / "a"))
    trainer = toy.make_trainer("ppo", tmp_path / "b")
    trainer.pretrain_data = None
    without = one_iteration(trainer)
    assert with_ptx["loss/ptx"] > 1.0
    assert without["loss/ptx"] == 0.0


@pytest.mark.parametrize(
    "field, value",
    [("num_minibatches", 3), ("temperature", 0.0), ("gamma", 1.5), ("target_kl", -1.0), ("ppo_epochs", 0)],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(batch_size=8, **{field: value}).check()


@pytest.mark.parametrize(
    "settings", [{"whiten_rewards": True}, {"whiten_advantages": False}, {"gae_lambda": 1.0}]
)
def test_reward_and_advantage_options_run(tmp_path, settings):
    metrics = one_iteration(toy.make_trainer("ppo", tmp_path, **settings))
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert metrics["train/skipped"] == 0.0


def test_prompts_may_be_mappings_or_id_lists(tmp_path):
    config = PPOConfig(batch_size=8, num_minibatches=2, output_dir=str(tmp_path))
    ids = [prompt.input_ids for prompt in toy.prompts(8)]
    as_dicts = [{"input_ids": prompt} for prompt in ids]
    trainer = PPOTrainer(
        config, toy.policy(), toy.counting_reward_model(), as_dicts, tokenizer=toy.tokenizer()
    )
    assert trainer.prompts == ids
    assert trainer.eos_token_id == toy.tokenizer().eos_token_id
    with pytest.raises(ValueError, match="empty prompt"):
        PPOTrainer(config, toy.policy(), toy.counting_reward_model(), [[]] * 8, tokenizer=toy.tokenizer())
