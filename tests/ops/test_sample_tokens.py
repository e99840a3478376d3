"""rlhf_fast.ops.sample_tokens: the CPU kernel against the torch composition on the same uniforms, with
filtered (−inf) tokens, the ends of the uniform's range, peaked and flat rows; and the drawn frequencies
against the softmax."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.ops import use_backend
from rlhf_fast.ops.sample_tokens import IMPLEMENTED, sample_tokens, sample_tokens_reference
from tests.helpers import fresh_generator, kernel_backends

BACKENDS = kernel_backends(IMPLEMENTED)


def random_logits(batch, vocab, generator, scale=3.0, filtered_share=0.3):
    logits = torch.randn(batch, vocab, generator=generator) * scale
    drop = torch.rand(batch, vocab, generator=generator) < filtered_share
    drop[:, 0] = False  # every row keeps a token with mass
    return logits.masked_fill(drop, float("-inf"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("batch", "vocab"), [(1, 1), (3, 7), (33, 2048), (5, 50257)])
def test_matches_the_torch_composition(backend, batch, vocab):
    generator = fresh_generator()
    logits = random_logits(batch, vocab, generator)
    uniform = torch.rand(batch, generator=generator)
    expected = sample_tokens_reference(logits, uniform)
    with use_backend(backend):
        tokens, logprobs, entropy = sample_tokens(logits, uniform)
    assert tokens.dtype == torch.int64 and tokens.shape == (batch,)
    # The same token but where U·total falls within rounding of an interval's edge: there the two tokens' intervals
    # meet (every token between them without mass) and U·total lies at the edge, in float64.
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    for row in (tokens != expected[0]).nonzero().flatten().tolist():
        low, high = sorted((int(tokens[row]), int(expected[0][row])))
        edge, target = cdf[row, low], float(uniform[row]) * cdf[row, -1]
        assert cdf[row, high - 1] - edge <= 1e-5 and abs(target - edge) <= 1e-5, (row, repr(generator))
    assert torch.isfinite(logits.gather(-1, tokens[:, None])).all()
    reference_logprobs = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), reference_logprobs, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(entropy, expected[2], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("uniform_value", [0.0, 1.0, 1.0 - 2**-24])
def test_range_ends_pick_tokens_with_mass(backend, uniform_value):
    generator = fresh_generator()
    logits = random_logits(16, 37, generator, filtered_share=0.6)
    uniform = torch.full((16,), uniform_value)
    with use_backend(backend):
        tokens = sample_tokens(logits, uniform, False, False)[0]
    kept = torch.isfinite(logits)
    positions = torch.arange(logits.shape[-1]).expand_as(logits)
    if uniform_value == 0.0:
        assert torch.equal(tokens, torch.where(kept, positions, 99).amin(-1))
    else:
        assert kept.gather(-1, tokens[:, None]).all()
        assert torch.equal(tokens, torch.where(kept, positions, -1).amax(-1)) or uniform_value < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_frequencies_follow_the_softmax(backend):
    generator = fresh_generator()
    logits = random_logits(1, 12, generator, scale=1.0).expand(20000, -1).contiguous()
    with use_backend(backend):
        tokens = sample_tokens(logits, torch.rand(20000, generator=generator), False, False)[0]
    observed = torch.bincount(tokens, minlength=12).double() / 20000
    expected = torch.softmax(logits[0].double(), -1)
    assert (observed - expected).abs().max() < 5 * (expected * (1 - expected) / 20000).sqrt().max() + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_not_asked_for_are_none(backend):
    logits = random_logits(4, 9, fresh_generator())
    with use_backend(backend):
        tokens, logprobs, entropy = sample_tokens(logits, torch.rand(4), False, True)
    assert logprobs is None and entropy is not None and tokens.shape == (4,)
