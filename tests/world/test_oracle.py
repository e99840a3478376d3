"""`LabelerReward`: the labelers' mean utility / noise of each row's response, read from PPO-shaped token rows."""

import random

import pytest
import torch

from rlhf_fast.data.encode import tokenize_texts
from rlhf_fast.models import build_word_tokenizer, tiny_causal_lm
from rlhf_fast.world import utility
from rlhf_fast.world.oracle import LabelerReward


@pytest.fixture(scope="module")
def tokenizer(small_world):
    return build_word_tokenizer(small_world.vocabulary())


def _rows(tokenizer, prompts, responses, ended):
    """PPO's layout: prompts left-padded to one width, then the response, eos where it ended, right padding."""
    prompt_ids = tokenize_texts(tokenizer, prompts)
    response_ids = [ids + ([tokenizer.eos_token_id] if end else []) for ids, end in zip(tokenize_texts(tokenizer, responses), ended)]  # fmt: skip
    width, tail = max(map(len, prompt_ids)), max(map(len, response_ids))
    pad = tokenizer.pad_token_id
    ids, mask = [], []
    for p, r in zip(prompt_ids, response_ids):
        ids.append([pad] * (width - len(p)) + p + r + [pad] * (tail - len(r)))
        mask.append([0] * (width - len(p)) + [1] * (len(p) + len(r)) + [0] * (tail - len(r)))
    return torch.tensor(ids), torch.tensor(mask)


def test_scores_are_the_labelers_mean_utility_over_noise(small_world, tokenizer):
    rng = random.Random()  # fresh prompts and responses each run
    instances = rng.sample(small_world.instances("ppo"), 40)
    prompts = [instance.prompt for instance in instances]
    words = small_world.vocabulary()
    responses = [
        small_world.ideal_response(i) if rng.random() < 0.3 else " ".join(rng.choices(words, k=rng.randint(0, 6)))
        for i in instances
    ]
    ended = [rng.random() < 0.7 for _ in instances]
    oracle = LabelerReward(small_world, tokenizer, prompts)
    ids, mask = _rows(tokenizer, prompts, responses, ended)
    scores = oracle(ids, mask)
    assert scores.dtype == torch.float32 and scores.shape == (len(prompts),)
    labelers = small_world.train_labelers
    expected = [
        sum(utility(labeler, instance, response) / labeler.noise for labeler in labelers) / len(labelers)
        for instance, response in zip(instances, responses)
    ]
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-5)
    # The ideal response outscores an empty one for the same prompt.
    ideal, empty = _rows(tokenizer, prompts[:1] * 2, [small_world.ideal_response(instances[0]), ""], [True, True])
    better, worse = oracle(ideal, empty).tolist()
    assert better > worse


def test_labelers_can_be_chosen(small_world, tokenizer):
    instance = small_world.instances("ppo")[0]
    response = small_world.ideal_response(instance) + " thanks"
    ids, mask = _rows(tokenizer, [instance.prompt], [response], [True])
    for labeler in small_world.labelers[:3]:
        (score,) = LabelerReward(small_world, tokenizer, [instance.prompt], [labeler])(ids, mask).tolist()
        assert score == pytest.approx(utility(labeler, instance, response) / labeler.noise, rel=1e-6)


def test_the_longest_matching_prompt_is_read(small_world, tokenizer):
    class AnyPrompt:  # every text is a prompt: "a b" and "a b c" both are, the first a prefix of the second
        train_labelers = small_world.train_labelers

        @staticmethod
        def instance(text):
            return text

    words = small_world.vocabulary()[:6]
    short, long = " ".join(words[:2]), " ".join(words[:3])
    oracle = LabelerReward(AnyPrompt(), tokenizer, [short, long])
    ids = tokenize_texts(tokenizer, [f"{long} {words[4]}", f"{short} {words[5]}"])
    assert oracle.split(ids[0]) == (long, words[4])
    assert oracle.split(ids[1]) == (short, words[5])
    assert oracle.split(ids[1] + [tokenizer.eos_token_id]) == (short, words[5])


def test_bad_prompts_are_refused(small_world, tokenizer):
    with pytest.raises(ValueError, match="not a prompt of this world"):
        LabelerReward(small_world, tokenizer, ["hello there"])
    with pytest.raises(ValueError, match="at least one prompt"):
        LabelerReward(small_world, tokenizer, [])
    with pytest.raises(ValueError, match="at least one labeler"):
        LabelerReward(small_world, tokenizer, [small_world.instances("ppo")[0].prompt], [])
    known, other = small_world.instances("ppo")[:2]
    oracle = LabelerReward(small_world, tokenizer, [known.prompt])
    ids, mask = _rows(tokenizer, [other.prompt], ["x"], [True])
    with pytest.raises(ValueError, match="does not start with any of the prompts"):
        oracle(ids, mask)


def test_ppo_trains_against_it(small_world, tokenizer, tmp_path):
    from rlhf_fast.trainers import PPOConfig, PPOTrainer

    prompts = [instance.prompt for instance in small_world.instances("ppo")[:16]]
    policy = tiny_causal_lm("tiny", len(tokenizer), max_positions=64)
    config = PPOConfig(
        batch_size=8, num_minibatches=2, ppo_epochs=1, max_iterations=2, max_new_tokens=4, save_every=0,
        device="cpu", output_dir=str(tmp_path), warmup=0,
    )  # fmt: skip
    trainer = PPOTrainer(
        config, policy, LabelerReward(small_world, tokenizer, prompts), tokenize_texts(tokenizer, prompts),
        tokenizer=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert (tmp_path / "final").is_dir()
