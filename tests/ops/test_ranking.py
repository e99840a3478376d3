"""K-wise ranking loss: every usable backend against the plain-torch reference, on fresh random batches."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhf_fast.ops import ranking_loss, ranking_loss_reference, set_value_checks, use_backend
from rlhf_fast.ops._backend import available_backends
from rlhf_fast.ops.ranking import IMPLEMENTED, MAX_GROUP, _ranking_backward_op, _ranking_forward_op
from tests.helpers import TOLERANCES, fresh_generator


def _device_backend_params() -> list:
    params = [
        pytest.param("cpu", b, id=f"cpu-{b}") for b in available_backends(torch.device("cpu"), IMPLEMENTED)
    ]
    gpu = (
        available_backends(torch.device("cuda"), IMPLEMENTED)
        if torch.cuda.is_available()
        else ["reference", "cuda", "triton"]
    )
    params += [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in gpu]
    return params


DEVICE_BACKENDS = _device_backend_params()


# ---------------------------------------------------------------------------------------------------------
# Random batches
# ---------------------------------------------------------------------------------------------------------


def random_sizes(
    num_prompts: int, generator: torch.Generator, *, include_extremes: bool = True
) -> torch.Tensor:
    """[P] group sizes in [2, 16]; with include_extremes (and P ≥ 2), K = 2 and K = 16 both occur."""
    sizes = torch.randint(2, MAX_GROUP + 1, (num_prompts,), generator=generator)
    if include_extremes and num_prompts >= 2:
        sizes[torch.randperm(num_prompts, generator=generator)[:2]] = torch.tensor([2, MAX_GROUP])
    return sizes


def random_ranks(sizes: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor | None:
    """Ranks per group: None (best first), a random permutation, or random ranks with ties."""
    if kind == "in_order":
        return None
    groups = []
    for k in sizes.tolist():
        if kind == "permutation":
            groups.append(torch.randperm(k, generator=generator))
        else:  # "ties": ranks drawn from fewer values than completions, so some pairs are tied
            groups.append(torch.randint(0, max(1, k // 2), (k,), generator=generator))
    return torch.cat(groups)


def random_margin(kind: str, num: int, generator: torch.Generator):
    if kind == "none":
        return None
    if kind == "scalar":
        return float(torch.rand((), generator=generator, dtype=torch.float64))
    if kind == "tensor_0d":
        return torch.rand((), generator=generator, dtype=torch.float64)
    return torch.randn(num, generator=generator, dtype=torch.float64)  # "per_completion"


def run_backend(backend: str, rewards: torch.Tensor, sizes, ranks=None, margin=None):
    """(loss, accuracy, d loss / d rewards) from `ranking_loss` with `backend` forced."""
    rewards = rewards.detach().requires_grad_(True)
    with use_backend(backend):
        loss, accuracy = ranking_loss(rewards, sizes, ranks, margin)
        (grad,) = torch.autograd.grad(loss, rewards)
    return loss.detach(), accuracy, grad


def run_reference(rewards: torch.Tensor, sizes, ranks=None, margin=None):
    rewards = rewards.detach().double().requires_grad_(True)
    if isinstance(margin, torch.Tensor):
        margin = margin.double()
    loss, accuracy = ranking_loss_reference(rewards, sizes, ranks, margin)
    (grad,) = torch.autograd.grad(loss, rewards)
    return loss.detach(), accuracy, grad


def to_device(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def assert_matches_reference(
    device, backend, rewards, sizes, ranks=None, margin=None, *, input_dtype=torch.float64
):
    rewards, sizes, ranks, margin = to_device(device, rewards, sizes, ranks, margin)
    loss, accuracy, grad = run_backend(backend, rewards.to(input_dtype), sizes, ranks, margin)
    # The reference sees exactly the values the backend saw (rounded to input_dtype), in float64.
    ref_loss, ref_accuracy, ref_grad = run_reference(rewards.to(input_dtype), sizes, ranks, margin)
    out_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    assert loss.dtype == accuracy.dtype == out_dtype and loss.dim() == accuracy.dim() == 0
    assert grad.dtype == input_dtype and grad.shape == rewards.shape
    assert not accuracy.requires_grad
    tol = TOLERANCES[torch.float32 if input_dtype != torch.float64 else torch.float64]
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    # Both count the same pairs: the ratio differs only by its rounding to the output dtype.
    torch.testing.assert_close(
        accuracy.double(), ref_accuracy, atol=0, rtol=1e-7 if out_dtype == torch.float32 else 1e-15
    )
    grad_tol = TOLERANCES[input_dtype]
    # Gradients are ~1/(pairs·prompts): scale the absolute tolerance to their size.
    scale = float(ref_grad.abs().max()) or 1.0
    torch.testing.assert_close(grad.double(), ref_grad, atol=grad_tol["atol"] * scale, rtol=grad_tol["rtol"])


# ---------------------------------------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin_kind", ["none", "scalar", "tensor_0d", "per_completion"])
@pytest.mark.parametrize("rank_kind", ["in_order", "permutation", "ties"])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_matches_reference_float64(device, backend, rank_kind, margin_kind):
    generator = fresh_generator()
    sizes = random_sizes(7, generator)  # K = 2 and K = 16 mixed in one batch
    num = int(sizes.sum())
    rewards = 2 * torch.randn(num, generator=generator, dtype=torch.float64)
    ranks = random_ranks(sizes, rank_kind, generator)
    margin = random_margin(margin_kind, num, generator)
    assert_matches_reference(device, backend, rewards, sizes, ranks, margin)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_single_prompt(device, backend):
    generator = fresh_generator()
    sizes = random_sizes(1, generator)
    rewards = torch.randn(int(sizes.sum()), generator=generator, dtype=torch.float64)
    assert_matches_reference(device, backend, rewards, sizes, random_ranks(sizes, "permutation", generator))


def textbook_instructgpt(rewards: list[float], ranks: list[int]) -> tuple[float, float]:
    """InstructGPT eq. 1 for one prompt with distinct ranks: the mean over all C(K, 2) comparisons of
    −log σ(r_better − r_worse), and the fraction of comparisons the rewards order correctly."""
    total, correct = 0.0, 0
    comparisons = list(itertools.combinations(range(len(rewards)), 2))
    for a, b in comparisons:
        better, worse = (a, b) if ranks[a] < ranks[b] else (b, a)
        difference = rewards[better] - rewards[worse]
        total += -math.log(1.0 / (1.0 + math.exp(-difference)))
        correct += difference > 0
    return total / len(comparisons), correct / len(comparisons)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_equals_textbook_instructgpt_loss(device, backend):
    generator = fresh_generator()
    k = int(torch.randint(2, MAX_GROUP + 1, (1,), generator=generator))
    rewards = torch.randn(k, generator=generator, dtype=torch.float64)
    ranks = torch.randperm(k, generator=generator)
    expected_loss, expected_accuracy = textbook_instructgpt(rewards.tolist(), ranks.tolist())
    with use_backend(backend):
        loss, accuracy = ranking_loss(rewards.to(device), torch.tensor([k], device=device), ranks.to(device))
    assert math.isclose(float(loss), expected_loss, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(float(accuracy), expected_accuracy, rel_tol=0, abs_tol=1e-12)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_all_tied_prompt_is_left_out(device, backend):
    generator = fresh_generator()
    sizes = random_sizes(5, generator)
    num = int(sizes.sum())
    rewards = torch.randn(num, generator=generator, dtype=torch.float64)
    ranks = random_ranks(sizes, "permutation", generator)
    tied = int(torch.randint(0, 5, (1,), generator=generator))
    start = int(sizes[:tied].sum())
    ranks[start : start + int(sizes[tied])] = 0
    assert_matches_reference(device, backend, rewards, sizes, ranks)

    # Dropping the tied prompt changes nothing, and its completions get no gradient.
    keep = torch.ones(num, dtype=torch.bool)
    keep[start : start + int(sizes[tied])] = False
    others = torch.cat([sizes[:tied], sizes[tied + 1 :]])
    d_rewards, d_sizes, d_ranks, d_keep = to_device(device, rewards, sizes, ranks, keep)
    loss, accuracy, grad = run_backend(backend, d_rewards, d_sizes, d_ranks)
    loss_without, accuracy_without, grad_without = run_backend(
        backend, d_rewards[d_keep], others.to(device), d_ranks[d_keep]
    )
    torch.testing.assert_close(loss, loss_without, **TOLERANCES[torch.float64])
    torch.testing.assert_close(accuracy, accuracy_without, **TOLERANCES[torch.float64])
    torch.testing.assert_close(grad[d_keep], grad_without, **TOLERANCES[torch.float64])
    assert bool((grad[~d_keep] == 0).all())


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_batch_without_pairs_gives_zero(device, backend):
    generator = fresh_generator()
    sizes = random_sizes(3, generator)
    rewards = torch.randn(int(sizes.sum()), generator=generator, dtype=torch.float64, device=device)
    ranks = torch.zeros(int(sizes.sum()), dtype=torch.int64, device=device)
    loss, accuracy, grad = run_backend(backend, rewards, sizes.to(device), ranks)
    assert float(loss) == 0.0 and float(accuracy) == 0.0
    assert bool((grad == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_low_precision_rewards(device, backend, dtype):
    generator = fresh_generator()
    sizes = random_sizes(6, generator)
    num = int(sizes.sum())
    rewards = 3 * torch.randn(num, generator=generator, dtype=torch.float64)
    margin = torch.randn(num, generator=generator, dtype=torch.float64)
    ranks = random_ranks(sizes, "ties", generator)
    assert_matches_reference(device, backend, rewards, sizes, ranks, margin, input_dtype=dtype)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    generator = fresh_generator()
    sizes = random_sizes(5, generator)
    num = int(sizes.sum())
    base = torch.randn(2 * num, generator=generator, dtype=torch.float64, device=device)
    ranks = random_ranks(sizes, "ties", generator).to(device)
    strided_ranks = torch.stack([ranks, ranks], 1)[:, 0]
    margin = torch.randn(num, 3, generator=generator, dtype=torch.float64).to(device)[:, 1]
    assert not base[::2].is_contiguous() and not strided_ranks.is_contiguous() and not margin.is_contiguous()
    assert_matches_reference(device, backend, base[::2], sizes, strided_ranks, margin)

    # The gradient reaches the strided view's base in the right places.
    base.requires_grad_(True)
    with use_backend(backend):
        loss, _ = ranking_loss(base[::2], sizes.to(device), strided_ranks, margin)
        loss.backward()
    _, _, ref_grad = run_reference(base.detach()[::2], sizes, strided_ranks, margin)
    torch.testing.assert_close(base.grad[::2], ref_grad, **TOLERANCES[torch.float64])
    assert bool((base.grad[1::2] == 0).all())


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_index_dtypes(device, backend):
    generator = fresh_generator()
    sizes = random_sizes(4, generator)
    rewards = torch.randn(int(sizes.sum()), generator=generator, dtype=torch.float64)
    ranks = random_ranks(sizes, "ties", generator)
    for sizes_dtype, ranks_dtype in [
        (torch.int32, torch.int32),
        (torch.int32, torch.int64),
        (torch.int16, torch.uint8),
    ]:
        assert_matches_reference(device, backend, rewards, sizes.to(sizes_dtype), ranks.to(ranks_dtype))


@pytest.mark.parametrize("device, backend", [p for p in DEVICE_BACKENDS if p.values != ("cpu", "triton")])
def test_many_prompts(device, backend):
    # More prompts than one CUDA block takes (512): the multi-block path with its last-block reduction.
    generator = fresh_generator()
    sizes = random_sizes(700, generator)
    num = int(sizes.sum())
    rewards = torch.randn(num, generator=generator, dtype=torch.float64)
    margin = torch.randn(num, generator=generator, dtype=torch.float64)
    assert_matches_reference(device, backend, rewards, sizes, random_ranks(sizes, "ties", generator), margin)


@pytest.mark.cuda
def test_cpu_group_sizes_with_cuda_rewards():
    generator = fresh_generator()
    sizes = random_sizes(5, generator)
    rewards = torch.randn(int(sizes.sum()), generator=generator, dtype=torch.float64)
    loss, accuracy, grad = run_backend("auto", rewards.cuda(), sizes)
    ref_loss, ref_accuracy, ref_grad = run_reference(rewards, sizes)
    torch.testing.assert_close(loss.cpu(), ref_loss, **TOLERANCES[torch.float64])
    torch.testing.assert_close(accuracy.cpu(), ref_accuracy, **TOLERANCES[torch.float64])
    torch.testing.assert_close(grad.cpu(), ref_grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck(backend):
    if backend not in available_backends(torch.device("cpu"), IMPLEMENTED):
        pytest.skip(f"{backend} is not built here")
    generator = fresh_generator()
    sizes = torch.tensor([3, 2, 5])
    num = int(sizes.sum())
    rewards = torch.randn(num, generator=generator, dtype=torch.float64, requires_grad=True)
    ranks = random_ranks(sizes, "ties", generator)
    margin = torch.randn(num, generator=generator, dtype=torch.float64)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda r: ranking_loss(r, sizes, ranks, margin)[0], (rewards,))


# ---------------------------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "ranks-margins"])
@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_opcheck(device, backend, with_extras):
    generator = fresh_generator()
    sizes = random_sizes(4, generator)
    num = int(sizes.sum())
    rewards = torch.randn(num, generator=generator).to(device).requires_grad_(True)
    ranks = random_ranks(sizes, "ties", generator).to(device) if with_extras else None
    margins = torch.randn(num, generator=generator).to(device) if with_extras else None
    margin = 0.5 if with_extras else 0.0
    sizes = sizes.to(device)
    with use_backend(backend):
        torch.library.opcheck(_ranking_forward_op, (rewards, sizes, ranks, margins, margin))
        _, _, weights, ends = _ranking_forward_op(rewards, sizes, ranks, margins, margin)
        grad_loss = torch.rand((), generator=generator).to(device)
        torch.library.opcheck(
            _ranking_backward_op, (grad_loss, rewards.detach(), ranks, margins, margin, weights, ends)
        )


def test_compiles_in_one_graph():
    generator = fresh_generator()
    sizes = random_sizes(4, generator)
    num = int(sizes.sum())
    rewards = torch.randn(num, generator=generator, dtype=torch.float64)
    ranks = random_ranks(sizes, "ties", generator)
    margin = torch.randn(num, generator=generator, dtype=torch.float64)

    # AOTAutograd traces forward and backward through the ops' fake implementations.
    compiled = torch.compile(
        lambda r: ranking_loss(r, sizes, ranks, margin), backend="aot_eager", fullgraph=True
    )
    leaf = rewards.clone().requires_grad_(True)
    loss, accuracy = compiled(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    ref_loss, ref_accuracy, ref_grad = run_reference(rewards, sizes, ranks, margin)
    torch.testing.assert_close(loss.detach(), ref_loss, **TOLERANCES[torch.float64])
    torch.testing.assert_close(accuracy, ref_accuracy, **TOLERANCES[torch.float64])
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_kernels_stay_in_bounds_without_checks(device, backend):
    # group_sizes that overrun rewards (what skipped checks could let through) must not read past the end.
    rewards = torch.randn(10, dtype=torch.float64, device=device)
    sizes = torch.tensor([3, 40, 5], device=device)
    with use_backend(backend):
        loss, accuracy, weights, ends = _ranking_forward_op(rewards, sizes, None, None, 0.0)
        grad = _ranking_backward_op(
            torch.ones((), dtype=torch.float64, device=device), rewards, None, None, 0.0, weights, ends
        )
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(accuracy)) and bool(torch.isfinite(grad).all())


# ---------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------


def _good_batch():
    sizes = torch.tensor([3, 2, 4])
    return torch.randn(9), sizes, torch.tensor([0, 1, 2, 1, 0, 3, 2, 1, 0])


BAD_INPUTS = {
    "rewards 2-D": (lambda r, s, k: (r.view(3, 3), s, None, None), "rewards"),
    "rewards integer": (lambda r, s, k: (r.long(), s, None, None), "rewards"),
    "sum mismatch": (lambda r, s, k: (r, torch.tensor([3, 2, 5]), None, None), "group_sizes sum"),
    "K = 1": (lambda r, s, k: (r, torch.tensor([1, 4, 4]), None, None), "group_sizes"),
    "K = 17": (lambda r, s, k: (torch.randn(19), torch.tensor([17, 2]), None, None), "group_sizes"),
    "empty group_sizes": (lambda r, s, k: (r[:0], s[:0], None, None), "group_sizes"),
    "float group_sizes": (lambda r, s, k: (r, s.float(), None, None), "group_sizes"),
    "bool group_sizes": (lambda r, s, k: (r, s.bool(), None, None), "group_sizes"),
    "2-D group_sizes": (lambda r, s, k: (r, s[None], None, None), "group_sizes"),
    "ranks shape": (lambda r, s, k: (r, s, k[:-1], None), "ranks"),
    "ranks = K": (lambda r, s, k: (r, s, torch.where(torch.arange(9) == 4, 2, k), None), "ranks"),
    "ranks negative": (lambda r, s, k: (r, s, torch.where(torch.arange(9) == 0, -1, k), None), "ranks"),
    "float ranks": (lambda r, s, k: (r, s, k.float(), None), "ranks"),
    "NaN rewards": (
        lambda r, s, k: (torch.where(torch.arange(9) == 5, float("nan"), r), s, k, None),
        "rewards",
    ),
    "inf rewards": (
        lambda r, s, k: (torch.where(torch.arange(9) == 5, float("inf"), r), s, k, None),
        "rewards",
    ),
    "margin shape": (lambda r, s, k: (r, s, k, torch.randn(8)), "margin"),
    "margin NaN tensor": (lambda r, s, k: (r, s, k, torch.full((9,), float("nan"))), "margin"),
    "margin NaN scalar": (lambda r, s, k: (r, s, k, float("nan")), "margin"),
    "margin string": (lambda r, s, k: (r, s, k, "1"), "margin"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises(case):
    make, argument = BAD_INPUTS[case]
    args = make(*_good_batch())
    with pytest.raises(ValueError, match=argument):
        ranking_loss(*args)


def test_value_checks_can_be_switched_off():
    rewards, sizes, ranks = _good_batch()
    rewards[5] = float("nan")
    previous = set_value_checks(False)
    try:
        ranking_loss(rewards, sizes, ranks)  # NaN passes through without a host sync
        with pytest.raises(ValueError, match="group_sizes"):  # a CPU group_sizes is still checked: it is free
            ranking_loss(rewards, torch.tensor([3, 2, 5]), None)
    finally:
        set_value_checks(previous)
