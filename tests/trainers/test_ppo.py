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
    # The first rollout comes from the reference itself: the KL is 0 (to the sampler's rounding: in float32
    # its log-probs serve as the old ones), then it stays bounded.
    assert abs(records[0]["objective/kl"]) < 1e-4
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
    [
        ("num_minibatches", 3),
        ("temperature", 0.0),
        ("gamma", 1.5),
        ("target_kl", -1.0),
        ("ppo_epochs", 0),
        ("output_norm_learning_rate", 0.0),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(batch_size=8, **{field: value}).check()


def test_output_norm_learning_rate_moves_the_gain_beyond_what_the_policy_rate_allows(tmp_path):
    """Adam moves a parameter by at most about its learning rate per step: at the policy's rate the output-norm
    gain stays within steps x rate of where it started; at its own rate it goes further, in its own group."""
    rate, steps = 1e-4, 3 * 2  # 3 iterations x 2 minibatches x 1 epoch

    def gain_change(output_dir, **settings):
        trainer = toy.make_trainer(
            "ppo", output_dir, max_iterations=3, learning_rate=rate, ptx_coef=0.0, save_every=0, **settings
        )
        gain = trainer.policy.output_norm.weight
        before = gain.detach().clone()
        groups = trainer.optimizer.param_groups
        trainer.train()
        return (gain.detach() - before).abs().max().item(), groups, gain

    plain, plain_groups, _ = gain_change(tmp_path / "a")
    assert len(plain_groups) == 2
    assert 0 < plain <= steps * rate * 1.01
    fast, groups, gain = gain_change(tmp_path / "b", output_norm_learning_rate=100 * rate)
    assert [group["params"] for group in groups[2:]] == [[gain]]
    assert groups[2]["lr"] == pytest.approx(100 * rate)
    assert all(parameter is not gain for group in groups[:2] for parameter in group["params"])
    assert fast > 5 * steps * rate


def test_output_norm_learning_rate_refuses_lora(tmp_path):
    pytest.importorskip("peft")
    from rlhf_fast.models.loading import LoRAConfig

    with pytest.raises(ValueError, match="output_norm_learning_rate"):
        toy.make_trainer("ppo", tmp_path, lora=LoRAConfig(r=4, alpha=8), output_norm_learning_rate=1e-2)


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


@pytest.mark.parametrize("rollout_logprobs", [False, True])
def test_logprob_mismatch_is_logged_and_small(tmp_path, rollout_logprobs):
    """`rollout/logprob_mismatch`: |sampler log-prob − training-forward log-prob| over valid tokens (from the
    scoring forward, or from the first minibatch's forward when the scoring forward is skipped)."""
    metrics = one_iteration(toy.make_trainer("ppo", tmp_path, rollout_logprobs=rollout_logprobs))
    assert 0.0 <= metrics["rollout/logprob_mismatch"] <= metrics["rollout/logprob_mismatch_max"] < 1e-4
    assert metrics["train/skipped"] == 0.0


def test_recomputed_logprobs_give_an_exact_zero_first_kl(tmp_path):
    """With `rollout_logprobs=False` the old log-probs come from the same batched forward as the reference's:
    a policy equal to its reference has a KL of exactly 0 and a first ratio of exactly 1."""
    metrics = one_iteration(toy.make_trainer("ppo", tmp_path, rollout_logprobs=False, num_minibatches=1))
    assert metrics["objective/kl"] == 0.0
    assert metrics["policy/ratio"] == 1.0


@pytest.mark.parametrize(("dtype", "expected"), [("float32", True), ("bfloat16", False), ("auto", True)])
def test_rollout_logprobs_default_follows_the_precision(tmp_path, dtype, expected):
    trainer = toy.make_trainer("ppo", tmp_path, dtype=dtype)
    assert trainer.config.rollout_logprobs is None and trainer.rollout_logprobs is expected


def test_rollout_logprobs_skip_the_policy_scoring_forward(tmp_path):
    from rlhf_fast.trainers.phases import PhaseTimer, recording

    counts = {}
    for switch in (False, True):
        trainer = toy.make_trainer("ppo", tmp_path / str(switch), rollout_logprobs=switch)
        timer = PhaseTimer()
        with recording(timer):
            metrics = one_iteration(trainer)
        counts[switch] = timer.calls.get("score/policy", 0)
        assert math.isfinite(metrics["policy/entropy"]) and metrics["policy/entropy"] > 0
    assert counts == {False: 1, True: 0}


@pytest.mark.parametrize("rollout_logprobs", [False, True])
@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (0, 0.6), (4, 0.8)])
def test_top_k_top_p_ratio_is_one_at_the_first_minibatch(tmp_path, top_k, top_p, rollout_logprobs):
    """The ratio, KL and entropy use the filtered distribution tokens are drawn from: the first minibatch of the
    first epoch runs on the sampling weights, so its ratio is 1 and its forward agrees with the sampler."""
    trainer = toy.make_trainer("ppo", tmp_path, top_k=top_k, top_p=top_p, num_minibatches=1, ppo_epochs=1,
                               rollout_logprobs=rollout_logprobs)
    metrics = one_iteration(trainer)
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["policy/approx_kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["policy/clipfrac"] == 0.0
    assert metrics["rollout/logprob_mismatch_max"] < 1e-4
    # The first rollout comes from the reference, so the KL of the filtered policy to it is -E[log of the
    # kept mass] >= 0, and the entropy is at most that of a uniform choice among the kept tokens.
    assert metrics["objective/kl"] >= -1e-5
    if top_k:
        assert metrics["policy/entropy"] <= math.log(top_k) + 1e-5


def test_gradients_are_clipped_per_model(tmp_path):
    """A value loss a million times larger changes nothing in the policy's step: each model is clipped on its
    own. Both norms are logged."""
    runs = {}
    for vf_coef in (0.1, 1e6):
        trainer = toy.make_trainer("ppo", tmp_path / str(vf_coef), vf_coef=vf_coef, max_grad_norm=1.0)
        before = [p.detach().clone() for p in trainer.policy_parameters]
        metrics = one_iteration(trainer)
        deltas = [p.detach() - b for p, b in zip(trainer.policy_parameters, before)]
        runs[vf_coef] = (metrics, deltas)
    (small, small_deltas), (large, large_deltas) = runs[0.1], runs[1e6]
    assert large["train/value_grad_norm"] > 1e3 * small["train/value_grad_norm"]
    assert large["train/policy_grad_norm"] == pytest.approx(small["train/policy_grad_norm"], rel=1e-5)
    assert large["train/skipped"] == 0.0
    assert any(delta.abs().max() > 0 for delta in small_deltas)
    for a, b in zip(small_deltas, large_deltas):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


class ConstantReward(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        return torch.zeros(input_ids.shape[0])


def test_explained_variance_is_finite_when_returns_are_constant(tmp_path):
    """Zero rewards and no KL penalty with λ = γ = 1: every return is 0, its variance 0."""
    config = PPOConfig(batch_size=8, num_minibatches=2, ppo_epochs=1, kl_coef=0.0, gae_lambda=1.0,
                       whiten_advantages=False, max_new_tokens=4, output_dir=str(tmp_path))
    trainer = PPOTrainer(config, toy.policy(), ConstantReward(), toy.prompts(8), tokenizer=toy.tokenizer())
    metrics = one_iteration(trainer)
    assert metrics["val/explained_variance"] == 0.0
    assert all(math.isfinite(value) for value in metrics.values()), metrics


def test_rollout_scores_equal_the_reward_models_scores_of_the_same_text(tmp_path):
    """PPO optimizes what evaluation measures: the score of a sampled row (left-padded prompt, response, eos,
    padding) equals the reward model's score of the decoded prompt and response, encoded as its training data
    (+ eos), for responses that ended and responses cut at max_new_tokens alike."""
    from rlhf_fast.eval.generate import response_rows, reward_scores
    from rlhf_fast.models import RewardModel

    torch.manual_seed(0)
    tokenizer = toy.tokenizer()
    reward_model = RewardModel.from_policy(toy.policy(seed=3)).eval()
    trainer = PPOTrainer(
        PPOConfig(batch_size=8, num_minibatches=2, max_new_tokens=6, output_dir=str(tmp_path)),
        toy.policy(),
        reward_model,
        toy.prompts(16),
        tokenizer=tokenizer,
    )
    batch = trainer.prompt_batch(0)
    out = sample(trainer.policy, batch["prompt_ids"], batch["prompt_mask"], 6, **trainer._sample_options)
    attention_mask = torch.cat([batch["prompt_mask"].bool(), out.response_mask], dim=1)
    has_eos = ((out.response_ids == tokenizer.eos_token_id) & out.response_mask).any(dim=1)
    scores = trainer.score(out.sequences, attention_mask, has_eos)

    eos = tokenizer.eos_token_id
    prompts, responses, ended = [], [], []
    for prompt, prompt_mask, response, response_mask in zip(
        batch["prompt_ids"], batch["prompt_mask"], out.response_ids, out.response_mask
    ):
        ids = response[response_mask].tolist()
        ended.append(bool(ids) and ids[-1] == eos)
        prompts.append(tokenizer.decode(prompt[prompt_mask.bool()].tolist()))
        responses.append(tokenizer.decode(ids[:-1] if ended[-1] else ids))
    assert any(ended) and not all(ended) and any(response for response in responses)
    assert has_eos.tolist() == ended
    rows = response_rows(tokenizer, prompts, responses)
    expected = reward_scores(reward_model, rows, tokenizer.pad_token_id)
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
