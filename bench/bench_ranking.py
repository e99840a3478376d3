"""CPU benchmark of the K-wise ranking loss, forward + backward, fp32: P=64 prompts x K=9 completions (the
anchor's shape), and P=1024 x K=16 where the kernels rather than the per-call dispatch dominate.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_ranking.py --benchmark-group-by=group

Baseline, written to do the same tensor work as the peers' code: pairwise reward-model trainers (TRL
`RewardTrainer.compute_loss`, OpenRLHF `PairWiseLoss`, DeepSpeed-Chat) expand each K-ranking into its
C(K, 2) (chosen, rejected) pairs and take `-logsigmoid(r_chosen - r_rejected).mean()` and the accuracy
`(r_chosen > r_rejected).float().mean()`. `naive_pairwise_loss` gathers the two rewards of every pair with
index tensors built per prompt by `torch.combinations`; in "pairs prebuilt" the indices are built once, as
a collator would (the strongest form of the baseline); in "pairs per call" they are rebuilt on every call.
With every K equal, the mean over all pairs equals our mean over prompts of per-prompt means, and each
benchmark checks that agreement before timing. The plain-torch reference (`ranking_loss_reference`, a loop
over prompts) is timed too.

rlhf_fast is timed with the value checks on (the default: a CPU `group_sizes` is always checked) and off
(what the trainers do). One intra-op thread, as in bench_gae.py: 2 shared cores on the development machines.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import _extension
from rlhf_fast.ops import ranking_loss, ranking_loss_reference, set_value_checks, use_backend

SHAPES = [(64, 9), (1024, 16)]


def pair_indices(
    group_sizes: list[int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) flat indices of every pair of a batch whose groups are listed best first."""
    chosen, rejected, start = [], [], 0
    for k in group_sizes:
        pairs = torch.combinations(torch.arange(start, start + k, device=device), r=2)
        chosen.append(pairs[:, 0])
        rejected.append(pairs[:, 1])
        start += k
    return torch.cat(chosen), torch.cat(rejected)


def naive_pairwise_loss(rewards: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor):
    margins = rewards[chosen] - rewards[rejected]
    return -F.logsigmoid(margins).mean(), (margins > 0).float().mean()


def ranking_batch(prompts: int, group: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Fresh random rewards [P·K] (leaf, requires grad) and group sizes [P], groups best first."""
    generator = torch.Generator()
    generator.seed()
    rewards = torch.randn(prompts * group, generator=generator, dtype=dtype).to(device).requires_grad_(True)
    return rewards, torch.full((prompts,), group, dtype=torch.int64, device=device)


def forward_backward(loss_function, rewards: torch.Tensor):
    """One training step's worth: loss and accuracy, then the gradient of the loss into rewards.grad."""
    rewards.grad = None
    loss, accuracy = loss_function(rewards)
    loss.backward()
    return loss.detach(), accuracy, rewards.grad


def ours(backend: str, group_sizes: torch.Tensor, value_checks: bool = True):
    def loss_function(rewards):
        previous = set_value_checks(value_checks)
        try:
            with use_backend(backend):
                return ranking_loss(rewards, group_sizes)
        finally:
            set_value_checks(previous)

    return loss_function


def implementations(group_sizes: torch.Tensor) -> dict:
    sizes = group_sizes.tolist()
    chosen, rejected = pair_indices(sizes, group_sizes.device)
    return {
        "rlhf_fast cpp, value checks off": ours("cpp", group_sizes, value_checks=False),
        "rlhf_fast cpp, value checks on": ours("cpp", group_sizes),
        "naive pairwise, pairs prebuilt": lambda r: naive_pairwise_loss(r, chosen, rejected),
        "naive pairwise, pairs per call": lambda r: naive_pairwise_loss(r, *pair_indices(sizes, r.device)),
        "rlhf_fast reference": lambda r: ranking_loss_reference(r, group_sizes),
    }


NAMES = list(implementations(torch.full((1,), 2)))


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.benchmark(min_rounds=50, warmup=True)
@pytest.mark.parametrize("implementation", NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"P={p}-K={k}" for p, k in SHAPES])
def test_ranking_loss_cpu(benchmark, implementation, shape):
    if implementation.startswith("rlhf_fast cpp") and not _extension.has_cpp_kernels():
        pytest.skip("rlhf_fast._C is not built")
    prompts, group = shape
    if implementation == "rlhf_fast reference" and prompts > 64:
        pytest.skip("the reference loops over prompts in Python: timed at the small shape only")
    benchmark.group = f"ranking_loss P={prompts} K={group} fp32 fwd+bwd"
    rewards, group_sizes = ranking_batch(prompts, group)
    function = implementations(group_sizes)[implementation]
    loss, accuracy, grad = benchmark(forward_backward, function, rewards)
    # Every contender computes the same thing on these inputs.
    want_loss, want_accuracy, want_grad = forward_backward(
        lambda r: ranking_loss_reference(r, group_sizes), rewards.detach().double().requires_grad_(True)
    )
    torch.testing.assert_close(loss.double(), want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(accuracy.double(), want_accuracy, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-6, rtol=1e-4)
