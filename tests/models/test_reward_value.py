"""RewardModel and ValueModel: score at the last real token, normalization, init from a policy / RM, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from rlhf_fast.models import (
    PolicyModel,
    RewardModel,
    ValueModel,
    build_word_tokenizer,
    ended_with_eos,
    last_token_index,
)
from rlhf_fast.models._common import use_fused_activations
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


def test_last_token_index_any_padding_side():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 2, 0, 3]
    assert last_token_index(mask.bool()).tolist() == [3, 2, 0, 3]


def test_ended_with_eos_appends_eos_where_the_row_did_not_end(generator):
    """[B, L] rows (prompt left-padded, response right-padded) -> the rows `token_rows` builds from the same
    token lists: an eos after every response that did not end; the ones that did keep theirs."""
    from rlhf_fast.eval.generate import token_rows

    eos, pad, batch, prompt_width, response_width = 2, 0, 9, 5, 4
    prompt_lengths = torch.randint(1, prompt_width + 1, (batch,), generator=generator).tolist()
    response_lengths = torch.randint(0, response_width + 1, (batch,), generator=generator).tolist()
    ended = (torch.rand(batch, generator=generator) < 0.5) & (torch.tensor(response_lengths) > 0)
    ended[0], ended[1] = True, False  # both kinds, whatever the draw
    response_lengths[0] = max(response_lengths[0], 1)
    ids = torch.full((batch, prompt_width + response_width), pad)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    prompts, responses = [], []
    for row in range(batch):
        prompt = torch.randint(3, 50, (prompt_lengths[row],), generator=generator).tolist()
        response = torch.randint(3, 50, (response_lengths[row],), generator=generator).tolist()
        if ended[row]:
            response[-1] = eos
        ids[row, prompt_width - len(prompt) : prompt_width + len(response)] = torch.tensor(prompt + response)
        mask[row, prompt_width - len(prompt) : prompt_width + len(response)] = True
        prompts.append(prompt)
        responses.append(response[:-1] if ended[row] else response)

    out_ids, out_mask = ended_with_eos(ids, mask, ended, eos)
    assert out_ids.shape == (batch, prompt_width + response_width + 1) and out_mask.dtype == torch.bool
    rows = [out_ids[row][out_mask[row]].tolist() for row in range(batch)]
    assert rows == token_rows(prompts, responses, eos)
    assert torch.equal(out_ids[:, :-1][mask], ids[mask])  # the rows' own tokens untouched
    assert torch.equal(last_token_index(out_mask), last_token_index(mask) + (~ended).long())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reward_read_at_last_real_token_left_and_right_padding(arch, generator):
    reward_model = RewardModel.from_policy(build_causal_lm(arch, seed_of(generator), dtype=torch.float64))
    ids, mask = left_padded_prompts([6, 3, 1, 4], generator)
    left_scores = reward_model(ids, mask)
    right_scores = reward_model(*right_padded(ids, mask))
    assert left_scores.shape == (4,) and left_scores.dtype == torch.float32
    alone = torch.cat([reward_model(ids[r:r + 1, mask[r].bool()], torch.ones_like(ids[r:r + 1, mask[r].bool()]))
                       for r in range(ids.shape[0])])
    torch.testing.assert_close(left_scores, alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(right_scores, alone, atol=1e-6, rtol=1e-6)
    # Explicitly: the head applied to the hidden state at the last real token.
    hidden = reward_model.hidden_states(ids, mask)
    manual = (hidden[:, -1].float() @ reward_model.head.weight.float().T).squeeze(-1) + reward_model.head.bias
    torch.testing.assert_close(left_scores, manual, atol=1e-6, rtol=1e-6)


def test_normalization_offset_applied_and_persisted(tmp_path, generator):
    reward_model = RewardModel.from_policy(build_causal_lm("gpt2", seed_of(generator)))
    ids, mask = left_padded_prompts([5, 4, 2, 3], generator)
    with torch.no_grad():
        raw = reward_model(ids, mask)
    reward_model.set_normalization(-float(raw.mean()))
    with torch.no_grad():
        normalized = reward_model(ids, mask)
    torch.testing.assert_close(normalized, raw - raw.mean())
    assert abs(float(normalized.mean())) < 1e-5

    tokenizer = build_word_tokenizer(["x", "y"])
    reward_model.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    config = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert config["normalization_bias"] == pytest.approx(-float(raw.mean()))
    reloaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert reloaded.normalization_bias == reward_model.normalization_bias
    torch.testing.assert_close(reloaded(ids, mask), normalized, atol=0, rtol=0)
    # transformers opens the backbone directory as a base model (with the activation kernel ours run, the
    # same hidden states bit for bit at the real tokens; padding positions hold whatever each path leaves).
    backbone = AutoModel.from_pretrained(tmp_path / "rm")
    use_fused_activations(backbone)
    real = mask.bool()
    torch.testing.assert_close(backbone(input_ids=ids, attention_mask=mask,
                                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state[real],
                               reward_model.hidden_states(ids, mask)[real], atol=0, rtol=0)
    with pytest.raises(ValueError, match="bias"):
        reward_model.set_normalization(float("nan"))


@pytest.mark.parametrize("source", ["policy", "hf_model", "directory"])
def test_reward_from_policy_copies_backbone_and_drops_lm_head(source, tmp_path, generator):
    model = build_causal_lm("llama", seed_of(generator), tie_word_embeddings=False)
    policy = PolicyModel(model)
    if source == "directory":
        policy.save_pretrained(tmp_path)
        reward_model = RewardModel.from_policy(tmp_path)
    else:
        reward_model = RewardModel.from_policy(policy if source == "policy" else model)
    names = {name for name, _ in reward_model.named_parameters()}
    assert not any("lm_head" in name for name in names)
    assert torch.isfinite(reward_model.head.weight).all() and reward_model.head.weight.std() > 0
    ids, mask = left_padded_prompts([4, 2], generator)
    torch.testing.assert_close(reward_model.hidden_states(ids, mask), policy(ids, mask), atol=0, rtol=0)
    # A copy: training the reward model does not move the policy.
    with torch.no_grad():
        next(reward_model.backbone.parameters()).add_(1.0)
    assert not torch.equal(reward_model.hidden_states(ids, mask), policy(ids, mask))


def test_reward_gradients_reach_backbone_and_head(generator):
    reward_model = RewardModel.from_policy(build_causal_lm("gpt2", seed_of(generator)))
    ids, mask = left_padded_prompts([4, 3], generator)
    reward_model(ids, mask).sum().backward()
    assert reward_model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in reward_model.backbone.parameters() if p.requires_grad
               and p is not reward_model.backbone.get_input_embeddings().weight)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_value_from_reward_model(arch, generator):
    reward_model = RewardModel.from_policy(build_causal_lm(arch, seed_of(generator)))
    reward_model.set_normalization(0.75)
    value_model = ValueModel.from_reward_model(reward_model)
    ids, mask = left_padded_prompts([5, 2, 3], generator)
    values = value_model(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    # At each row's last real token the value is the RM's raw score (the normalization offset stays with the RM).
    last = last_token_index(mask)
    torch.testing.assert_close(values[torch.arange(3), last], reward_model(ids, mask) - 0.75)
    with torch.no_grad():
        value_model.head.weight.add_(1.0)
        next(value_model.backbone.parameters()).add_(1.0)
    torch.testing.assert_close(reward_model(ids, mask) - 0.75, values[torch.arange(3), last])


def test_value_save_load_round_trip(tmp_path, generator):
    value_model = ValueModel.from_policy(build_causal_lm("gpt_neox", seed_of(generator)))
    assert value_model.head.weight.abs().sum() == 0  # values start at 0
    with torch.no_grad():
        value_model.head.weight.normal_(generator=generator)
        value_model.head.bias.normal_(generator=generator)
    value_model.save_pretrained(tmp_path / "v")
    reloaded = ValueModel.from_pretrained(tmp_path / "v")
    ids, mask = left_padded_prompts([5, 1], generator)
    torch.testing.assert_close(reloaded(ids, mask), value_model(ids, mask), atol=0, rtol=0)
    AutoModel.from_pretrained(tmp_path / "v")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="value_head"):
        ValueModel.from_pretrained(tmp_path / "empty")


def test_bf16_backbone_float32_head_and_scores(tmp_path, generator):
    PolicyModel(build_causal_lm("gpt2", seed_of(generator))).save_pretrained(tmp_path)
    reward_model = RewardModel.from_policy(tmp_path, dtype=torch.bfloat16)
    assert next(reward_model.backbone.parameters()).dtype == torch.bfloat16
    assert reward_model.head.weight.dtype == torch.float32
    ids, mask = left_padded_prompts([3, 2], generator)
    assert reward_model(ids, mask).dtype == torch.float32
    value_model = ValueModel.from_reward_model(reward_model)
    assert value_model(ids, mask).dtype == torch.float32


def test_bad_arguments(generator):
    reward_model = RewardModel.from_policy(build_causal_lm("gpt2", seed_of(generator)))
    ids, mask = left_padded_prompts([3, 2], generator)
    with pytest.raises(ValueError, match="attention_mask"):
        reward_model(ids, None)
    with pytest.raises(ValueError, match="attention_mask"):
        reward_model(ids, mask[:1])
    with pytest.raises(ValueError, match="reward_model"):
        ValueModel.from_reward_model(object())
    with pytest.raises(ValueError, match="policy_model_or_path"):
        RewardModel.from_policy(42)
    with pytest.raises(ValueError, match="backbone"):
        RewardModel(build_causal_lm("gpt2", 0))
