"""The sampler's early stop (`stop_check_every`), its entropy output and its filtered log-probs."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import PolicyModel
from rlhf_fast.rollout import sample, sampler
from rlhf_fast.trainers._modules import PolicyLogprobs
from tests.helpers import fresh_generator
from tests.models.archs import PAD, build_causal_lm, left_padded_prompts


@pytest.fixture
def generator():
    return fresh_generator()


def seed_of(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=generator))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("every", [1, 3])
def test_early_stop_equals_the_full_loop(arch, every, generator, monkeypatch):
    """Every row ends early (most of the vocabulary ends a row; temperature 3 flattens the model's preferences):
    the loop stops once every row has ended, and the output is the full loop's, token for token."""
    model = build_causal_lm(arch, seed_of(generator))
    ids, mask = left_padded_prompts([5, 2, 7, 3, 4, 6], generator)
    eos_ids = list(range(3, 80))
    steps_run = []
    step = sampler._DecodeProgram.step
    monkeypatch.setattr(sampler._DecodeProgram, "step", lambda self, buffers: (steps_run.append(1), step(self, buffers)))
    seed, new_tokens = seed_of(generator), 40
    outputs = []
    for check in (0, every):
        steps_run.clear()
        outputs.append(sample(model, ids, mask, new_tokens, temperature=3.0, eos_token_id=eos_ids, pad_token_id=PAD,
                              generator=torch.Generator().manual_seed(seed), return_logprobs=True,
                              return_entropy=True, stop_check_every=check))
        outputs[-1].steps = len(steps_run)
    full, early = outputs
    assert full.steps == new_tokens - 1
    lengths = full.response_mask.sum(1)
    assert int(lengths.max()) < new_tokens // 2, lengths  # the workload: every row ends early
    assert early.steps < full.steps
    for name in ("sequences", "response_ids", "response_mask", "logprobs", "entropy"):
        assert torch.equal(getattr(early, name), getattr(full, name)), name


def test_stop_check_every_rejects_negative(generator):
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([3, 2], generator)
    with pytest.raises(ValueError, match="stop_check_every"):
        sample(model, ids, mask, 4, eos_token_id=2, pad_token_id=PAD, stop_check_every=-1)


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.8)])
def test_filtered_logprobs_and_entropy_match_the_scoring_forward(top_k, top_p, generator):
    """With `filtered_logprobs` the sampler reports the log-prob and entropy of the distribution it drew from,
    which is what `PolicyLogprobs` recomputes with the same top-k / top-p: the first PPO ratio is 1."""
    policy = PolicyModel(build_causal_lm("qwen2", seed_of(generator), dtype=torch.float64))
    ids, mask = left_padded_prompts([5, 2, 7], generator)
    temperature = 0.9
    out = sample(policy, ids, mask, 9, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=2,
                 pad_token_id=PAD, generator=generator, return_logprobs=True, return_entropy=True,
                 filtered_logprobs=True)
    full_mask = torch.cat([mask.bool(), out.response_mask], dim=1)
    with torch.no_grad():
        recomputed = PolicyLogprobs(policy)(out.sequences, full_mask, out.response_ids, mask=out.response_mask,
                                            temperature=temperature, top_k=top_k, top_p=top_p,
                                            return_entropy=True)
    valid = out.response_mask
    torch.testing.assert_close(out.logprobs[valid].double(), recomputed.logprobs[valid].double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.entropy[valid].double(), recomputed.entropy[valid].double(), atol=1e-5, rtol=0)
    assert torch.isfinite(recomputed.logprobs).all()
    if top_k:
        assert (out.entropy[valid] <= torch.log(torch.tensor(float(top_k))) + 1e-6).all()
    # The unfiltered log-probs differ once the filter removes mass.
    if top_k or top_p < 1:
        unfiltered = sample(policy, ids, mask, 9, temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_token_id=2, pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
                            return_logprobs=True, return_entropy=True)
        filtered = sample(policy, ids, mask, 9, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_token_id=2, pad_token_id=PAD, generator=torch.Generator().manual_seed(0),
                          return_logprobs=True, return_entropy=True, filtered_logprobs=True)
        assert torch.equal(unfiltered.response_ids, filtered.response_ids)
        assert (filtered.logprobs >= unfiltered.logprobs - 1e-9).all()
        assert (filtered.logprobs > unfiltered.logprobs + 1e-6).any()


def test_filtered_logprobs_have_gradients(generator):
    policy = PolicyModel(build_causal_lm("gpt2", seed_of(generator), dtype=torch.float64))
    ids, mask = left_padded_prompts([4, 3], generator)
    out = sample(policy, ids, mask, 5, top_k=4, top_p=0.9, eos_token_id=2, pad_token_id=PAD, generator=generator)
    full_mask = torch.cat([mask.bool(), out.response_mask], dim=1)
    result = PolicyLogprobs(policy)(out.sequences, full_mask, out.response_ids, mask=out.response_mask, top_k=4,
                                    top_p=0.9)
    result.logprobs.sum().backward()
    grad = policy.lm_head_weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
