"""PolicyModel on GPT-2, GPT-NeoX, Llama and Qwen2: hidden states, LM head, padding, tied weights, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_fast.models import PolicyModel, build_word_tokenizer
from tests.helpers import fresh_generator
from tests.models.archs import ARCHITECTURES, build_causal_lm, left_padded_prompts


@pytest.fixture
def generator():
    return fresh_generator()


def seed_of(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=generator))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hidden_times_lm_head_equals_hf_logits(arch, generator):
    model = build_causal_lm(arch, seed_of(generator), dtype=torch.float64)
    policy = PolicyModel(model)
    ids, mask = left_padded_prompts([7, 4, 1], generator)
    hidden = policy(ids, mask)
    assert hidden.shape == (3, 7, model.config.hidden_size)
    expected = model(input_ids=ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    manual = hidden @ policy.lm_head_weight.T
    if policy.lm_head_bias is not None:
        manual = manual + policy.lm_head_bias
    real = mask.bool()
    torch.testing.assert_close(manual[real], expected[real], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(policy.logits(hidden)[real], expected[real], atol=1e-10, rtol=1e-10)


def test_lm_head_bias_is_exposed_and_used(generator):
    model = build_causal_lm("llama", seed_of(generator), dtype=torch.float64, tie_word_embeddings=False)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True,
                                    dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.bias.normal_(generator=generator)
    policy = PolicyModel(model)
    assert policy.lm_head_bias is model.lm_head.bias
    ids, mask = left_padded_prompts([5, 3], generator)
    expected = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    hidden = policy(ids, mask)
    real = mask.bool()
    torch.testing.assert_close((hidden @ policy.lm_head_weight.T + policy.lm_head_bias)[real], expected[real])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_norm_is_what_the_lm_head_reads(arch, generator):
    """The module `output_norm` names produces the LM head's input, and its gain is a trainable parameter."""
    model = build_causal_lm(arch, seed_of(generator), dtype=torch.float64)
    policy = PolicyModel(model)
    norm = policy.output_norm
    seen = {}
    norm.register_forward_hook(lambda module, args, output: seen.__setitem__("norm", output))
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: seen.__setitem__("head", args[0]))
    ids, mask = left_padded_prompts([5, 3], generator)
    model(input_ids=ids, attention_mask=mask)
    assert seen["head"] is seen["norm"] or torch.equal(seen["head"], seen["norm"])
    assert any(parameter is norm.weight for parameter in policy.parameters())


def test_output_norm_refuses_a_stack_without_one(generator):
    model = build_causal_lm("llama", seed_of(generator))
    model.model.norm = torch.nn.Identity()
    with pytest.raises(ValueError, match="no output norm"):
        _ = PolicyModel(model).output_norm


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_left_padded_row_matches_unpadded(arch, generator):
    model = build_causal_lm(arch, seed_of(generator), dtype=torch.float64)
    policy = PolicyModel(model)
    ids, mask = left_padded_prompts([6, 2, 4], generator)
    padded = policy(ids, mask)
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = policy(ids[row:row + 1, real])
        torch.testing.assert_close(padded[row, real], alone[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_embedding_gradients(arch, generator):
    """With tied embeddings lm_head_weight is the embedding matrix: a loss through hidden @ W.T produces the same
    embedding gradient as the same loss through the HF model's logits."""
    model = build_causal_lm(arch, seed_of(generator), tie_word_embeddings=True, dtype=torch.float64)
    policy = PolicyModel(model)
    embedding = model.get_input_embeddings().weight
    assert policy.lm_head_weight is embedding
    ids, mask = left_padded_prompts([5, 3], generator)
    targets = torch.randint(0, model.config.vocab_size, ids.shape, generator=generator)
    real = mask.bool()

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[real], targets[real])

    loss_of(policy.logits(policy(ids, mask))).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss_of(model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(ours[name], parameter.grad, atol=1e-10, rtol=1e-8, msg=name)
    # The embedding gets both contributions: input lookup (rows of the ids) and output projection (all rows).
    assert ours[next(n for n, p in model.named_parameters() if p is embedding)].abs().gt(0).all()


def test_untied_lm_head_is_separate(generator):
    model = build_causal_lm("llama", seed_of(generator), tie_word_embeddings=False)
    policy = PolicyModel(model)
    assert policy.lm_head_weight is model.lm_head.weight
    assert policy.lm_head_weight is not model.get_input_embeddings().weight
    assert policy.lm_head_bias is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip(arch, tmp_path, generator):
    model = build_causal_lm(arch, seed_of(generator))
    policy = PolicyModel(model)
    tokenizer = build_word_tokenizer(["alpha", "beta", "gamma"])
    policy.save_pretrained(tmp_path / "policy", tokenizer=tokenizer)
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "policy" / "tokenizer.json").is_file()

    reloaded = PolicyModel.from_pretrained(tmp_path / "policy")
    by_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    ids, mask = left_padded_prompts([5, 2], generator)
    expected = policy(ids, mask)
    torch.testing.assert_close(reloaded(ids, mask), expected, atol=0, rtol=0)
    torch.testing.assert_close(PolicyModel(by_transformers)(ids, mask), expected, atol=0, rtol=0)
    if model.config.tie_word_embeddings:
        assert reloaded.lm_head_weight is reloaded.hf_model.get_input_embeddings().weight


def test_from_pretrained_dtype(tmp_path, generator):
    PolicyModel(build_causal_lm("gpt2", seed_of(generator))).save_pretrained(tmp_path)
    policy = PolicyModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert policy.lm_head_weight.dtype == torch.bfloat16
    ids, mask = left_padded_prompts([3], generator)
    assert policy(ids, mask).dtype == torch.bfloat16


def test_bad_arguments(tmp_path, generator):
    with pytest.raises(ValueError, match="hf_model"):
        PolicyModel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="path"):
        PolicyModel.from_pretrained(tmp_path / "missing")
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator)))
    ids, mask = left_padded_prompts([3, 2], generator)
    with pytest.raises(ValueError, match="attention_mask"):
        policy(ids, mask[:, :2])
    with pytest.raises(ValueError, match="input_ids"):
        policy(ids[0])
