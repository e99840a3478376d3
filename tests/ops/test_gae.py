"""rlhf_fast.ops.gae: every backend against the float64 reference, and the reference against a scalar loop.

Inputs are fresh random each run. On a CPU the backends are `cpp` and `triton` (under TRITON_INTERPRET=1);
`-m cuda` on a GPU runs the `cuda` and `triton` kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_fast.ops import gae, gae_reference, use_backend
from rlhf_fast.ops.gae import IMPLEMENTED, WHITEN_EPS
from tests.helpers import TOLERANCES, fresh_generator, kernel_backends, ragged_mask

CPU_BACKENDS = kernel_backends(IMPLEMENTED)
CUDA_BACKENDS = ("cuda", "triton")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (gamma, lam): the InstructGPT default, discounting, λ=0 (one-step TD), γ=0 (reward minus value), λ=γ=1.
DISCOUNTS = ((1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (0.0, 0.7), (1.0, 1.0))


def tolerance(dtype: torch.dtype) -> dict:
    # The reference runs in float64 on the very same (already rounded) inputs, so a kernel that accumulates
    # in float32 is held to the float32 tolerance whatever its input dtype.
    return TOLERANCES[torch.float64] if dtype == torch.float64 else TOLERANCES[torch.float32]


def random_inputs(batch, steps, dtype, generator, device="cpu", **mask_options):
    rewards = torch.randn(batch, steps, generator=generator, dtype=torch.float64).to(dtype)
    values = torch.randn(batch, steps, generator=generator, dtype=torch.float64).to(dtype)
    mask = (
        ragged_mask(batch, steps, generator, **mask_options)
        if batch * steps
        else torch.zeros(batch, steps, dtype=torch.bool)
    )
    return rewards.to(device), values.to(device), mask.to(device)


def check_against_reference(backend, rewards, values, mask, gamma=1.0, lam=0.95, whiten=False):
    with use_backend(backend):
        advantages, returns = gae(rewards, values, mask, gamma, lam, whiten)
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    for out in (advantages, returns):
        assert out.dtype == out_dtype and out.shape == rewards.shape and out.device == rewards.device
    valid = mask.cpu().bool()
    want_advantages, want_returns = gae_reference(
        rewards.cpu().double(), values.cpu().double(), valid, gamma, lam, whiten
    )
    torch.testing.assert_close(advantages.cpu().double(), want_advantages, **tolerance(rewards.dtype))
    torch.testing.assert_close(returns.cpu().double(), want_returns, **tolerance(rewards.dtype))
    assert (advantages.cpu()[~valid] == 0).all() and (returns.cpu()[~valid] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# The reference itself, against an independent scalar loop over each row's valid tokens.


def scalar_gae(rewards, values, mask, gamma, lam, whiten):
    """GAE written the slow, obvious way: per row, walk the valid tokens back to front in Python floats."""
    batch, steps = len(rewards), len(rewards[0])
    advantages = [[0.0] * steps for _ in range(batch)]
    returns = [[0.0] * steps for _ in range(batch)]
    for row in range(batch):
        positions = [t for t in range(steps) if mask[row][t]]
        next_value = next_advantage = 0.0
        for t in reversed(positions):
            value = float(values[row][t])
            delta = float(rewards[row][t]) + gamma * next_value - value
            next_advantage = delta + gamma * lam * next_advantage
            next_value = value
            advantages[row][t] = next_advantage
            returns[row][t] = next_advantage + value
    if whiten:
        valid = [(row, t) for row in range(batch) for t in range(steps) if mask[row][t]]
        if valid:
            mean = sum(advantages[row][t] for row, t in valid) / len(valid)
            squares = sum((advantages[row][t] - mean) ** 2 for row, t in valid)
            var = squares / (len(valid) - 1) if len(valid) > 1 else 0.0
            for row, t in valid:
                advantages[row][t] = (advantages[row][t] - mean) / math.sqrt(var + WHITEN_EPS)
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    steps=st.integers(1, 24),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    whiten=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_matches_scalar_loop(batch, steps, gamma, lam, whiten, seed):
    generator = torch.Generator().manual_seed(seed)
    rewards, values, mask = random_inputs(batch, steps, torch.float64, generator)
    advantages, returns = gae_reference(rewards, values, mask, gamma, lam, whiten)
    want_advantages, want_returns = scalar_gae(
        rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam, whiten
    )
    torch.testing.assert_close(advantages, want_advantages, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(returns, want_returns, atol=1e-9, rtol=1e-9)


def test_reference_hole_is_skipped_not_reset():
    # A masked token inside a row must not cut the recurrence: the row [a, hole, b] equals the row [a, b].
    generator = fresh_generator()
    rewards, values, _ = random_inputs(1, 3, torch.float64, generator)
    holed = gae_reference(rewards, values, torch.tensor([[True, False, True]]), 0.9, 0.8)
    packed = gae_reference(
        rewards[:, [0, 2]], values[:, [0, 2]], torch.ones(1, 2, dtype=torch.bool), 0.9, 0.8
    )
    for got, want in zip(holed, packed, strict=True):
        torch.testing.assert_close(got[:, [0, 2]], want)
        assert got[0, 1] == 0


# ---------------------------------------------------------------------------------------------------------
# Kernels on the CPU (cpp; triton under the interpreter).

needs_cpu_kernel = pytest.mark.skipif(not CPU_BACKENDS, reason="no compiled or Triton backend usable here")


@needs_cpu_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (4, 1), (5, 33), (8, 64)], ids=str)
def test_cpu_backend_matches_reference(backend, dtype, whiten, shape):
    rewards, values, mask = random_inputs(*shape, dtype, fresh_generator())
    check_against_reference(backend, rewards, values, mask, whiten=whiten)


@needs_cpu_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gamma,lam", DISCOUNTS)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_cpu_backend_discounts(backend, gamma, lam, whiten):
    rewards, values, mask = random_inputs(6, 40, torch.float32, fresh_generator())
    check_against_reference(backend, rewards, values, mask, gamma, lam, whiten)


@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_cpp_long_rows(whiten):
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    rewards, values, mask = random_inputs(37, 777, torch.float32, fresh_generator())
    check_against_reference("cpp", rewards, values, mask, 0.99, 0.95, whiten)


MASK_CASES = {
    "all_valid": lambda b, t, g: torch.ones(b, t, dtype=torch.bool),
    "all_masked": lambda b, t, g: torch.zeros(b, t, dtype=torch.bool),
    "one_valid_token": lambda b, t, g: torch.zeros(b, t, dtype=torch.bool).index_put_(
        (torch.randint(0, b, (1,), generator=g), torch.randint(0, t, (1,), generator=g)), torch.tensor(True)
    ),
    "ragged_no_holes": lambda b, t, g: ragged_mask(b, t, g, holes=False),
    "left_padded": lambda b, t, g: torch.arange(t) >= torch.randint(0, t, (b, 1), generator=g),
    "right_padded": lambda b, t, g: torch.arange(t) < torch.randint(1, t + 1, (b, 1), generator=g),
}


@needs_cpu_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_cpu_backend_mask_patterns(backend, case, whiten):
    generator = fresh_generator()
    rewards, values, _ = random_inputs(5, 19, torch.float32, generator)
    mask = MASK_CASES[case](5, 19, generator)
    check_against_reference(backend, rewards, values, mask, 0.95, 0.9, whiten)


@needs_cpu_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64], ids=str
)
def test_cpu_backend_integer_masks(backend, mask_dtype):
    generator = fresh_generator()
    rewards, values, mask = random_inputs(4, 21, torch.float32, generator)
    # Any nonzero marks a valid token, negative ones included.
    fill = -3 if mask_dtype in (torch.int8, torch.int32, torch.int64) else 1
    integer_mask = torch.where(mask, torch.tensor(fill, dtype=mask_dtype), torch.tensor(0, dtype=mask_dtype))
    check_against_reference(backend, rewards, values, integer_mask, whiten=True)


@needs_cpu_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_cpu_backend_non_contiguous(backend, whiten):
    generator = fresh_generator()
    batch, steps = 6, 23
    rewards = torch.randn(steps, batch, generator=generator).t()  # transposed view
    values = torch.randn(batch, 2 * steps, generator=generator)[:, ::2]  # strided slice
    mask = ragged_mask(steps, batch, generator).t()
    assert not (rewards.is_contiguous() or values.is_contiguous() or mask.is_contiguous())
    check_against_reference(backend, rewards, values, mask, 0.99, 0.95, whiten)


def check_masked_garbage_is_ignored(backend, device):
    # Padding often holds garbage (NaN/inf from a value head on pad tokens): it must not reach any output.
    rewards, values, mask = random_inputs(5, 37, torch.float32, fresh_generator(), device=device)
    rewards = rewards.masked_fill(~mask, float("nan"))
    values = values.masked_fill(~mask, float("inf"))
    check_against_reference(backend, rewards, values, mask, 0.99, 0.95, whiten=True)
    with use_backend(backend):
        assert all(out.isfinite().all() for out in gae(rewards, values, mask, whiten=True))


@needs_cpu_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_ignores_garbage_at_masked_tokens(backend):
    check_masked_garbage_is_ignored(backend, "cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backend_mixed_input_dtypes(backend):
    # rewards and values of different float dtypes are promoted to one before the kernel.
    rewards, values, mask = random_inputs(3, 17, torch.float32, fresh_generator())
    check_against_reference(backend, rewards.bfloat16(), values, mask)


@needs_cpu_kernel
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_cpu_backend_empty(backend, shape):
    rewards, values, mask = random_inputs(*shape, torch.float32, fresh_generator())
    with use_backend(backend):
        advantages, returns = gae(rewards, values, mask, whiten=True)
    assert advantages.shape == returns.shape == shape and advantages.dtype == torch.float32


def test_triton_chunked_rows_carry_state():
    # Rows longer than one Triton block are scanned in chunks from the end; the carried state must join them.
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not usable here")
    from rlhf_fast.ops.triton.gae import gae_triton

    generator = fresh_generator()
    rewards, values, mask = random_inputs(3, 45, torch.float32, generator)
    for whiten in (False, True):
        advantages, returns = gae_triton(rewards, values, mask, 0.97, 0.9, whiten, block_size=8)
        want_advantages, want_returns = gae_reference(
            rewards.double(), values.double(), mask, 0.97, 0.9, whiten
        )
        torch.testing.assert_close(advantages.double(), want_advantages, **tolerance(torch.float32))
        torch.testing.assert_close(returns.double(), want_returns, **tolerance(torch.float32))


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_opcheck(backend, whiten):
    rewards, values, mask = random_inputs(4, 13, torch.float32, fresh_generator())
    with use_backend(backend):
        torch.library.opcheck(torch.ops.rlhf_fast.gae, (rewards, values, mask, 0.99, 0.95, whiten))


def test_default_cpu_backend_is_the_compiled_one(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    rewards, values, mask = random_inputs(3, 11, torch.float32, fresh_generator())
    with use_backend("cpp"):
        forced = gae(rewards, values, mask, whiten=True)
    default = gae(rewards, values, mask, whiten=True)
    for got, want in zip(default, forced, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input and impossible backends.


def _good():
    return random_inputs(3, 7, torch.float32, fresh_generator())


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda r, v, m: dict(values=v[:, :-1]), "values"),
        (lambda r, v, m: dict(mask=m[:, :-1]), "mask"),
        (lambda r, v, m: dict(mask=m.float()), "mask"),
        (lambda r, v, m: dict(mask=m.tolist()), "mask"),
        (lambda r, v, m: dict(rewards=r[0], values=v[0], mask=m[0]), "rewards"),
        (lambda r, v, m: dict(rewards=r[None], values=v[None], mask=m[None]), "rewards"),
        (lambda r, v, m: dict(rewards=r.long()), "rewards"),
        (lambda r, v, m: dict(values=v.int()), "values"),
        (lambda r, v, m: dict(gamma=1.5), "gamma"),
        (lambda r, v, m: dict(gamma=-0.1), "gamma"),
        (lambda r, v, m: dict(gamma=float("nan")), "gamma"),
        (lambda r, v, m: dict(lam=1.01), "lam"),
        (lambda r, v, m: dict(lam=-1.0), "lam"),
    ],
    ids=[
        "values_shape",
        "mask_shape",
        "float_mask",
        "list_mask",
        "rewards_1d",
        "rewards_3d",
        "int_rewards",
        "int_values",
        "gamma_high",
        "gamma_negative",
        "gamma_nan",
        "lam_high",
        "lam_negative",
    ],
)
def test_bad_input_names_the_argument(change, name):
    rewards, values, mask = _good()
    arguments = dict(rewards=rewards, values=values, mask=mask, gamma=0.99, lam=0.95)
    arguments.update(change(rewards, values, mask))
    with pytest.raises(ValueError, match=name):
        gae(**arguments)


def test_forcing_an_unusable_backend_raises(monkeypatch):
    rewards, values, mask = _good()
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        gae(rewards, values, mask)
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        gae(rewards, values, mask)
    monkeypatch.delenv("RLHF_FAST_BACKEND")
    # Triton runs CPU tensors only under its interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        gae(rewards, values, mask)


# ---------------------------------------------------------------------------------------------------------
# CUDA (run with -m cuda on a GPU).


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
@pytest.mark.parametrize(
    "shape",
    # the benchmark shape (one row per block, whitening from registers); rows of several tiles; more rows
    # than co-resident blocks (blocks loop over rows); single tokens and rows; a tile plus one token.
    [(256, 1024), (3, 2500), (3000, 40), (1, 1), (7, 1), (1, 1025)],
    ids=str,
)
def test_cuda_backend_matches_reference(backend, whiten, shape):
    rewards, values, mask = random_inputs(*shape, torch.float32, fresh_generator(), device="cuda")
    check_against_reference(backend, rewards, values, mask, 1.0, 0.95, whiten)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
@pytest.mark.parametrize("shape", [(256, 1024), (5, 2100)], ids=str)
def test_cuda_backend_dtypes(backend, dtype, whiten, shape):
    rewards, values, mask = random_inputs(*shape, dtype, fresh_generator(), device="cuda")
    check_against_reference(backend, rewards, values, mask, 1.0, 0.95, whiten)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("gamma,lam", DISCOUNTS)
def test_cuda_backend_discounts(backend, gamma, lam):
    rewards, values, mask = random_inputs(64, 300, torch.float32, fresh_generator(), device="cuda")
    check_against_reference(backend, rewards, values, mask, gamma, lam, whiten=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_cuda_backend_mask_patterns(backend, case, whiten):
    generator = fresh_generator()
    rewards, values, _ = random_inputs(33, 130, torch.float32, generator, device="cuda")
    mask = MASK_CASES[case](33, 130, generator).cuda()
    check_against_reference(backend, rewards, values, mask, 0.95, 0.9, whiten)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=str
)
def test_cuda_backend_integer_masks(backend, mask_dtype):
    rewards, values, mask = random_inputs(9, 70, torch.float32, fresh_generator(), device="cuda")
    fill = 1 if mask_dtype in (torch.bool, torch.uint8) else -3
    integer_mask = torch.where(
        mask,
        torch.tensor(fill, dtype=mask_dtype, device="cuda"),
        torch.tensor(0, dtype=mask_dtype, device="cuda"),
    )
    check_against_reference(backend, rewards, values, integer_mask, whiten=True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_cuda_backend_non_contiguous(backend, whiten):
    generator = fresh_generator()
    batch, steps = 48, 1100
    rewards = torch.randn(steps, batch, generator=generator).cuda().t()
    values = torch.randn(batch, 2 * steps, generator=generator).cuda()[:, ::2]
    mask = ragged_mask(steps, batch, generator).cuda().t()
    check_against_reference(backend, rewards, values, mask, 0.99, 0.95, whiten)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backend_ignores_garbage_at_masked_tokens(backend):
    check_masked_garbage_is_ignored(backend, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_cuda_backend_empty(backend, shape):
    rewards, values, mask = random_inputs(*shape, torch.float32, fresh_generator(), device="cuda")
    with use_backend(backend):
        advantages, returns = gae(rewards, values, mask, whiten=True)
    assert advantages.shape == returns.shape == shape and advantages.is_cuda


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whiten"])
def test_cuda_opcheck(backend, whiten):
    rewards, values, mask = random_inputs(8, 70, torch.float32, fresh_generator(), device="cuda")
    with use_backend(backend):
        torch.library.opcheck(torch.ops.rlhf_fast.gae, (rewards, values, mask, 0.99, 0.95, whiten))


@pytest.mark.cuda
def test_cuda_kernel_replays_in_a_cuda_graph():
    # The whitening launch is cooperative; it must still be capturable for graph-captured training steps.
    rewards, values, mask = random_inputs(64, 512, torch.float32, fresh_generator(), device="cuda")
    with use_backend("cuda"):
        gae(rewards, values, mask, whiten=True)  # warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            advantages, returns = gae(rewards, values, mask, whiten=True)
    fresh_rewards, fresh_values, fresh_mask = random_inputs(
        64, 512, torch.float32, fresh_generator(), device="cuda"
    )
    rewards.copy_(fresh_rewards)
    values.copy_(fresh_values)
    mask.copy_(fresh_mask)
    graph.replay()
    want_advantages, want_returns = gae_reference(rewards.double(), values.double(), mask, 1.0, 0.95, True)
    torch.testing.assert_close(advantages.double(), want_advantages, **tolerance(torch.float32))
    torch.testing.assert_close(returns.double(), want_returns, **tolerance(torch.float32))


@pytest.mark.cuda
def test_cuda_bad_input_and_forced_backend():
    rewards, values, mask = random_inputs(3, 7, torch.float32, fresh_generator(), device="cuda")
    with pytest.raises(ValueError, match="values"):
        gae(rewards, values.cpu(), mask)
    with pytest.raises(ValueError, match="mask"):
        gae(rewards, values, mask.cpu())
    with use_backend("cpp"), pytest.raises(RuntimeError, match="cpp"):
        gae(rewards, values, mask)
