import pytest

rollout = pytest.importorskip("rlhf_fast.rollout")  # the sampler is a separate layer; skip only while absent

from rlhf_fast.eval.generate import generate_responses
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
