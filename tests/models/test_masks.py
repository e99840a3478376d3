"""Prepared 4-D attention masks: `causal_mask` against a plain loop, and the policy, value and reward forwards with
a 4-D mask (additive or bool) equal to the same forwards with the 2-D mask, left and right padded."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import (
    PolicyModel,
    RewardModel,
    ValueModel,
    causal_mask,
    last_token_index,
    position_ids_from_mask,
)
from tests.helpers import fresh_generator
from tests.models.archs import ARCHITECTURES, build_causal_lm, left_padded_prompts


@pytest.fixture
def generator():
    return fresh_generator()


def seed_of(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=generator))


def right_padded(ids: torch.Tensor, mask: torch.Tensor):
    """The same rows moved to the left edge (padding on the right)."""
    order = torch.argsort(mask, dim=1, descending=True, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


def padded_batch(padding_side: str, generator: torch.Generator):
    """Rows of lengths 6, 1, 4 (one with a single token), padded on the given side: ids, mask [3, 6]."""
    ids, mask = left_padded_prompts([6, 1, 4], generator)
    return (ids, mask) if padding_side == "left" else right_padded(ids, mask)


def reference_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L, L] bool, written as the rule reads: key j visible to query i iff j == i, or j < i and j
    is a real token."""
    batch, length = attention_mask.shape
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                allowed[b, i, j] = j == i or (j < i and bool(attention_mask[b, j]))
    return allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_causal_mask_matches_the_rule(dtype, generator):
    for batch, length in [(1, 1), (4, 7), (3, 1), (2, 12)]:
        mask = torch.rand(batch, length, generator=generator) > 0.4
        mask[0] = False  # a row with no real token still gets a nonempty softmax row per query (the diagonal)
        allowed = reference_causal_mask(mask)
        for given in (mask, mask.long(), mask.int()):
            prepared = causal_mask(given, dtype)
            assert prepared.shape == (batch, 1, length, length) and prepared.dtype == dtype
            assert torch.equal(prepared[:, 0] == 0, allowed)
            assert (prepared[:, 0][~allowed] == torch.finfo(dtype).min).all()


def test_causal_mask_bad_arguments():
    with pytest.raises(ValueError, match="attention_mask"):
        causal_mask(torch.ones(2, 1, 3, 3, dtype=torch.bool), torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        causal_mask(torch.ones(2, 3, dtype=torch.bool), torch.long)


def prepared_masks(mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 4-D forms a caller may pass: additive in the model's dtype, additive in float32, and bool."""
    additive = causal_mask(mask, dtype)
    return {"additive": additive, "additive_fp32": causal_mask(mask, torch.float32), "bool": additive == 0}


def hidden_of_rows_alone(policy: PolicyModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden states of each row's real tokens, each row run alone without padding, concatenated in the
    order of ``hidden[mask.bool()]``."""
    rows = []
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        rows.append(policy(ids[row : row + 1, real], torch.ones_like(ids[row : row + 1, real]))[0])
    return torch.cat(rows)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(
    ("arch", "attention"), [(arch, "sdpa") for arch in ARCHITECTURES] + [("llama", "eager")]
)
def test_policy_4d_mask_equals_2d(arch, attention, padding_side, generator):
    model = build_causal_lm(arch, seed_of(generator), dtype=torch.float64)
    # Eager attention adds the mask to the scores; sdpa also takes a bool mask as it is.
    model.set_attn_implementation(attention)
    policy = PolicyModel(model)
    ids, mask = padded_batch(padding_side, generator)
    positions = position_ids_from_mask(mask)
    real = mask.bool()
    with torch.no_grad():
        # transformers' eager attention with a 2-D mask turns fully masked float64 padding rows into NaN, which
        # then reaches the real tokens (0 x NaN); there the reference is each row run alone.
        expected = policy(ids, mask)[real] if attention == "sdpa" else hidden_of_rows_alone(policy, ids, mask)
        for form, prepared in prepared_masks(mask, torch.float64).items():
            hidden = policy(ids, prepared, positions)
            assert hidden.shape == (*ids.shape, model.config.hidden_size), form
            torch.testing.assert_close(hidden[real], expected, atol=1e-10, rtol=1e-10, msg=form)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_value_and_reward_4d_mask_equal_2d(arch, padding_side, generator):
    reward_model = RewardModel.from_policy(build_causal_lm(arch, seed_of(generator), dtype=torch.float64))
    reward_model.set_normalization(0.5)
    value_model = ValueModel.from_reward_model(reward_model)
    ids, mask = padded_batch(padding_side, generator)
    positions, last = position_ids_from_mask(mask), last_token_index(mask)
    real = mask.bool()
    with torch.no_grad():
        expected_scores = reward_model(ids, mask)
        expected_values = value_model(ids, mask)
        for form, prepared in prepared_masks(mask, torch.float64).items():
            scores = reward_model(ids, prepared, positions, last_index=last)
            torch.testing.assert_close(scores, expected_scores, atol=1e-6, rtol=1e-6, msg=form)
            values = value_model(ids, prepared, positions)
            assert values.shape == ids.shape and values.dtype == torch.float32
            torch.testing.assert_close(values[real], expected_values[real], atol=1e-6, rtol=1e-6, msg=form)


def test_4d_mask_gradients_equal_2d(generator):
    """Training through a prepared mask: the same gradients as through the 2-D mask."""
    value_model = ValueModel.from_policy(build_causal_lm("qwen2", seed_of(generator)), head_init_std=0.1)
    ids, mask = padded_batch("left", generator)
    real = mask.bool()
    gradients = []
    for prepared, positions in (
        (mask, None),
        (causal_mask(mask, torch.float32), position_ids_from_mask(mask)),
    ):
        value_model.zero_grad()
        value_model(ids, prepared, positions)[real].sum().backward()
        gradients.append([p.grad.clone() for p in value_model.parameters() if p.grad is not None])
    assert len(gradients[0]) == len(gradients[1]) > 0
    for two_d, four_d in zip(*gradients):
        torch.testing.assert_close(four_d, two_d, atol=1e-5, rtol=1e-4)


def test_4d_mask_bad_arguments(generator):
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator)))
    reward_model = RewardModel.from_policy(policy)
    ids, mask = padded_batch("left", generator)
    prepared, positions = causal_mask(mask, torch.float32), position_ids_from_mask(mask)
    with pytest.raises(ValueError, match="position_ids"):
        policy(ids, prepared)
    with pytest.raises(ValueError, match="position_ids"):
        policy(ids, prepared, positions[:, 1:])
    with pytest.raises(ValueError, match="attention_mask"):
        policy(ids, prepared[:, :, 1:], positions)
    with pytest.raises(ValueError, match="attention_mask"):
        policy(ids, prepared[:2], positions)
    with pytest.raises(ValueError, match="attention_mask"):
        policy(ids, (prepared == 0).long(), positions)
    with pytest.raises(ValueError, match="last_index"):
        reward_model(ids, prepared, positions)
    with pytest.raises(ValueError, match="last_index"):
        reward_model(ids, prepared, positions, last_index=last_token_index(mask)[:1])
    with pytest.raises(ValueError, match="position_ids"):
        ValueModel.from_reward_model(reward_model)(ids, prepared)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_2d_mask_path_equals_prepared_path_with_gradients(arch, generator):
    """The common path hands the [B, L] padding mask to the backbone (SDPA picks its kernel); the prepared 4-D
    path is for packing. On a left-padded batch both give the same values and gradients at the real tokens."""
    model = build_causal_lm(arch, seed_of(generator), dtype=torch.float64)
    model.set_attn_implementation("sdpa")
    value_model = ValueModel.from_policy(model, head_init_std=0.1)
    ids, mask = padded_batch("left", generator)
    real = mask.bool()
    results = []
    for attention, positions in ((mask, None), (causal_mask(mask, torch.float64), position_ids_from_mask(mask))):
        value_model.zero_grad()
        values = value_model(ids, attention, positions)
        values[real].sum().backward()
        gradients = [p.grad.clone() for p in value_model.parameters() if p.grad is not None]
        results.append((values.detach()[real], gradients))
    (values_2d, grads_2d), (values_4d, grads_4d) = results
    torch.testing.assert_close(values_2d, values_4d, atol=1e-6, rtol=1e-6)
    assert len(grads_4d) == len(grads_2d) > 0
    for two_d, four_d in zip(grads_2d, grads_4d):
        torch.testing.assert_close(two_d, four_d, atol=1e-6, rtol=1e-6)


def test_packed_causal_mask_matches_the_rule(generator):
    from rlhf_fast.models import packed_causal_mask

    document_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 2, -1, -1]])
    mask = packed_causal_mask(document_ids, torch.float32)
    assert mask.shape == (2, 1, 6, 6)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                same = document_ids[b, q] == document_ids[b, k] >= 0 and k <= q
                padding_self = document_ids[b, q] < 0 and k == q
                assert (mask[b, 0, q, k] == 0) == bool(same or padding_self), (b, q, k)


def test_shared_prefix_causal_mask_matches_the_rule():
    from rlhf_fast.models import shared_prefix_causal_mask

    segment_ids = torch.tensor([[0, 0, 1, 1, 2, 3, 3, -1], [0, 1, 2, 2, 2, -1, -1, -1]])
    mask = shared_prefix_causal_mask(segment_ids, torch.float32)
    assert mask.shape == (2, 1, 8, 8)
    for b in range(2):
        for q in range(8):
            for k in range(8):
                query, key = int(segment_ids[b, q]), int(segment_ids[b, k])
                visible = query >= 0 and k <= q and (key == 0 or key == query)
                padding_self = query < 0 and k == q
                assert (mask[b, 0, q, k] == 0) == (visible or padding_self), (b, q, k)


def shared_and_per_completion_scores(reward_model, generator, device="cpu"):
    """Scores and gradients of three rankings (K = 2, 5, 3, odd lengths) laid out as rows per completion
    (`collate_rankings`) and as one row per prompt (`collate_rankings_shared_prompt`)."""
    from rlhf_fast.data import collate_rankings, collate_rankings_shared_prompt
    from rlhf_fast.models import shared_prefix_causal_mask
    from tests.models.archs import EOS, PAD, VOCAB

    sizes = torch.randint(1, 12, (40,), generator=generator).tolist()
    items = []
    for k in (2, 5, 3):
        prompt = torch.randint(3, VOCAB, (sizes.pop(),), generator=generator).tolist()
        completions = [torch.randint(3, VOCAB, (sizes.pop() - 1,), generator=generator).tolist() + [EOS]
                       for _ in range(k)]
        items.append({"prompt_ids": prompt, "completion_ids": completions, "ranks": list(range(k))})
    dtype = next(reward_model.parameters()).dtype
    results = []
    for shared in (False, True):
        reward_model.zero_grad()
        if shared:
            batch = {k: v.to(device) for k, v in collate_rankings_shared_prompt(items, PAD).items()}
            mask = shared_prefix_causal_mask(batch["segment_ids"], dtype)
            scores = reward_model(batch["input_ids"], mask, batch["position_ids"],
                                  last_index=batch["last_token_index"], score_rows=batch["score_rows"])
        else:
            batch = {k: v.to(device) for k, v in collate_rankings(items, PAD).items()}
            scores = reward_model(batch["input_ids"], batch["attention_mask"])
        weights = torch.linspace(-1, 2, scores.numel(), dtype=scores.dtype, device=device)
        (scores * weights).sum().backward()
        results.append((scores.detach(), [p.grad.clone() for p in reward_model.parameters()]))
    return results


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reward_scores_with_a_shared_prompt_equal_rows_per_completion(arch, generator):
    """K completions after one prompt in one row (`collate_rankings_shared_prompt`) score as K rows of
    prompt + completion (`collate_rankings`), with the same gradients: float64, odd sizes, every family."""
    reward_model = RewardModel.from_policy(build_causal_lm(arch, seed_of(generator), dtype=torch.float64))
    reward_model.head.weight.data.normal_(generator=generator)
    (rows, rows_grads), (shared, shared_grads) = shared_and_per_completion_scores(reward_model, generator)
    torch.testing.assert_close(shared, rows, atol=1e-10, rtol=1e-10)
    # Llama's and Qwen2's RMSNorm runs in float32 whatever the model's dtype (transformers), so its backward
    # rounds the gradients, which sum over differently laid-out positions, to float32 precision.
    tolerance = 1e-10 if arch in ("gpt2", "gpt_neox") else 1e-5
    for a, b in zip(shared_grads, rows_grads):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reward_scores_with_a_shared_prompt_on_cuda(arch, generator):
    """On a GPU (transformers' SDPA attention, float32) the two layouts score alike too."""
    reward_model = RewardModel.from_policy(build_causal_lm(arch, seed_of(generator)))
    reward_model.head.weight.data.normal_(generator=generator)
    reward_model.cuda()
    (rows, rows_grads), (shared, shared_grads) = shared_and_per_completion_scores(
        reward_model, generator, device="cuda"
    )
    torch.testing.assert_close(shared, rows, atol=1e-4, rtol=1e-4)
    for a, b in zip(shared_grads, rows_grads):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_reward_model_score_rows_need_a_matching_last_index(generator):
    reward_model = RewardModel.from_policy(build_causal_lm("gpt2", seed_of(generator)))
    ids, mask = padded_batch("right", generator)
    with pytest.raises(ValueError, match="score_rows needs last_index"):
        reward_model(ids, mask, score_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="score_rows needs last_index"):
        reward_model(ids, mask, score_rows=torch.tensor([0, 1]), last_index=torch.tensor([0]))


def test_only_attention_that_reads_prepared_masks_is_trusted_with_them(generator):
    from rlhf_fast.models.masks import reads_prepared_masks

    model = build_causal_lm("llama", seed_of(generator))
    assert reads_prepared_masks(model)
    model.config._attn_implementation = "flash_attention_2"
    assert not reads_prepared_masks(model)


def test_fused_activation_matches_the_multi_op_gelu(generator):
    """The policy and the scalar-head models run GPT-2's tanh GELU as one kernel; outputs equal the modules'."""
    from transformers.activations import GELUTanh, NewGELUActivation

    model = build_causal_lm("gpt2", seed_of(generator), dtype=torch.float64)
    assert isinstance(model.transformer.h[0].mlp.act, NewGELUActivation)
    ids, mask = padded_batch("left", generator)
    with torch.no_grad():
        expected = model.transformer(input_ids=ids, attention_mask=mask,
                                     position_ids=position_ids_from_mask(mask)).last_hidden_state
    policy = PolicyModel(model)
    assert all(isinstance(block.mlp.act, GELUTanh) for block in model.transformer.h)
    assert model.config.activation_function == "gelu_pytorch_tanh"  # a saved model loads the fused one
    with torch.no_grad():
        torch.testing.assert_close(policy(ids, mask)[mask.bool()], expected[mask.bool()], atol=1e-12, rtol=1e-12)
    reward_model = RewardModel.from_policy(build_causal_lm("gpt2", seed_of(generator)))
    assert all(isinstance(block.mlp.act, GELUTanh) for block in reward_model.backbone.h)
