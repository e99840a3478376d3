"""Model set-up in one place: special-token ids, precision, activation checkpointing, LoRA adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_fast.models import PolicyModel, RewardModel, build_word_tokenizer, tiny_causal_lm
from rlhf_fast.models.loading import (
    LoRAConfig,
    Precision,
    adapters_disabled,
    add_lora,
    autocast_forward,
    enable_gradient_checkpointing,
    load_policy,
    merged_state_dict,
    prepare_trained,
    resolve_dtype,
    resolve_eos_token_id,
    resolve_pad_token_id,
    store_frozen,
)
from rlhf_fast.trainers._modules import PolicyLogprobs

WORDS = [f"w{i}" for i in range(20)]


def _policy(seed: int = 0, size: str = "tiny") -> PolicyModel:
    return PolicyModel(tiny_causal_lm(size, len(WORDS) + 4, max_positions=32, seed=seed))


def _batch(rows: int = 3, length: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(WORDS) + 4, (rows, length), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # a left-padded row
    return ids, mask


def test_dtype_auto_is_float32_on_a_cpu_and_names_are_checked():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("bf16", "cpu")


def test_special_token_ids_come_from_the_argument_then_tokenizer_then_config():
    tokenizer = build_word_tokenizer(WORDS)
    config = tiny_causal_lm("tiny", 30, pad_token_id=5, eos_token_id=6).config
    assert resolve_pad_token_id(9, tokenizer, config) == 9
    assert resolve_pad_token_id(None, tokenizer, config) == tokenizer.pad_token_id
    assert resolve_pad_token_id(None, None, config) == 5
    assert resolve_eos_token_id(None, tokenizer, config) == tokenizer.eos_token_id
    assert resolve_eos_token_id(None, None, config) == 6
    config.eos_token_id = [7, 8]
    assert resolve_eos_token_id(None, None, config) == 7
    config.pad_token_id = config.eos_token_id = None
    with pytest.raises(ValueError, match="pad_token_id is unknown"):
        resolve_pad_token_id(None, None, config)
    with pytest.raises(ValueError, match="eos_token_id is unknown"):
        resolve_eos_token_id(None, None, config)


def test_load_policy_wraps_a_causal_lm_and_refuses_other_objects():
    assert isinstance(load_policy(tiny_causal_lm("tiny", 30)), PolicyModel)
    with pytest.raises(ValueError, match="policy must be"):
        load_policy(torch.nn.Linear(2, 2))


def test_trained_models_keep_float32_master_weights_and_frozen_ones_take_the_compute_dtype():
    precision = Precision(torch.bfloat16, torch.device("cpu"))
    trained = prepare_trained(_policy().to(torch.bfloat16), precision)
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    reward = store_frozen(RewardModel.from_policy(_policy()), torch.bfloat16)
    assert {p.dtype for p in reward.backbone.parameters()} == {torch.bfloat16}
    assert reward.head.weight.dtype == torch.float32  # the scalar head stays float32
    assert not any(p.requires_grad for p in reward.parameters())


def test_autocast_forward_runs_the_matmuls_in_bfloat16_and_keeps_fp32_gradients():
    policy = _policy()
    module = PolicyLogprobs(policy)
    ids, mask = _batch()
    full = module(ids, mask, ids[:, 1:]).logprobs
    autocast_forward(module, "cpu", torch.bfloat16)
    mixed = module(ids, mask, ids[:, 1:]).logprobs
    assert mixed.dtype == torch.float32
    assert not torch.equal(mixed, full)  # the matmuls ran in bfloat16
    torch.testing.assert_close(mixed, full, rtol=0, atol=0.1)
    mixed.sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in policy.parameters())
    assert not torch.is_autocast_enabled("cpu")  # the hook left autocast


def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_activations():
    ids, mask = _batch(rows=4, length=16)

    def run(checkpointing: bool):
        policy = _policy(size="mini")
        if checkpointing:
            assert enable_gradient_checkpointing(policy.hf_model) == 4
        module = PolicyLogprobs(policy)
        saved = []
        # Predictions from padding masked out: checkpointed blocks run transformers' modules, plain ones may
        # run the functional forward (rlhf_fast.models.functional), and the two agree at real tokens only.
        real = mask[:, :-1] & mask[:, 1:]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = module(ids, mask, ids[:, 1:], mask=real).logprobs
        out.sum().backward()
        return {n: p.grad for n, p in policy.named_parameters()}, sum(saved), out.detach()

    plain, plain_saved, plain_out = run(False)
    checkpointed, checkpointed_saved, checkpointed_out = run(True)
    torch.testing.assert_close(checkpointed_out, plain_out, rtol=0, atol=0)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert checkpointed_saved < plain_saved / 2


def test_lora_trains_only_adapters_and_disabling_them_gives_the_base():
    pytest.importorskip("peft")
    policy = _policy()
    base = copy.deepcopy(policy)
    add_lora(policy, LoRAConfig(r=4, alpha=8))
    trained = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    with torch.no_grad():  # move the adapters off zero, as training would
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    ids, mask = _batch()
    # Predictions from real tokens only: the adapted model runs transformers' modules, the base may run the
    # functional forward (rlhf_fast.models.functional), and the two agree at real tokens.
    real = mask[:, :-1] & mask[:, 1:]
    adapted = PolicyLogprobs(policy)(ids, mask, ids[:, 1:], mask=real).logprobs
    reference = PolicyLogprobs(base)(ids, mask, ids[:, 1:], mask=real).logprobs
    with adapters_disabled(policy):
        disabled = PolicyLogprobs(policy)(ids, mask, ids[:, 1:], mask=real).logprobs
    torch.testing.assert_close(disabled, reference, rtol=0, atol=0)
    assert not torch.allclose(adapted, reference, atol=1e-3)

    # The merged weights reproduce the adapted model in the adapter-free architecture.
    merged = copy.deepcopy(base)
    merged.hf_model.load_state_dict(merged_state_dict(policy), strict=True)
    torch.testing.assert_close(
        PolicyLogprobs(merged)(ids, mask, ids[:, 1:], mask=real).logprobs, adapted, rtol=1e-5, atol=1e-5
    )


def test_lora_config_is_checked():
    with pytest.raises(ValueError, match="lora.r"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="lora.dropout"):
        LoRAConfig(dropout=1.0)
