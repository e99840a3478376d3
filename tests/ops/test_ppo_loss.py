"""rlhf_fast.ops.ppo_loss: every backend against the float64 reference (forward and backward), and the
reference against an independent per-token formula in Python floats.

Inputs are fresh random each run. On a CPU the backends are `cpp` and `triton` (under TRITON_INTERPRET=1);
`-m cuda` on a GPU runs the `cuda` and `triton` kernels.

The losses have kinks where a clip bound is hit (ratio = 1 ± clip_coef, |V − V_old| = value_clip) and where
the two terms of a max tie: there the derivative and the clipped counts jump, and float32 and float64
rounding may fall on different sides. The inputs are drawn away from those sets (relative margin 1e-4), which
keeps every comparison exact in what it decides and tolerant only of rounding.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_fast.ops import ppo_losses, ppo_losses_reference, use_backend
from rlhf_fast.ops.ppo_loss import IMPLEMENTED, POLICY_KEYS, VALUE_KEYS
from tests.helpers import TOLERANCES, fresh_generator, kernel_backends, ragged_mask

CPU_BACKENDS = kernel_backends(IMPLEMENTED)
CUDA_BACKENDS = ("cuda", "triton")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KINK_MARGIN = 1e-4
FORWARD_OP = torch.ops.rlhf_fast.ppo_losses_forward
BACKWARD_OP = torch.ops.rlhf_fast.ppo_losses_backward


def tolerance(dtype: torch.dtype) -> dict:
    # Outputs are float32 means computed from the very same (already rounded) inputs as the float64
    # reference, so every input dtype is held to the float32 tolerance (float64 to its own).
    return TOLERANCES[torch.float64] if dtype == torch.float64 else TOLERANCES[torch.float32]


def gradient_tolerance(dtype: torch.dtype) -> float:
    # Gradients are written in the input dtype: bf16/fp16 gradients carry that dtype's rounding.
    return TOLERANCES[dtype]["rtol"] if dtype in (torch.bfloat16, torch.float16) else tolerance(dtype)["rtol"]


@dataclasses.dataclass
class Inputs:
    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def map(self, fn) -> Inputs:
        """Applies `fn` to every float tensor present (the mask is left alone)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Inputs(
            **{
                name: (value if name == "mask" or value is None else fn(value))
                for name, value in fields.items()
            }
        )

    def arguments(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _near(x: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    bound = torch.as_tensor(bound, dtype=torch.float64)
    return (x - bound).abs() <= KINK_MARGIN * (1 + bound.abs())


def random_inputs(
    batch,
    steps,
    dtype,
    generator,
    *,
    device="cpu",
    with_values=True,
    spread=0.5,
    clip_coef=0.2,
    value_clip=0.2,
    mask=None,
) -> Inputs:
    """Log-probs (≤ 0) whose ratios spread around 1 by `spread` in log space, advantages of both signs,
    values with old values off by ~0.3 (so value clipping happens), and a ragged, holed mask."""

    def normal(scale=1.0):
        return torch.randn(batch, steps, generator=generator, dtype=torch.float64) * scale

    old_logprobs = (-2 * normal().abs()).to(dtype)
    logprobs = (old_logprobs.double() + normal(spread)).to(dtype)
    for _ in range(100):  # redraw the few tokens that sit on a clip bound
        ratio = torch.exp(logprobs.double() - old_logprobs.double())
        kinked = _near(ratio, 1 - clip_coef) | _near(ratio, 1 + clip_coef)
        if not kinked.any():
            break
        logprobs = torch.where(kinked, (old_logprobs.double() + normal(spread)).to(dtype), logprobs)
    inputs = Inputs(logprobs, old_logprobs, normal().to(dtype), mask=None)

    if with_values:
        values = normal().to(dtype)
        old_values = (values.double() + normal(0.3)).to(dtype)
        returns = normal().to(dtype)
        for _ in range(100):  # redraw values on a clip bound or where the two squared errors tie
            v, old, target = values.double(), old_values.double(), returns.double()
            clipped = torch.minimum(torch.maximum(v, old - value_clip), old + value_clip)
            kinked = _near(v, old - value_clip) | _near(v, old + value_clip)
            kinked |= (clipped != v) & _near(v + clipped, 2 * target)
            if not kinked.any():
                break
            values = torch.where(kinked, (old + normal(0.3)).to(dtype), values)
        inputs.values, inputs.old_values, inputs.returns = values, old_values, returns

    if mask is None:
        mask = (
            ragged_mask(batch, steps, generator)
            if batch * steps
            else torch.zeros(batch, steps, dtype=torch.bool)
        )
    inputs.mask = mask
    return dataclasses.replace(inputs.map(lambda t: t.to(device)), mask=mask.to(device))


def losses_and_gradients(fn, inputs: Inputs, weights: tuple[float, float], **options):
    """fn's outputs, and the gradients of w_p·policy_loss + w_v·value_loss in logprobs and values."""
    inputs = inputs.map(lambda t: t.detach().clone())
    inputs.logprobs.requires_grad_()
    differentiable = [inputs.logprobs]
    if inputs.values is not None:
        inputs.values.requires_grad_()
        differentiable.append(inputs.values)
    losses = fn(**inputs.arguments(), **options)
    objective = weights[0] * losses["policy_loss"]
    if "value_loss" in losses:
        objective = objective + weights[1] * losses["value_loss"]
    gradients = torch.autograd.grad(objective, differentiable)
    return {k: v.detach() for k, v in losses.items()}, gradients


def assert_gradient_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # Relative to the gradient's own scale: its entries are O(1 / valid count).
    rtol = gradient_tolerance(dtype)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * max(want.abs().max().item(), 1e-30))


def check_against_reference(backend, inputs: Inputs, clip_coef=0.2, value_clip=0.2, **run_options):
    """Runs `backend` through the public op and compares outputs and gradients with the float64 reference."""
    weights = tuple(torch.empty(2).uniform_(-2, 2).tolist())
    options = dict(clip_coef=clip_coef, value_clip=value_clip)
    with use_backend(backend):
        got, got_gradients = losses_and_gradients(ppo_losses, inputs, weights, **options)
    want, want_gradients = losses_and_gradients(
        ppo_losses_reference, inputs.map(lambda t: t.cpu().double()), weights, **options
    )

    dtype = inputs.logprobs.dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert list(got) == list(POLICY_KEYS + (VALUE_KEYS if inputs.values is not None else ()))
    for key, value in got.items():
        assert value.shape == () and value.dtype == out_dtype and value.device == inputs.logprobs.device, key
        torch.testing.assert_close(value.cpu().double(), want[key], **tolerance(dtype), msg=key)
    valid = inputs.mask.cpu().bool()
    for got_gradient, want_gradient, name in zip(got_gradients, want_gradients, ("logprobs", "values")):
        assert got_gradient.dtype == dtype and got_gradient.shape == inputs.logprobs.shape, name
        assert (got_gradient.cpu()[~valid] == 0).all(), f"{name}: masked tokens must get gradient 0"
        assert_gradient_close(got_gradient.cpu(), want_gradient, dtype)
    return got, got_gradients


# ---------------------------------------------------------------------------------------------------------
# The reference itself, against an independent per-token formula in Python floats.


def per_token_losses(inputs: Inputs, clip_coef: float, value_clip: float):
    """The losses and their gradients written the slow, obvious way: one token at a time."""
    rows = [[float(x) for x in row] for row in inputs.logprobs.tolist()]
    old_rows, advantage_rows = inputs.old_logprobs.tolist(), inputs.advantages.tolist()
    mask = inputs.mask.tolist()
    tokens = [(b, t) for b in range(len(mask)) for t in range(len(mask[b])) if mask[b][t]]
    count = max(len(tokens), 1)
    sums = dict.fromkeys(POLICY_KEYS + VALUE_KEYS, 0.0)
    grad_logprobs = [[0.0] * len(row) for row in mask]
    grad_values = [[0.0] * len(row) for row in mask]
    for b, t in tokens:
        ratio = math.exp(rows[b][t] - old_rows[b][t])
        advantage = advantage_rows[b][t]
        unclipped = -advantage * ratio
        clipped = -advantage * min(max(ratio, 1 - clip_coef), 1 + clip_coef)
        sums["policy_loss"] += max(unclipped, clipped)
        sums["clipfrac"] += clipped > unclipped
        sums["approx_kl"] += (ratio - 1) - math.log(ratio)
        sums["ratio_mean"] += ratio
        grad_logprobs[b][t] = (unclipped if unclipped >= clipped else 0.0) / count
        if inputs.values is not None:
            value, old_value = inputs.values[b, t].item(), inputs.old_values[b, t].item()
            target = inputs.returns[b, t].item()
            # V_old + clamp(V − V_old, −c, c), with the in-range case written as V itself.
            step = value - old_value
            clipped_value = value if abs(step) <= value_clip else old_value + math.copysign(value_clip, step)
            unclipped_v, clipped_v = (value - target) ** 2, (clipped_value - target) ** 2
            sums["value_loss"] += 0.5 * max(unclipped_v, clipped_v)
            sums["value_clipfrac"] += clipped_v > unclipped_v
            grad_values[b][t] = (value - target if unclipped_v >= clipped_v else 0.0) / count
    means = {key: total / count for key, total in sums.items()}
    if inputs.values is None:
        means = {key: means[key] for key in POLICY_KEYS}
    return (
        means,
        torch.tensor(grad_logprobs, dtype=torch.float64),
        torch.tensor(grad_values, dtype=torch.float64),
    )


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    steps=st.integers(1, 20),
    clip_coef=st.floats(0.0, 1.5),
    value_clip=st.floats(0.0, 2.0),
    spread=st.floats(0.01, 3.0),
    with_values=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_matches_per_token_formula(batch, steps, clip_coef, value_clip, spread, with_values, seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = random_inputs(
        batch,
        steps,
        torch.float64,
        generator,
        with_values=with_values,
        spread=spread,
        clip_coef=clip_coef,
        value_clip=value_clip,
    )
    got, gradients = losses_and_gradients(
        ppo_losses_reference, inputs, (1.0, 1.0), clip_coef=clip_coef, value_clip=value_clip
    )
    want, want_grad_logprobs, want_grad_values = per_token_losses(inputs, clip_coef, value_clip)
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key].item(), want[key], atol=1e-9, rtol=1e-9, msg=key)
    torch.testing.assert_close(gradients[0], want_grad_logprobs, atol=1e-12, rtol=1e-9)
    if with_values:
        torch.testing.assert_close(gradients[1], want_grad_values, atol=1e-12, rtol=1e-9)


def test_reference_all_masked_is_zero_not_nan():
    inputs = random_inputs(3, 5, torch.float64, fresh_generator(), mask=torch.zeros(3, 5, dtype=torch.bool))
    got, gradients = losses_and_gradients(ppo_losses_reference, inputs, (1.0, 1.0))
    assert all(value.item() == 0 for value in got.values())
    assert all((gradient == 0).all() for gradient in gradients)


# ---------------------------------------------------------------------------------------------------------
# Every backend on a CPU: "reference" runs through the custom ops (closed-form backward), cpp and triton
# through their kernels.

OP_BACKENDS = ["reference", *CPU_BACKENDS]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_values", [True, False], ids=["values", "policy_only"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (4, 1), (5, 33), (8, 64)], ids=str)
def test_backend_matches_reference(backend, dtype, with_values, shape):
    inputs = random_inputs(*shape, dtype, fresh_generator(), with_values=with_values)
    check_against_reference(backend, inputs)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize(
    "clip_coef,value_clip", [(0.2, 0.2), (0.0, 0.0), (0.1, 10.0), (1.5, 0.05), (0.3, math.inf)]
)
def test_backend_clip_settings(backend, clip_coef, value_clip):
    inputs = random_inputs(
        6, 40, torch.float32, fresh_generator(), clip_coef=clip_coef, value_clip=value_clip
    )
    check_against_reference(backend, inputs, clip_coef, value_clip)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backend_ratios_far_from_one(backend, dtype):
    # Ratios from e^-6 to e^6: clipping is active on both sides, for advantages of both signs.
    inputs = random_inputs(8, 64, dtype, fresh_generator(), spread=2.0)
    ratio = torch.exp(inputs.logprobs.double() - inputs.old_logprobs.double())
    valid, positive = inputs.mask, inputs.advantages > 0
    for side in (ratio > 1.2, ratio < 0.8):
        for sign in (positive, ~positive):
            assert (valid & side & sign).any(), "the draw must exercise every clipping case"
    got, _ = check_against_reference(backend, inputs)
    assert 0 < got["clipfrac"] < 1 and 0 < got["value_clipfrac"] < 1


MASK_CASES = {
    "all_valid": lambda b, t, g: torch.ones(b, t, dtype=torch.bool),
    "all_masked": lambda b, t, g: torch.zeros(b, t, dtype=torch.bool),
    "one_valid_token": lambda b, t, g: torch.zeros(b, t, dtype=torch.bool).index_put_(
        (torch.randint(0, b, (1,), generator=g), torch.randint(0, t, (1,), generator=g)), torch.tensor(True)
    ),
    "masked_rows_and_holes": lambda b, t, g: ragged_mask(b, t, g, holes=True, all_masked_row=True),
    "left_padded": lambda b, t, g: torch.arange(t) >= torch.randint(0, t, (b, 1), generator=g),
    "right_padded": lambda b, t, g: torch.arange(t) < torch.randint(1, t + 1, (b, 1), generator=g),
}


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_backend_mask_patterns(backend, case):
    generator = fresh_generator()
    inputs = random_inputs(5, 19, torch.float32, generator, mask=MASK_CASES[case](5, 19, generator))
    got, gradients = check_against_reference(backend, inputs)
    if case == "all_masked":
        assert all(value.item() == 0 for value in got.values())
        assert all((gradient == 0).all() for gradient in gradients)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backend_ignores_padding_garbage(backend):
    # Masked positions may hold anything (inf, NaN): outputs and gradients equal those of clean padding.
    inputs = random_inputs(4, 23, torch.float32, fresh_generator())
    padding = ~inputs.mask
    garbage = inputs.map(lambda t: t.masked_fill(padding, math.nan))
    garbage.logprobs = garbage.logprobs.masked_fill(padding & (torch.rand(4, 23) < 0.5), math.inf)
    garbage.old_logprobs = garbage.old_logprobs.masked_fill(padding & (torch.rand(4, 23) < 0.5), -math.inf)
    with use_backend(backend):
        clean, clean_gradients = losses_and_gradients(ppo_losses, inputs, (1.0, 1.0))
        dirty, dirty_gradients = losses_and_gradients(ppo_losses, garbage, (1.0, 1.0))
    for key in clean:
        torch.testing.assert_close(dirty[key], clean[key], atol=0, rtol=0, msg=key)
    for got, want in zip(dirty_gradients, clean_gradients):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int8, torch.int32, torch.int64], ids=str)
def test_backend_integer_masks(backend, mask_dtype):
    inputs = random_inputs(4, 21, torch.float32, fresh_generator())
    fill = 1 if mask_dtype == torch.uint8 else -3  # any nonzero marks a valid token
    inputs.mask = torch.where(
        inputs.mask, torch.tensor(fill, dtype=mask_dtype), torch.tensor(0, dtype=mask_dtype)
    )
    check_against_reference(backend, inputs)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backend_non_contiguous(backend):
    generator = fresh_generator()
    batch, steps = 6, 23
    inputs = random_inputs(batch, steps, torch.float32, generator)
    views = inputs.map(lambda t: t.t().contiguous().t())  # column-major copies
    views.old_logprobs = torch.zeros(batch, 2 * steps).index_copy(
        1, torch.arange(0, 2 * steps, 2), inputs.old_logprobs
    )[:, ::2]  # strided slice
    views.mask = inputs.mask.t().contiguous().t()
    assert not (
        views.logprobs.is_contiguous() or views.old_logprobs.is_contiguous() or views.mask.is_contiguous()
    )
    check_against_reference(backend, views)
    # The kernels give strided views the same bits as contiguous copies (torch's own sums, in the reference,
    # may add in another order).
    exact = dict(atol=0, rtol=0) if backend != "reference" else tolerance(torch.float32)
    with use_backend(backend):
        got, gradients = losses_and_gradients(ppo_losses, views, (1.0, -0.5))
        contiguous, contiguous_gradients = losses_and_gradients(ppo_losses, inputs, (1.0, -0.5))
    for key in got:
        torch.testing.assert_close(got[key], contiguous[key], **exact, msg=key)
    for got_gradient, want_gradient in zip(gradients, contiguous_gradients):
        torch.testing.assert_close(got_gradient, want_gradient, **exact)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backend_mixed_input_dtypes(backend):
    # Mixed float dtypes are promoted to one before the kernel; each gradient comes back in its input's dtype.
    inputs = random_inputs(3, 17, torch.float32, fresh_generator())
    inputs.logprobs = inputs.logprobs.bfloat16()
    inputs.values = inputs.values.half()
    with use_backend(backend):
        _, (grad_logprobs, grad_values) = losses_and_gradients(ppo_losses, inputs, (1.0, 1.0))
    assert grad_logprobs.dtype == torch.bfloat16 and grad_values.dtype == torch.float16
    check_against_reference(backend, inputs.map(lambda t: t.float()))


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_backend_empty(backend, shape):
    inputs = random_inputs(*shape, torch.float32, fresh_generator())
    with use_backend(backend):
        got, gradients = losses_and_gradients(ppo_losses, inputs, (1.0, 1.0))
    assert all(value.item() == 0 for value in got.values())
    assert all(gradient.shape == shape for gradient in gradients)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_diagnostics_carry_no_gradient(backend):
    inputs = random_inputs(3, 8, torch.float32, fresh_generator())
    inputs.logprobs.requires_grad_()
    inputs.values.requires_grad_()
    inputs.old_logprobs.requires_grad_()  # a target: no gradient reaches it
    with use_backend(backend):
        got = ppo_losses(**inputs.arguments())
    assert got["policy_loss"].requires_grad and got["value_loss"].requires_grad
    for key in ("clipfrac", "approx_kl", "ratio_mean", "value_clipfrac"):
        assert not got[key].requires_grad, key
    (grad_old,) = torch.autograd.grad(got["policy_loss"], inputs.old_logprobs, allow_unused=True)
    assert grad_old is None


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("with_values", [True, False], ids=["values", "policy_only"])
def test_gradcheck_float64(backend, with_values):
    if backend == "triton":
        pytest.skip("gradcheck's many evaluations are too slow under the Triton interpreter")
    inputs = random_inputs(3, 5, torch.float64, fresh_generator(), with_values=with_values, spread=1.0)
    differentiable = ["logprobs"] + (["values"] if with_values else [])

    def objective(*tensors):
        arguments = inputs.arguments() | dict(zip(differentiable, tensors))
        got = ppo_losses(**arguments)
        return got["policy_loss"] + 0.7 * got.get("value_loss", 0.0)

    tensors = [getattr(inputs, name).clone().requires_grad_() for name in differentiable]
    with use_backend(backend):
        assert torch.autograd.gradcheck(objective, tensors, eps=1e-6, atol=1e-7)


def test_triton_several_blocks():
    # Small blocks: many partials go through the finalize kernel, and the backward spans several programs.
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not usable here")
    from rlhf_fast.ops.triton.ppo_loss import ppo_losses_backward_triton, ppo_losses_forward_triton

    inputs = random_inputs(7, 45, torch.float32, fresh_generator())
    arguments = list(inputs.arguments().values())
    forward = ppo_losses_forward_triton(*arguments, 0.2, 0.2, block_size=16)
    with use_backend("reference"):
        want = FORWARD_OP(*arguments, 0.2, 0.2)
    for got_value, want_value in zip(forward, want):
        torch.testing.assert_close(got_value, want_value, **tolerance(torch.float32))
    grads = (torch.tensor(0.5), torch.tensor(-1.5))
    got_gradients = ppo_losses_backward_triton(*grads, *arguments, forward[-1], 0.2, 0.2, block_size=16)
    with use_backend("reference"):
        want_gradients = BACKWARD_OP(*grads, *arguments, want[-1], 0.2, 0.2)
    for got_gradient, want_gradient in zip(got_gradients, want_gradients):
        assert_gradient_close(got_gradient, want_gradient.double(), torch.float32)


def test_cpp_is_deterministic_across_thread_counts():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    inputs = random_inputs(16, 1000, torch.float32, fresh_generator())  # several chunks of 4096 tokens
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            with use_backend("cpp"):
                results.append(ppo_losses(**inputs.arguments()))
    finally:
        torch.set_num_threads(threads)
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("with_values", [True, False], ids=["values", "policy_only"])
def test_opcheck(backend, with_values):
    inputs = random_inputs(4, 13, torch.float32, fresh_generator(), with_values=with_values)
    inputs.logprobs.requires_grad_()
    if with_values:
        inputs.values.requires_grad_()
    arguments = (*inputs.arguments().values(), 0.2, 0.3)
    with use_backend(backend):
        torch.library.opcheck(FORWARD_OP, arguments)
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in arguments)
        valid_count = FORWARD_OP(*detached)[-1]
        grads = (torch.tensor(0.5), torch.tensor(2.0))
        torch.library.opcheck(BACKWARD_OP, (*grads, *detached[:7], valid_count, 0.2, 0.3))


def test_default_cpu_backend_is_the_compiled_one(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    inputs = random_inputs(3, 11, torch.float32, fresh_generator())
    with use_backend("cpp"):
        forced = losses_and_gradients(ppo_losses, inputs, (1.0, 1.0))
    default = losses_and_gradients(ppo_losses, inputs, (1.0, 1.0))
    for key in forced[0]:
        assert torch.equal(default[0][key], forced[0][key]), key
    for got, want in zip(default[1], forced[1]):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------
# Bad input and impossible backends.


def _good() -> dict:
    return random_inputs(3, 7, torch.float32, fresh_generator()).arguments()


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda a: dict(old_logprobs=a["old_logprobs"][:, :-1]), "old_logprobs"),
        (lambda a: dict(advantages=a["advantages"][:-1]), "advantages"),
        (lambda a: dict(returns=a["returns"][:, :-1]), "returns"),
        (lambda a: dict(mask=a["mask"][:, :-1]), "mask"),
        (lambda a: dict(mask=a["mask"].float()), "mask"),
        (lambda a: dict(mask=a["mask"].tolist()), "mask"),
        (lambda a: {name: a[name][0] for name in a}, "logprobs"),
        (lambda a: dict(logprobs=a["logprobs"].long()), "logprobs"),
        (lambda a: dict(advantages=a["advantages"].int()), "advantages"),
        (lambda a: dict(returns=None), "returns"),
        (lambda a: dict(old_values=None, returns=None), "old_values"),
        (lambda a: dict(values=None), "values"),
        (lambda a: dict(clip_coef=-0.1), "clip_coef"),
        (lambda a: dict(clip_coef=math.nan), "clip_coef"),
        (lambda a: dict(value_clip=-1.0), "value_clip"),
    ],
    ids=[
        "old_logprobs_shape",
        "advantages_shape",
        "returns_shape",
        "mask_shape",
        "float_mask",
        "list_mask",
        "logprobs_1d",
        "int_logprobs",
        "int_advantages",
        "values_without_returns",
        "values_without_old_values",
        "old_values_without_values",
        "negative_clip",
        "nan_clip",
        "negative_value_clip",
    ],
)
def test_bad_input_names_the_argument(change, name):
    arguments = _good()
    arguments.update(change(arguments))
    with pytest.raises(ValueError, match=name):
        ppo_losses(**arguments)


def test_forcing_an_unusable_backend_raises(monkeypatch):
    arguments = _good()
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        ppo_losses(**arguments)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton runs CPU tensors only under its interpreter
    with use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        ppo_losses(**arguments)


# ---------------------------------------------------------------------------------------------------------
# CUDA (run with -m cuda on a GPU).


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_values", [True, False], ids=["values", "policy_only"])
@pytest.mark.parametrize(
    "shape",
    # the benchmark shape (more tokens than one pass of the CUDA grid: grid-stride loop, many partials); an
    # odd larger one; single tokens and rows.
    [(256, 1024), (513, 999), (3, 2500), (1, 1), (1, 1025), (7, 1)],
    ids=str,
)
def test_cuda_backend_matches_reference(backend, dtype, with_values, shape):
    inputs = random_inputs(*shape, dtype, fresh_generator(), device="cuda", with_values=with_values)
    check_against_reference(backend, inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_cuda_backend_mask_patterns(backend, case):
    generator = fresh_generator()
    mask = MASK_CASES[case](33, 130, generator)
    inputs = random_inputs(33, 130, torch.float32, generator, device="cuda", mask=mask, spread=2.0)
    check_against_reference(backend, inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32], ids=str)
def test_cuda_backend_integer_masks(backend, mask_dtype):
    inputs = random_inputs(9, 70, torch.float32, fresh_generator(), device="cuda")
    inputs.mask = inputs.mask.to(mask_dtype) * (1 if mask_dtype == torch.uint8 else -3)
    check_against_reference(backend, inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backend_non_contiguous(backend):
    # The response slice of a [B, P + T] tensor, and a transposed one: read in place.
    batch, prompt, steps = 48, 100, 1100
    inputs = random_inputs(batch, prompt + steps, torch.float32, fresh_generator(), device="cuda")
    views = inputs.map(lambda t: t[:, prompt:])
    views.mask = inputs.mask[:, prompt:]
    views.advantages = views.advantages.t().contiguous().t()
    check_against_reference(backend, views)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_cuda_backend_empty(backend, shape):
    inputs = random_inputs(*shape, torch.float32, fresh_generator(), device="cuda")
    with use_backend(backend):
        got, gradients = losses_and_gradients(ppo_losses, inputs, (1.0, 1.0))
    assert all(value.item() == 0 for value in got.values())
    assert all(gradient.shape == shape for gradient in gradients)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backend_is_deterministic(backend):
    inputs = random_inputs(512, 1024, torch.float32, fresh_generator(), device="cuda")
    with use_backend(backend):
        first = losses_and_gradients(ppo_losses, inputs, (1.0, 1.0))
        second = losses_and_gradients(ppo_losses, inputs, (1.0, 1.0))
    for key in first[0]:
        assert torch.equal(first[0][key], second[0][key]), key


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("with_values", [True, False], ids=["values", "policy_only"])
def test_cuda_opcheck(backend, with_values):
    inputs = random_inputs(8, 70, torch.float32, fresh_generator(), device="cuda", with_values=with_values)
    arguments = (*inputs.arguments().values(), 0.2, 0.3)
    with use_backend(backend):
        torch.library.opcheck(FORWARD_OP, arguments)
        valid_count = FORWARD_OP(*arguments)[-1]
        grads = (torch.tensor(0.5, device="cuda"), torch.tensor(2.0, device="cuda"))
        torch.library.opcheck(BACKWARD_OP, (*grads, *arguments[:7], valid_count, 0.2, 0.3))


@pytest.mark.cuda
def test_cuda_kernel_replays_in_a_cuda_graph():
    # Forward and backward read no value back to the host, so a training step can be graph-captured.
    inputs = random_inputs(64, 512, torch.float32, fresh_generator(), device="cuda")
    static = inputs.map(lambda t: t.clone())
    static.logprobs.requires_grad_()
    static.values.requires_grad_()

    def step():
        got = ppo_losses(**static.arguments())
        objective = got["policy_loss"] + got["value_loss"]
        return got, torch.autograd.grad(objective, (static.logprobs, static.values))

    with use_backend("cuda"):
        step()  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got, gradients = step()
    fresh = random_inputs(64, 512, torch.float32, fresh_generator(), device="cuda")
    with torch.no_grad():
        for name, value in fresh.arguments().items():
            getattr(static, name).copy_(value)
    graph.replay()
    want, want_gradients = losses_and_gradients(
        ppo_losses_reference, fresh.map(lambda t: t.cpu().double()), (1.0, 1.0)
    )
    for key in want:
        torch.testing.assert_close(got[key].cpu().double(), want[key], **tolerance(torch.float32), msg=key)
    for got_gradient, want_gradient in zip(gradients, want_gradients):
        assert_gradient_close(got_gradient.cpu(), want_gradient, torch.float32)
