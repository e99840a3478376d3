"""rlhf_fast.models.functional: the flat GPT-2 forward against transformers' modules (hidden states and
gradients at the real tokens, every mask form), and every case where it must step aside: replaced layers
(peft's LoRA), hooks, activation checkpointing, dropout that would fire, another activation.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import PolicyModel, functional
from rlhf_fast.models._common import rows_at
from rlhf_fast.models.loading import LoRAConfig, add_lora, enable_gradient_checkpointing
from rlhf_fast.models.masks import packed_causal_mask
from rlhf_fast.ops._backend import use_backend
from rlhf_fast.rollout import sample
from tests.helpers import fresh_generator
from tests.models.archs import PAD, VOCAB, build_causal_lm, left_padded_prompts


def seed_of(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=generator))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_equals_the_modules_at_real_tokens_with_gradients(dtype, monkeypatch):
    generator = fresh_generator()
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator), dtype=dtype)).train()
    assert functional.functional_forward(policy.backbone) is not None  # dropout is 0: it may run
    ids, mask = left_padded_prompts([9, 4, 1, 7], generator)
    real = mask.bool()
    grads = []
    outputs = []
    for architectures in (functional.ARCHITECTURES, {}):
        with monkeypatch.context() as patch:
            patch.setattr(functional, "ARCHITECTURES", architectures)
            policy.zero_grad(set_to_none=True)
            hidden = policy(ids, mask)
            weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
            (hidden[real] * weights[real]).sum().backward()
            outputs.append(hidden.detach()[real])
            grads.append({name: p.grad.clone() for name, p in policy.named_parameters()})
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(outputs[0], outputs[1], **tolerance)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], **tolerance, msg=name)


def test_forward_with_no_mask_and_with_a_packed_mask(monkeypatch):
    generator = fresh_generator()
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator), dtype=torch.float64))
    ids = torch.randint(3, VOCAB, (2, 11), generator=generator)
    documents = torch.tensor([[0] * 4 + [1] * 7, [0] * 6 + [1] * 3 + [-1] * 2])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 0]])
    cases = [((ids,), torch.ones_like(ids, dtype=torch.bool)),
             ((ids, packed_causal_mask(documents, torch.float64), positions), documents >= 0)]  # fmt: skip
    for args, real in cases:
        got = {}
        for name, architectures in (("functional", functional.ARCHITECTURES), ("modules", {})):
            with monkeypatch.context() as patch:
                patch.setattr(functional, "ARCHITECTURES", architectures)
                with torch.no_grad():
                    got[name] = policy(*args)[real]
        torch.testing.assert_close(got["functional"], got["modules"], rtol=1e-10, atol=1e-10)


def test_steps_aside_for_anything_the_modules_would_do_differently():
    generator = fresh_generator()
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator)))
    assert functional.functional_forward(policy.backbone) is not None
    assert functional.functional_decode_step(policy.backbone) is not None

    # A forward hook (FSDP2 all-gathers its shards in one), on any module.
    handle = policy.backbone.h[1].mlp.register_forward_pre_hook(lambda module, args: None)
    assert functional.functional_forward(policy.backbone) is None
    handle.remove()
    assert functional.functional_forward(policy.backbone) is not None

    # Dropout that would fire: only in training mode with p > 0.
    policy.backbone.h[0].attn.resid_dropout.p = 0.1
    assert functional.functional_forward(policy.backbone) is not None  # eval mode: dropout is off
    policy.train()
    assert functional.functional_forward(policy.backbone) is None
    policy.backbone.h[0].attn.resid_dropout.p = 0.0
    assert functional.functional_forward(policy.backbone) is not None

    # Activation checkpointing replaces the blocks' forward.
    checkpointed = PolicyModel(build_causal_lm("gpt2", seed_of(generator)))
    enable_gradient_checkpointing(checkpointed.hf_model)
    assert functional.functional_forward(checkpointed.backbone) is None

    # Another activation than the tanh GELU.
    relu = build_causal_lm("gpt2", seed_of(generator))
    relu.config.activation_function = "relu"
    relu = PolicyModel(type(relu)(relu.config))
    assert functional.functional_forward(relu.backbone) is None


def test_lora_layers_make_it_step_aside_and_sampling_sees_the_adapters(monkeypatch):
    # peft replaces the attention projections; reading their `.weight` would read the base weights only.
    pytest.importorskip("peft")
    generator = fresh_generator()
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator)))
    add_lora(policy, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=generator)
    assert functional.functional_forward(policy.backbone) is None
    assert functional.functional_decode_step(policy.backbone) is None
    ids, mask = left_padded_prompts([5, 3, 6], generator)
    seed = seed_of(generator)
    outputs = []
    for architectures in (functional.ARCHITECTURES, {}):
        with monkeypatch.context() as patch:
            patch.setattr(functional, "ARCHITECTURES", architectures)
            outputs.append(sample(policy, ids, mask, 12, generator=torch.Generator().manual_seed(seed),
                                  eos_token_id=None, pad_token_id=PAD))  # fmt: skip
    assert torch.equal(outputs[0].response_ids, outputs[1].response_ids)
    torch.testing.assert_close(outputs[0].logprobs, outputs[1].logprobs, rtol=0, atol=0)


def test_the_decode_step_runs_under_fsdp2_with_every_shard_gathered(tmp_path, monkeypatch):
    # The trainers sample inside `unsharded` (every FSDP2 shard gathered): FSDP2's subclasses and its hooks
    # only gather and free shards, so the flat step still runs there, and samples what the module path does.
    # The full forward, called while shards may be freed, keeps to the modules.
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from rlhf_fast.trainers.distributed import unsharded

    generator = fresh_generator()
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator)))
    ids, mask = left_padded_prompts([5, 3, 6], generator)
    seed = seed_of(generator)
    options = {"eos_token_id": None, "pad_token_id": PAD}
    plain = sample(policy, ids, mask, 10, generator=torch.Generator().manual_seed(seed), **options)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for block in policy.backbone.h:
            fully_shard(block)
        fully_shard(policy)
        assert functional.functional_forward(policy.backbone) is None
        assert functional.functional_decode_step(policy.backbone) is not None
        with unsharded(policy):
            sharded = sample(policy, ids, mask, 10, generator=torch.Generator().manual_seed(seed), **options)
    finally:
        dist.destroy_process_group()
    assert torch.equal(sharded.response_ids, plain.response_ids)
    torch.testing.assert_close(sharded.logprobs, plain.logprobs, rtol=0, atol=0)


# ------------------------------------------------------------------------------- the compiled CPU decode step
def gpt2_backbone(generator: torch.Generator, dtype: torch.dtype, **config):
    """A random GPT-2 backbone, by default with 3 layers, an odd MLP width, per-layer attention scaling and a
    non-default norm epsilon, weights wide enough for distinct attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = {"n_layer": 3, "n_embd": 30, "n_head": 5, "n_inner": 37, "vocab_size": VOCAB, "n_positions": 40,
                "scale_attn_by_inverse_layer_idx": True, "layer_norm_epsilon": 1e-3, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0} | config  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(generator))
        backbone = PolicyModel(GPT2LMHeadModel(GPT2Config(**settings))).backbone.eval()
        with torch.no_grad():
            for parameter in backbone.parameters():
                parameter.normal_(0.0, 0.5)
    return backbone.to(dtype)


def decode_state(backbone, batch: int, slots: int, slot: int, generator: torch.Generator, dtype: torch.dtype):
    """Caches filled with noise before `slot`, a mask hiding some earlier slots of each row and every slot after
    `slot`, and a token and position per row: the arguments of one decode step."""
    config = backbone.config
    heads, head_dim = config.n_head, config.n_embd // config.n_head
    shape = (batch, heads, slots, head_dim)
    keys = [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(config.n_layer)]
    values = [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(config.n_layer)]
    visible = torch.rand((batch, slots), generator=generator) < 0.7
    visible[:, slot] = True
    visible[:, slot + 1 :] = False
    mask = torch.zeros((batch, 1, 1, slots), dtype=dtype).masked_fill(
        ~visible[:, None, None], torch.finfo(dtype).min
    )
    ids = torch.randint(0, config.vocab_size, (batch, 1), generator=generator)
    positions = torch.randint(0, config.n_positions, (batch, 1), generator=generator)
    return ids, positions, mask, torch.tensor([slot]), keys, values


@pytest.mark.skipif(not functional._extension.has_cpp_kernels(), reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("batch", "slots", "slot"), [(1, 1, 0), (5, 13, 9), (4, 9, 8)])
def test_compiled_decode_step_equals_the_python_step(dtype, batch, slots, slot, monkeypatch):
    generator = fresh_generator()
    backbone = gpt2_backbone(generator, dtype)
    ids, positions, mask, cache_index, keys, values = decode_state(
        backbone, batch, slots, slot, generator, dtype
    )
    outputs, caches = [], []
    for compiled in (True, False):
        with monkeypatch.context() as patch:
            if not compiled:
                patch.setattr(functional, "_compiled_step_runs", lambda device, dtype: False)
            assert functional._compiled_step_runs(ids.device, dtype) is compiled
            step = functional.functional_decode_step(backbone)
            step_keys, step_values = [k.clone() for k in keys], [v.clone() for v in values]
            with torch.no_grad():
                outputs.append(step(ids, positions, mask, cache_index, step_keys, step_values))
            caches.append(step_keys + step_values)
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    torch.testing.assert_close(outputs[0], outputs[1], **tolerance)
    for written, expected, before in zip(caches[0], caches[1], keys + values):
        torch.testing.assert_close(written, expected, **tolerance)
        others = torch.ones(slots, dtype=torch.bool)
        others[slot] = False
        assert torch.equal(written[:, :, others], before[:, :, others])  # only the fed slot is written


@pytest.mark.skipif(not functional._extension.has_cpp_kernels(), reason="needs the compiled extension")
def test_sampling_with_the_compiled_step_draws_what_the_python_step_draws(monkeypatch):
    generator = fresh_generator()
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator), dtype=torch.float64))
    ids, mask = left_padded_prompts([7, 2, 5, 1], generator)
    seed = seed_of(generator)
    outputs = []
    for compiled in (True, False):
        with monkeypatch.context() as patch:
            if not compiled:
                patch.setattr(functional, "_compiled_step_runs", lambda device, dtype: False)
            outputs.append(sample(policy, ids, mask, 14, generator=torch.Generator().manual_seed(seed),
                                  eos_token_id=None, pad_token_id=PAD, return_logprobs=True,
                                  return_entropy=True))  # fmt: skip
    assert torch.equal(outputs[0].response_ids, outputs[1].response_ids)
    # The head's logits are float32 whatever the model's dtype.
    torch.testing.assert_close(outputs[0].logprobs, outputs[1].logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0].entropy, outputs[1].entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not functional._extension.has_cpp_kernels(), reason="needs the compiled extension")
def test_compiled_decode_step_checks_its_inputs_and_steps_aside_where_it_does_not_apply():
    generator = fresh_generator()
    backbone = gpt2_backbone(generator, torch.float32)
    step = functional.functional_decode_step(backbone)
    ids, positions, mask, cache_index, keys, values = decode_state(
        backbone, 2, 6, 3, generator, torch.float32
    )
    with pytest.raises(RuntimeError, match="cache_index 6 is outside"):
        step(ids, positions, mask, torch.tensor([6]), keys, values)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        step(torch.full_like(ids, VOCAB), positions, mask, cache_index, keys, values)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        step(ids, positions, mask, cache_index, [k.transpose(1, 2).contiguous().transpose(1, 2) for k in keys],
             values)  # fmt: skip
    # Other dtypes, autocast, and the forced reference backend run the Python step.
    assert not functional._compiled_step_runs(torch.device("cpu"), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not functional._compiled_step_runs(torch.device("cpu"), torch.float32)
    with use_backend("reference"):
        assert not functional._compiled_step_runs(torch.device("cpu"), torch.float32)
    assert functional._compiled_step_runs(torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------- outputs at the positions read
@pytest.mark.parametrize("path", ["functional", "modules"])
def test_outputs_at_the_positions_read_equal_the_full_forwards_rows_with_gradients(path, monkeypatch):
    if path == "modules":
        monkeypatch.setattr(functional, "ARCHITECTURES", {})
    generator = fresh_generator()
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator), dtype=torch.float64)).train()
    ids, mask = left_padded_prompts([9, 4, 1, 7], generator)
    last = torch.tensor([8, 8, 8, 3])  # a row's last real token, and one in the middle of a row
    for outputs_at in (slice(3, 8), slice(0, 9), last):
        results = []
        for read in (True, False):
            policy.zero_grad(set_to_none=True)
            if read:
                hidden = policy(ids, mask, outputs_at=outputs_at)
            else:
                full = policy(ids, mask)
                hidden = full[:, outputs_at] if isinstance(outputs_at, slice) else full[torch.arange(4), last]
            weights = torch.randn(
                hidden.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
            )
            (hidden * weights).sum().backward()
            results.append((hidden.detach(), {name: p.grad.clone() for name, p in policy.named_parameters()}))
        (read_hidden, read_grads), (full_hidden, full_grads) = results
        assert read_hidden.shape == full_hidden.shape
        torch.testing.assert_close(read_hidden, full_hidden, rtol=1e-10, atol=1e-10)
        for name in full_grads:
            torch.testing.assert_close(read_grads[name], full_grads[name], rtol=1e-10, atol=1e-10, msg=name)


def test_reward_model_scores_the_last_real_token_with_the_last_block_there_only(monkeypatch):
    from rlhf_fast.models import RewardModel

    generator = fresh_generator()
    reward_model = RewardModel.from_policy(build_causal_lm("gpt2", seed_of(generator), dtype=torch.float64))
    ids, mask = left_padded_prompts([6, 2, 5], generator)
    ids, mask = torch.cat([ids, ids[:, :2]], 1), torch.cat([mask, torch.zeros(3, 2, dtype=mask.dtype)], 1)
    reads = []
    monkeypatch.setattr(functional, "rows_at", lambda *args: reads.append(args[1]) or rows_at(*args))
    with torch.no_grad():
        scores = reward_model(ids, mask)
        full = reward_model.hidden_states(ids, mask)
    assert reads and torch.equal(reads[0], torch.tensor([5, 5, 5]))  # left padded, then right padded
    expected = reward_model.score(full[:, 5]) + reward_model._normalization_bias
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-10)
