import pytest
import torch

rollout = pytest.importorskip("rlhf_fast.rollout")  # the sampler is a separate layer; skip only while absent

from rlhf_fast.eval.generate import best_of_n_responses, generate, generate_responses
from rlhf_fast.models import build_word_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def model_and_tokenizer(small_world):
    tokenizer = build_word_tokenizer(small_world.vocabulary())
    return tiny_causal_lm("tiny", len(tokenizer), seed=3), tokenizer


def test_generation_is_seeded_ordered_and_in_vocabulary(small_world, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [i.prompt for i in small_world.instances("heldout")[:12]]
    first = generate_responses(model, tokenizer, prompts, 6, seed=5, batch_size=5)
    assert len(first) == len(prompts)
    assert generate_responses(model, tokenizer, prompts, 6, seed=5, batch_size=5) == first
    assert generate_responses(model, tokenizer, prompts, 6, seed=6, batch_size=5) != first
    vocabulary = set(small_world.vocabulary())
    for response in first:
        words = response.split()
        assert len(words) <= 6
        assert set(words) <= vocabulary
        assert "[eos]" not in words
        assert "[pad]" not in words


def test_greedy_does_not_depend_on_batching_or_order(small_world, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [i.prompt for i in small_world.instances("heldout")[:5]]
    together = generate_responses(model, tokenizer, prompts, 5, greedy=True, batch_size=5)
    alone = [generate_responses(model, tokenizer, [p], 5, greedy=True)[0] for p in prompts]
    assert together == alone
    reversed_order = generate_responses(model, tokenizer, prompts[::-1], 5, greedy=True, batch_size=2)
    assert reversed_order == together[::-1]


def test_generation_stops_at_eos_and_checks_arguments(small_world, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # Make EOS the only likely token: every response is empty.
    import torch

    with torch.no_grad():
        bias = torch.full((len(tokenizer),), -1e4)
        bias[tokenizer.eos_token_id] = 0.0
        original = model.lm_head.bias
        model.lm_head.bias = torch.nn.Parameter(bias)
        try:
            assert generate_responses(model, tokenizer, ["repeat the words : cat dog ."], 4) == [""]
        finally:
            model.lm_head.bias = original
    assert generate_responses(model, tokenizer, [], 4) == []
    with pytest.raises(ValueError, match="prompts"):
        generate_responses(model, tokenizer, "a single string", 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(model, tokenizer, ["cat"], 0)
    with pytest.raises(ValueError, match="temperature"):
        generate_responses(model, tokenizer, ["cat"], 2, temperature=0.0)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        generate_responses(model, tokenizer, ["   "], 2)


class _TokenSumReward(torch.nn.Module):
    """A stand-in reward model: the sum of the row's real token ids, times `sign`."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, input_ids, attention_mask):
        return self.sign * (input_ids * attention_mask).sum(dim=-1).double()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_best_of_n_picks_each_prompts_highest_scoring_sample(small_world, model_and_tokenizer, sign):
    model, tokenizer = model_and_tokenizer
    prompts = [i.prompt for i in small_world.instances("heldout")[:7]]
    n, options = 5, {"temperature": 1.0, "batch_size": 8, "seed": 11}
    chosen = best_of_n_responses(model, _TokenSumReward(sign), tokenizer, prompts, n, 6, **options)
    # The same samples drawn again; per prompt, the first of the largest (sign 1) or smallest (sign -1) token
    # sum of the response as the reward model reads it (+ eos, whether it ended or was cut).
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    repeated = [ids for ids in prompt_ids for _ in range(n)]
    samples = generate(model, tokenizer, repeated, 6, **options)
    expected = []
    for row in range(len(prompts)):
        candidates = range(row * n, (row + 1) * n)
        sums = [sum(samples.token_ids[i]) + tokenizer.eos_token_id for i in candidates]
        best = max(range(n), key=lambda j: (sign * sums[j], -j))
        expected.append(samples.texts[row * n + best])
    assert chosen == expected
    assert chosen != [samples.texts[row * n] for row in range(len(prompts))]  # the choice mattered


def test_best_of_one_is_plain_sampling_and_arguments_are_checked(small_world, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [i.prompt for i in small_world.instances("heldout")[:6]]
    plain = generate_responses(model, tokenizer, prompts, 5, seed=4, batch_size=4)
    assert best_of_n_responses(model, None, tokenizer, prompts, 1, 5, seed=4, batch_size=4) == plain
    assert best_of_n_responses(model, _TokenSumReward(1.0), tokenizer, [], 3, 5) == []
    with pytest.raises(ValueError, match="n must"):
        best_of_n_responses(model, _TokenSumReward(1.0), tokenizer, prompts, 0, 5)
    with pytest.raises(ValueError, match="temperature"):
        best_of_n_responses(model, _TokenSumReward(1.0), tokenizer, prompts, 2, 5, temperature=0.0)
    with pytest.raises(ValueError, match="prompts"):
        best_of_n_responses(model, _TokenSumReward(1.0), tokenizer, "one prompt", 2, 5)


def test_suite_answers_best_of_n_with_the_qa_benchmark_greedy(small_world, model_and_tokenizer):
    from rlhf_fast.eval.suite import EvalSuite, respond

    model, tokenizer = model_and_tokenizer
    suite = EvalSuite.from_world(small_world, 6)
    options = {"max_new_tokens": 5, "temperature": 1.0, "seed": 3, "batch_size": 16}
    reward = _TokenSumReward(1.0)
    answers = respond(model, tokenizer, suite, best_of=3, reward_model=reward, **options)
    plain = respond(model, tokenizer, suite, **options)
    held_out = [i.prompt for i in suite.heldout]
    assert answers.heldout == best_of_n_responses(
        model, reward, tokenizer, held_out, 3, 5, temperature=1.0, seed=3, batch_size=16
    )
    assert answers.heldout != plain.heldout
    assert answers.qa == plain.qa  # greedy: one answer, nothing to choose from
    with pytest.raises(ValueError, match="reward_model"):
        respond(model, tokenizer, suite, best_of=3, **options)
