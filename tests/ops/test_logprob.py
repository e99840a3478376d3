"""rlhf_fast.ops.logprob: every backend against the float64 autograd reference, forward and backward.

Inputs are fresh random each run. On a CPU the backends are `reference`, `chunked`, `cpp` and `triton` (under
TRITON_INTERPRET=1, small shapes); `-m cuda` on a GPU runs the Triton kernels at realistic sizes.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.ops import (
    linear_token_logprobs,
    linear_token_logprobs_reference,
    token_logprobs,
    token_logprobs_reference,
    use_backend,
)
from rlhf_fast.ops import logprob as logprob_module
from rlhf_fast.ops.logprob import IMPLEMENTED, KL_ESTIMATORS
from rlhf_fast.ops.logprob import chunked as logprob_chunked
from tests.helpers import fresh_generator, kernel_backends, ragged_mask

CPU_BACKENDS = ["reference", *kernel_backends(IMPLEMENTED)]
# The backends that tile: plain torch, and its C++ tile arithmetic where the extension is built.
TILED_BACKENDS = [name for name in ("chunked", "cpp") if name in CPU_BACKENDS]
LOW_PRECISION = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rel: float, scale: float | None = None
) -> None:
    """|actual − expected| ≤ rel·(|expected| + scale), scale defaulting to max|expected| (at least 1e-12)."""
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-12))


def output_rel(dtype: torch.dtype) -> float:
    # Outputs are computed in float32 from the (already rounded) inputs, whatever the input dtype.
    return 1e-10 if dtype == torch.float64 else 3e-5


def grad_rel(dtype: torch.dtype) -> float:
    # Gradients come back in the input dtype, so they carry its rounding.
    return {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]


def random_case(shape, vocab, dtype, generator, *, scale=3.0, masked=True, all_masked_row=True):
    """(logits, targets, mask, ref_logprobs): targets −100 where masked; ref near the true log-probs."""
    logits = (torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=generator)
    mask = None
    if masked:
        assert len(shape) == 2, "ragged masks are [B, T]"
        mask = ragged_mask(*shape, generator, all_masked_row=all_masked_row)
        targets = torch.where(mask, targets, -100)
    with torch.no_grad():
        true_logp = token_logprobs_reference(logits.double(), targets, mask=mask).logprobs
    ref = (true_logp + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)).float()
    return logits, targets, mask, ref


def upstream_weights(like: torch.Tensor, generator):
    return torch.randn(3, *like.shape, generator=generator, dtype=torch.float64).to(like.device)


def weighted_sum(out, weights):
    total = (out.logprobs.double() * weights[0]).sum()
    if out.entropy is not None:
        total = total + (out.entropy.double() * weights[1]).sum()
    if out.kl is not None:
        total = total + (out.kl.double() * weights[2]).sum()
    return total


def check_finite_against_reference(out, want, targets, generator):
    """Every output finite and close to the reference's; then both backward from the same random weighting of
    the outputs (the callers compare the gradients)."""
    for got, expected in zip(out, want):
        assert torch.isfinite(got).all()
        assert_close(got, expected, 3e-5, max(float(expected.detach().abs().max()), 1.0))
    weights = upstream_weights(targets, generator)
    weighted_sum(out, weights).backward()
    weighted_sum(want, weights).backward()


def check_token_logprobs(
    backend,
    logits,
    targets,
    mask,
    ref,
    *,
    temperature=1.0,
    kl_estimator="k1",
    entropy=True,
    generator=None,
    output_scale=None,
    gradient_rel=None,
):
    """Forward outputs and dL/dlogits of `backend` against the float64 autograd reference."""
    generator = generator or fresh_generator()
    ours_in = logits.detach().clone().requires_grad_()
    ref_in = logits.detach().double().requires_grad_()
    with use_backend(backend):
        out = token_logprobs(
            ours_in,
            targets,
            ref_logprobs=ref,
            mask=mask,
            temperature=temperature,
            kl_estimator=kl_estimator,
            return_entropy=entropy,
        )
    want = token_logprobs_reference(
        ref_in,
        targets,
        ref_logprobs=None if ref is None else ref.double(),
        mask=mask,
        temperature=temperature,
        kl_estimator=kl_estimator,
        return_entropy=entropy,
    )
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for got, expected in zip(out, want):
        assert (got is None) == (expected is None)
        if got is None:
            continue
        assert got.dtype == out_dtype and got.shape == targets.shape
        assert torch.isfinite(got).all()
        # Outputs are log-domain values: float32 rounding is absolute at the scale of the logits (≥ 1).
        assert_close(
            got,
            expected,
            output_rel(logits.dtype),
            output_scale or max(float(expected.detach().abs().max()) if expected.numel() else 1.0, 1.0),
        )
        if mask is not None:
            assert (got[~mask.bool()] == 0).all()
    weights = upstream_weights(targets, generator)
    weighted_sum(out, weights).backward()
    weighted_sum(want, weights).backward()
    assert ours_in.grad.dtype == logits.dtype and ours_in.grad.shape == logits.shape
    assert torch.isfinite(ours_in.grad).all()
    # The gradient's rounding is at the scale of the upstream weights (O(1)) times the terms it sums, even where
    # the expected entries are small (cancellation in the softmax and k3 terms), so the scale is at least 1.
    gradient_scale = max(float(ref_in.grad.abs().max()), 1.0)
    assert_close(ours_in.grad, ref_in.grad, gradient_rel or grad_rel(logits.dtype), gradient_scale)
    if mask is not None:
        assert (ours_in.grad[~mask.bool()] == 0).all()
    return out


# ---------------------------------------------------------------------------------------------------------
# token_logprobs: from logits
# ---------------------------------------------------------------------------------------------------------


def test_cpu_default_is_a_tiled_backend():
    # The bounded-memory path, not the full-materializing reference, is what CPU callers get by default: its
    # C++ tiles where the extension is built, else plain torch.
    from rlhf_fast import _extension
    from rlhf_fast.ops._backend import select_backend

    expected = "cpp" if _extension.has_cpp_kernels() else "chunked"
    for op_name in ("token_logprobs", "linear_token_logprobs"):
        assert (
            select_backend(op_name, torch.device("cpu"), IMPLEMENTED, logprob_module.GPU_ORDER) == expected
        )


def test_reference_entropy_matches_torch_distributions():
    generator = fresh_generator()
    logits = torch.randn(4, 9, 33, generator=generator, dtype=torch.float64) * 2
    targets = torch.randint(0, 33, (4, 9), generator=generator)
    out = token_logprobs_reference(logits, targets, temperature=0.8, return_entropy=True)
    dist = torch.distributions.Categorical(logits=logits / 0.8)
    torch.testing.assert_close(out.entropy, dist.entropy())
    torch.testing.assert_close(out.logprobs, dist.log_prob(targets))


# (vocab, dtype, kl_estimator, entropy, temperature): each backend sees every option at least once.
TOKEN_CASES = [
    (1, torch.float32, "k1", True, 1.0),
    (7, torch.float32, "k2", True, 0.7),
    (7, torch.bfloat16, "k3", False, 1.0),
    (1000, torch.float32, "k3", True, 1.3),
    (1000, torch.bfloat16, "k1", True, 0.7),
    (1000, torch.float16, "k2", False, 1.0),
    (300, torch.float32, None, False, 1.0),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vocab,dtype,kl_estimator,entropy,temperature", TOKEN_CASES)
def test_token_logprobs_matches_reference(backend, vocab, dtype, kl_estimator, entropy, temperature):
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((3, 5), vocab, dtype, generator)
    check_token_logprobs(
        backend,
        logits,
        targets,
        mask,
        ref if kl_estimator else None,
        temperature=temperature,
        kl_estimator=kl_estimator or "k1",
        entropy=entropy,
        generator=generator,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_float64(backend):
    if backend == "triton":
        with pytest.raises(RuntimeError, match="float32/bfloat16/float16"):
            check_token_logprobs(backend, *random_case((2, 3), 11, torch.float64, fresh_generator()))
        return
    generator = fresh_generator()
    check_token_logprobs(
        backend,
        *random_case((2, 3), 11, torch.float64, generator),
        kl_estimator="k3",
        temperature=0.9,
        generator=generator,
    )


@pytest.mark.parametrize("backend", TILED_BACKENDS)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_token_logprobs_large_vocabulary_chunked(backend, kl_estimator, monkeypatch):
    # GPT-2's vocabulary on the CPU path, with chunks of 2 rows so several chunks and a ragged last one run.
    monkeypatch.setattr(logprob_chunked, "CHUNK_ELEMENTS", 2 * 50257)
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((1, 5), 50257, torch.float32, generator, all_masked_row=False)
    check_token_logprobs(
        backend, logits, targets, mask, ref, kl_estimator=kl_estimator, temperature=0.8, generator=generator
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_single_token(backend):
    generator = fresh_generator()
    # One token as [V] logits with a 0-dim target, and as [1, V].
    logits, targets, _, ref = random_case((), 13, torch.float32, generator, masked=False)
    check_token_logprobs(backend, logits, targets, None, ref, kl_estimator="k3", generator=generator)
    logits, targets, _, ref = random_case((1,), 13, torch.float32, generator, masked=False)
    check_token_logprobs(backend, logits, targets, None, ref, kl_estimator="k2", generator=generator)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_all_masked(backend):
    generator = fresh_generator()
    logits, targets, _, ref = random_case((2, 4), 9, torch.float32, generator, masked=False)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    targets = torch.full((2, 4), -100)  # masked targets may hold anything, even out of range
    out = check_token_logprobs(backend, logits, targets, mask, ref, kl_estimator="k3", generator=generator)
    assert (out.logprobs == 0).all() and (out.entropy == 0).all() and (out.kl == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_no_tokens(backend):
    logits = torch.randn(0, 5, 17, requires_grad=True)
    out = token_logprobs(
        logits, torch.zeros(0, 5, dtype=torch.long), return_entropy=True, ref_logprobs=torch.zeros(0, 5)
    )
    assert out.logprobs.shape == (0, 5) and out.entropy.shape == (0, 5) and out.kl.shape == (0, 5)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_large_magnitude(backend, dtype):
    # Logits of ±1e4: no overflow, and the answer matches float64 to float32 precision at the logits' scale
    # (an error of ~1e4·2^-24 in z − lse becomes a relative error of that size in every p).
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((2, 3), 50, dtype, generator, scale=1e4)
    out = check_token_logprobs(
        backend,
        logits,
        targets,
        mask,
        ref,
        kl_estimator="k2",
        temperature=1.5,
        generator=generator,
        output_scale=1e4,
        gradient_rel=max(grad_rel(dtype), 1e4 * 2.0**-24 * 8),
    )
    assert torch.isfinite(out.logprobs).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_negative_infinite_logits(backend):
    # Vocabulary masking with −inf logits: p = 0 there, entropy and gradients stay finite.
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((2, 4), 40, torch.float32, generator)
    banned = torch.rand(2, 4, 40, generator=generator) < 0.3
    banned &= torch.arange(40) != targets.clamp(min=0).unsqueeze(-1)  # the targets stay allowed
    banned[0, 0, :35] = True  # a row whose first blocks are entirely −inf
    banned[0, 0, targets[0, 0].clamp(min=0)] = False
    logits = logits.masked_fill(banned, float("-inf"))
    ours = logits.clone().requires_grad_()
    with use_backend(backend):
        out = token_logprobs(
            ours, targets, mask=mask, ref_logprobs=ref, kl_estimator="k3", return_entropy=True
        )
    # Reference: the same logits with −inf replaced by a float64 value whose exp is exactly 0.
    finite = logits.double().masked_fill(banned, -1e300).requires_grad_()
    want = token_logprobs_reference(
        finite, targets, mask=mask, ref_logprobs=ref.double(), kl_estimator="k3", return_entropy=True
    )
    check_finite_against_reference(out, want, targets, generator)
    assert torch.isfinite(ours.grad).all() and (ours.grad[banned] == 0).all()
    assert_close(ours.grad, finite.grad, 1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_non_contiguous(backend):
    generator = fresh_generator()
    base = torch.randn(3, 7, 65, generator=generator) * 2
    _, targets, mask, ref = random_case((3, 6), 65, torch.float32, generator)
    # A causal-LM slice (rows skip one position per sequence) and a vocabulary-strided layout.
    check_token_logprobs(backend, base[:, :-1], targets, mask, ref, kl_estimator="k3", generator=generator)
    strided_vocab = torch.randn(65, 3, 6, generator=generator).permute(1, 2, 0)
    check_token_logprobs(backend, strided_vocab, targets, mask, ref, generator=generator)
    # Integer mask and int32 targets are accepted.
    check_token_logprobs(backend, base[:, 1:], targets.int(), mask.to(torch.uint8), None, generator=generator)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logprobs_partial_outputs_get_gradients(backend):
    # A loss on the entropy only, or the KL only, still reaches the logits.
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((2, 5), 30, torch.float32, generator)
    for pick in ("entropy", "kl"):
        ours = logits.clone().requires_grad_()
        twin = logits.double().requires_grad_()
        with use_backend(backend):
            out = token_logprobs(
                ours, targets, mask=mask, ref_logprobs=ref, kl_estimator="k3", return_entropy=True
            )
        want = token_logprobs_reference(
            twin, targets, mask=mask, ref_logprobs=ref.double(), kl_estimator="k3", return_entropy=True
        )
        getattr(out, pick).sum().backward()
        getattr(want, pick).sum().backward()
        assert_close(ours.grad, twin.grad, 1e-4)


@pytest.mark.parametrize("backend", ["reference", *TILED_BACKENDS])
def test_token_logprobs_gradcheck(backend):
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((2, 3), 6, torch.float64, generator)
    mask[0, 0] = True  # at least one valid token
    targets[0, 0] = 2
    ref = token_logprobs_reference(logits, targets, mask=mask).logprobs.detach() + 0.1  # near logp: mild k3

    def outputs(x):
        with use_backend(backend):
            out = token_logprobs(
                x,
                targets,
                mask=mask,
                ref_logprobs=ref.double(),
                kl_estimator="k3",
                temperature=0.7,
                return_entropy=True,
            )
        return out.logprobs, out.entropy, out.kl

    assert torch.autograd.gradcheck(outputs, (logits.requires_grad_(),))


@pytest.mark.parametrize("backend", TILED_BACKENDS)
def test_token_logprobs_chunked_uses_several_chunks(backend, monkeypatch):
    monkeypatch.setattr(logprob_chunked, "CHUNK_ELEMENTS", 3 * 101)
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((4, 5), 101, torch.bfloat16, generator)
    check_token_logprobs(
        backend, logits, targets, mask, ref, kl_estimator="k3", temperature=0.8, generator=generator
    )


# ---------------------------------------------------------------------------------------------------------
# linear_token_logprobs: from hidden states × LM head
# ---------------------------------------------------------------------------------------------------------


def random_linear_case(shape, width, vocab, dtype, generator, *, bias=True, masked=True):
    hidden = torch.randn(*shape, width, generator=generator, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, width, generator=generator, dtype=torch.float64) * 1.5 / width**0.5).to(
        dtype
    )
    lm_bias = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, vocab, shape, generator=generator)
    mask = ragged_mask(*shape, generator) if masked else None
    if masked:
        targets = torch.where(mask, targets, -100)
    with torch.no_grad():
        true_logp = linear_token_logprobs_reference(
            hidden.double(),
            weight.double(),
            targets,
            mask=mask,
            bias=None if lm_bias is None else lm_bias.double(),
        ).logprobs
    ref = (true_logp + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)).float()
    return hidden, weight, lm_bias, targets, mask, ref


def check_linear(
    backend,
    hidden,
    weight,
    bias,
    targets,
    mask,
    ref,
    *,
    temperature=1.0,
    kl_estimator="k1",
    entropy=True,
    generator=None,
    need=(True, True, True),
):
    generator = generator or fresh_generator()
    ours = [hidden.clone(), weight.clone(), None if bias is None else bias.clone()]
    twins = [None if t is None else t.double() for t in ours]
    for tensor, twin, wanted in zip(ours, twins, need):
        if tensor is not None and wanted:
            tensor.requires_grad_()
            twin.requires_grad_()
    with use_backend(backend):
        out = linear_token_logprobs(
            ours[0],
            ours[1],
            targets,
            bias=ours[2],
            ref_logprobs=ref,
            mask=mask,
            temperature=temperature,
            kl_estimator=kl_estimator,
            return_entropy=entropy,
        )
    want = linear_token_logprobs_reference(
        twins[0],
        twins[1],
        targets,
        bias=twins[2],
        ref_logprobs=None if ref is None else ref.double(),
        mask=mask,
        temperature=temperature,
        kl_estimator=kl_estimator,
        return_entropy=entropy,
    )
    for got, expected in zip(out, want):
        assert (got is None) == (expected is None)
        if got is not None:
            assert got.shape == targets.shape and torch.isfinite(got).all()
            assert_close(
                got,
                expected,
                output_rel(hidden.dtype) * 3,
                max(float(expected.detach().abs().max()) if expected.numel() else 1.0, 1.0),
            )
    weights = upstream_weights(targets, generator)
    weighted_sum(out, weights).backward()
    weighted_sum(want, weights).backward()
    for tensor, twin in zip(ours, twins):
        if tensor is None or not tensor.requires_grad:
            continue
        assert (
            tensor.grad is not None
            and tensor.grad.dtype == tensor.dtype
            and tensor.grad.shape == tensor.shape
        )
        # Floor of 0.1 on the scale: where every expected entry is ~0 (V = 1), float32 rounding of p is not.
        scale = max(float(twin.grad.abs().max()), 0.1)
        assert_close(
            tensor.grad,
            twin.grad,
            grad_rel(hidden.dtype) * (1 if hidden.dtype in LOW_PRECISION else 3),
            scale,
        )
    return out


# (vocab, width, dtype, bias, kl_estimator, entropy, temperature)
LINEAR_CASES = [
    (1, 16, torch.float32, True, "k1", True, 1.0),
    (7, 24, torch.float32, False, "k3", True, 0.7),
    (300, 64, torch.float32, True, "k2", True, 1.2),
    (300, 40, torch.bfloat16, True, "k3", True, 1.0),
    (100, 32, torch.float32, False, None, False, 1.0),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vocab,width,dtype,bias,kl_estimator,entropy,temperature", LINEAR_CASES)
def test_linear_token_logprobs_matches_reference(
    backend, vocab, width, dtype, bias, kl_estimator, entropy, temperature
):
    generator = fresh_generator()
    hidden, weight, lm_bias, targets, mask, ref = random_linear_case(
        (3, 5), width, vocab, dtype, generator, bias=bias
    )
    check_linear(
        backend,
        hidden,
        weight,
        lm_bias,
        targets,
        mask,
        ref if kl_estimator else None,
        temperature=temperature,
        kl_estimator=kl_estimator or "k1",
        entropy=entropy,
        generator=generator,
    )


def test_linear_token_logprobs_triton_several_chunks_and_splits(monkeypatch):
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton is not importable")
    from rlhf_fast.ops.triton import linear_logprob

    # 1-byte gradient chunks -> 256-column chunks, so V=700 runs three backward chunks (the last ragged), and
    # the forward splits the vocabulary three ways.
    monkeypatch.setattr(linear_logprob, "GRAD_CHUNK_BYTES", 1)
    generator = fresh_generator()
    case = random_linear_case((2, 8), 32, 700, torch.float32, generator)
    check_linear("triton", *case, kl_estimator="k3", temperature=0.9, generator=generator)


@pytest.mark.parametrize("backend", TILED_BACKENDS)
def test_linear_token_logprobs_large_vocabulary_chunked(backend, monkeypatch):
    monkeypatch.setattr(logprob_chunked, "CHUNK_ELEMENTS", 3 * 50257)
    generator = fresh_generator()
    case = random_linear_case((2, 4), 16, 50257, torch.float32, generator)
    check_linear(backend, *case, kl_estimator="k3", temperature=0.9, generator=generator)


@pytest.mark.parametrize("backend", TILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_linear_token_logprobs_chunked_tiles(backend, dtype, monkeypatch):
    # 4-row × 16-column tiles: several row blocks (over the compacted valid rows) and vocabulary tiles.
    monkeypatch.setattr(logprob_chunked, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(logprob_chunked, "LINEAR_TILE_ROWS", 4)
    generator = fresh_generator()
    case = random_linear_case((3, 5), 24, 100, dtype, generator)
    check_linear(backend, *case, kl_estimator="k3", temperature=0.8, generator=generator)


@pytest.mark.parametrize("backend", TILED_BACKENDS)
def test_linear_token_logprobs_tiles_start_negative_infinite(backend, monkeypatch):
    # A bias of −inf over the first vocabulary tiles (banned tokens): every row's statistics start from a
    # tile with no finite logit and must rescale from there; p = 0 and no gradient at the banned tokens.
    monkeypatch.setattr(logprob_chunked, "CHUNK_ELEMENTS", 4 * 16)
    monkeypatch.setattr(logprob_chunked, "LINEAR_TILE_ROWS", 4)
    generator = fresh_generator()
    hidden, weight, bias, targets, mask, ref = random_linear_case((2, 5), 8, 70, torch.float32, generator)
    banned = torch.arange(70) < 37  # two whole 16-column tiles and part of a third
    targets = torch.where(mask, 37 + targets % 33, targets)
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    with use_backend(backend):
        out = linear_token_logprobs(
            *ours, targets, bias=bias.masked_fill(banned, float("-inf")), mask=mask, ref_logprobs=ref,
            kl_estimator="k3", return_entropy=True,
        )  # fmt: skip
    twins = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    want = linear_token_logprobs_reference(
        *twins, targets, bias=bias.double().masked_fill(banned, -1e300), mask=mask,
        ref_logprobs=ref.double(), kl_estimator="k3", return_entropy=True,
    )  # fmt: skip
    check_finite_against_reference(out, want, targets, generator)
    assert (ours[1].grad[banned] == 0).all()
    for got, expected in zip(ours, twins):
        assert_close(got.grad, expected.grad, 1e-4, max(float(expected.grad.abs().max()), 1.0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_token_logprobs_partial_requires_grad(backend):
    # A frozen LM head (the reference model, or a policy with a tied frozen head): only hidden gets a gradient.
    generator = fresh_generator()
    case = random_linear_case((2, 3), 16, 50, torch.float32, generator)
    check_linear(backend, *case, kl_estimator="k2", generator=generator, need=(True, False, False))
    check_linear(backend, *case, generator=generator, need=(False, True, True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_token_logprobs_all_masked_and_single_token(backend):
    generator = fresh_generator()
    hidden, weight, bias, targets, _, ref = random_linear_case((2, 3), 16, 20, torch.float32, generator)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = check_linear(
        backend,
        hidden,
        weight,
        bias,
        torch.full((2, 3), -100),
        mask,
        ref,
        kl_estimator="k3",
        generator=generator,
    )
    assert (out.logprobs == 0).all() and (out.entropy == 0).all() and (out.kl == 0).all()
    hidden, weight, bias, targets, _, ref = random_linear_case(
        (1,), 16, 20, torch.float32, generator, masked=False
    )
    check_linear(backend, hidden[0], weight, bias, targets[0], None, ref[0], generator=generator)


@pytest.mark.parametrize("backend", ["reference", *TILED_BACKENDS])
def test_linear_token_logprobs_gradcheck(backend):
    generator = fresh_generator()
    hidden, weight, bias, targets, mask, ref = random_linear_case((2, 3), 4, 6, torch.float64, generator)
    mask[0, 0], targets[0, 0] = True, 1
    ref = (
        linear_token_logprobs_reference(hidden, weight, targets, bias=bias, mask=mask).logprobs.detach() + 0.1
    )

    def outputs(h, w, b):
        with use_backend(backend):
            out = linear_token_logprobs(
                h,
                w,
                targets,
                bias=b,
                mask=mask,
                ref_logprobs=ref.double(),
                kl_estimator="k3",
                temperature=0.8,
                return_entropy=True,
            )
        return out.logprobs, out.entropy, out.kl

    assert torch.autograd.gradcheck(
        outputs, (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    )


# ---------------------------------------------------------------------------------------------------------
# The custom ops, and argument checks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_token_ops(backend):
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((2, 3), 10, torch.float32, generator)
    forward = torch.ops.rlhf_fast.token_logprobs_forward
    every_option = (logits.requires_grad_(), targets, mask, ref, 0.8, "k3", True)
    no_option = (logits.detach().requires_grad_(), targets.clamp(min=0), None, None, 1.0, "k1", False)
    with use_backend(backend):
        for args in (every_option, no_option) if backend in TILED_BACKENDS else (every_option,):
            torch.library.opcheck(forward, args)
            logp, entropy, _kl, lse = forward(
                *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            )
            grads = torch.randn_like(logp)
            backward_args = (
                grads,
                torch.randn_like(logp) if args[6] else None,
                torch.randn_like(logp) if args[3] is not None else None,
                args[0].detach(),
                args[1],
                args[2],
                args[3],
                logp,
                entropy,
                lse,
                args[4],
                args[5],
            )
            torch.library.opcheck(torch.ops.rlhf_fast.token_logprobs_backward, backward_args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_linear_ops(backend):
    generator = fresh_generator()
    hidden, weight, bias, targets, mask, ref = random_linear_case((2, 3), 16, 20, torch.float32, generator)
    forward = torch.ops.rlhf_fast.linear_token_logprobs_forward
    every_option = (
        hidden.requires_grad_(),
        weight.requires_grad_(),
        bias.requires_grad_(),
        targets,
        mask,
        ref,
        0.8,
        "k2",
        True,
    )
    no_option = (
        hidden.detach(),
        weight.detach().requires_grad_(),
        None,
        targets.clamp(min=0),
        None,
        None,
        1.0,
        "k1",
        False,
    )
    with use_backend(backend):
        for args in (every_option, no_option) if backend in TILED_BACKENDS else (every_option,):
            torch.library.opcheck(forward, args)
            detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            logp, entropy, _kl, lse = forward(*detached)
            backward_args = (
                torch.randn_like(logp),
                torch.randn_like(logp) if args[8] else None,
                torch.randn_like(logp) if args[5] is not None else None,
                *detached[:6],
                logp,
                entropy,
                lse,
                args[6],
                args[7],
                True,
                True,
            )
            torch.library.opcheck(torch.ops.rlhf_fast.linear_token_logprobs_backward, backward_args)


def test_bad_arguments_name_the_argument():
    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    cases = [
        ({"targets": torch.full((2, 3), 10)}, "targets"),
        ({"targets": torch.full((2, 3), -1)}, "targets"),
        ({"targets": targets[:, :2]}, "targets"),
        ({"targets": targets.float()}, "targets"),
        ({"kl_estimator": "k4", "ref_logprobs": torch.zeros(2, 3)}, "kl_estimator"),
        ({"ref_logprobs": torch.zeros(2, 2)}, "ref_logprobs"),
        ({"mask": torch.ones(2, 2, dtype=torch.bool)}, "mask"),
        ({"mask": torch.ones(2, 3)}, "mask"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"return_entropy": "yes"}, "return_entropy"),
    ]
    for overrides, name in cases:
        kwargs = {"targets": targets} | overrides
        call_targets = kwargs.pop("targets")
        with pytest.raises(ValueError, match=name):
            token_logprobs(logits, call_targets, **kwargs)
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(torch.randint(0, 5, (2, 3, 10)), targets)
    # A masked-out target may be anything; a valid one may not.
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    bad = targets.clone()
    bad[0, 0] = 99
    token_logprobs(logits, bad, mask=mask)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, bad)

    hidden, weight = torch.randn(2, 3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="weight"):
        linear_token_logprobs(hidden, torch.randn(10, 7), targets)
    with pytest.raises(ValueError, match="weight"):
        linear_token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="bias"):
        linear_token_logprobs(hidden, weight, targets, bias=torch.randn(9))
    with pytest.raises(ValueError, match="targets"):
        linear_token_logprobs(hidden, weight, torch.full((2, 3), 10))
    with pytest.raises(ValueError, match="kl_estimator"):
        linear_token_logprobs(hidden, weight, targets, kl_estimator="kl")


# ---------------------------------------------------------------------------------------------------------
# GPU: the Triton kernels at realistic sizes (run with -m cuda)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_token_logprobs(dtype):
    generator = fresh_generator()
    logits, targets, mask, ref = random_case((4, 257), 50304, dtype, generator)
    logits, targets, mask, ref = (t.cuda() for t in (logits, targets, mask, ref))
    check_token_logprobs(
        "triton",
        logits,
        targets,
        mask,
        ref,
        kl_estimator="k3",
        temperature=0.7,
        generator=fresh_generator("cpu"),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_linear_token_logprobs(dtype):
    generator = fresh_generator()
    case = random_linear_case((4, 129), 256, 50304, dtype, generator)
    case = tuple(None if t is None else t.cuda() for t in case)
    check_linear("triton", *case, kl_estimator="k3", temperature=0.7)
