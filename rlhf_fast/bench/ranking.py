"""The K-wise ranking loss, forward + backward (loss, accuracy, d loss / d rewards), fp32, groups best first.

Baseline, written to do the same tensor work as the peers' code: pairwise reward-model trainers (TRL
`RewardTrainer.compute_loss`, OpenRLHF `PairWiseLoss`, DeepSpeed-Chat) expand each K-ranking into its C(K, 2)
(chosen, rejected) pairs and take `-logsigmoid(r_chosen - r_rejected).mean()` and the accuracy. "pairs
prebuilt" gathers with index tensors built once, as a collator would (the strongest form of the baseline);
"pairs per call" rebuilds them on every call. With every K equal the mean over all pairs equals our mean over
prompts of per-prompt means; every contender is checked against the float64 reference before it is timed.
rlhf_fast runs with value checks off (what the trainers do: no host sync).

CPU: P=64 x K=9 (the anchor's shape) and P=1024 x K=16; GPU: P=64 x K=9 and P=4096 x K=9. The op is
launch-bound on a GPU: the floor there is two empty kernel launches (forward, backward) timed in the same run.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, partial

import torch
import torch.nn.functional as F

from rlhf_fast.bench.case import Case, Contender, ours_contenders
from rlhf_fast.bench.timing import interleaved
from rlhf_fast.ops import ranking_loss, ranking_loss_reference, set_value_checks, use_backend

SHAPES = {"cpu": ((64, 9), (1024, 16)), "cuda": ((64, 9), (4096, 9))}


def pair_indices(group_sizes: list[int], device: torch.device | str = "cpu"):
    """(chosen, rejected) flat indices of every pair of a batch whose groups are listed best first."""
    chosen, rejected, start = [], [], 0
    for k in group_sizes:
        pairs = torch.combinations(torch.arange(start, start + k, device=device), r=2)
        chosen.append(pairs[:, 0])
        rejected.append(pairs[:, 1])
        start += k
    return torch.cat(chosen), torch.cat(rejected)


def naive_pairwise_loss(rewards, chosen, rejected):
    margins = rewards[chosen] - rewards[rejected]
    return -F.logsigmoid(margins).mean(), (margins > 0).float().mean()


def ranking_batch(prompts: int, group: int, device: torch.device | str = "cpu", dtype=torch.float32):
    """Fresh random rewards [P·K] (leaf, requires grad) and group sizes [P], groups best first."""
    generator = torch.Generator()
    generator.seed()
    rewards = torch.randn(prompts * group, generator=generator, dtype=dtype).to(device).requires_grad_(True)
    return rewards, torch.full((prompts,), group, dtype=torch.int64, device=device)


def step(loss_function, rewards):
    """Loss, accuracy and d loss / d rewards, as one training step needs them."""
    loss, accuracy = loss_function(rewards)
    (grad,) = torch.autograd.grad(loss, rewards)
    return loss.detach(), accuracy, grad


def ours(backend: str, group_sizes, rewards, value_checks: bool = False):
    previous = set_value_checks(value_checks)
    try:
        with use_backend(backend):
            return ranking_loss(rewards, group_sizes)
    finally:
        set_value_checks(previous)


def naive_prebuilt(chosen, rejected, rewards):
    return naive_pairwise_loss(rewards, chosen, rejected)


def naive_per_call(sizes: list[int], rewards):
    return naive_pairwise_loss(rewards, *pair_indices(sizes, rewards.device))


def checker(rewards, group_sizes):
    """Compares with the float64 reference, computed at the first check."""
    reference = partial(ranking_loss_reference, group_sizes=group_sizes.cpu())
    want = cache(lambda: step(reference, rewards.detach().cpu().double().requires_grad_(True)))

    def check(output) -> None:
        want_loss, want_accuracy, want_grad = want()
        loss, accuracy, grad = output
        torch.testing.assert_close(loss.double().cpu(), want_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(accuracy.double().cpu(), want_accuracy, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad.double().cpu(), want_grad, atol=1e-6, rtol=1e-4)

    return check


def launch_floor_seconds(device: torch.device) -> float:
    """Two empty kernel launches, timed like the contenders."""
    scratch = torch.zeros(1, device=device)
    return interleaved({"launches": lambda: (scratch.add_(1), scratch.add_(1))}, device, rounds=5)[
        "launches"
    ].median_s


def cases(device: torch.device) -> Iterator[Case]:
    on_gpu = device.type == "cuda"
    floor = launch_floor_seconds(device) if on_gpu else None
    for prompts, group in SHAPES["cuda" if on_gpu else "cpu"]:
        rewards, group_sizes = ranking_batch(prompts, group, device)
        sizes = group_sizes.tolist()
        chosen, rejected = pair_indices(sizes, device)

        def make(backend, group_sizes=group_sizes, rewards=rewards):
            return partial(step, partial(ours, backend, group_sizes), rewards)

        contenders = ours_contenders(device, make)
        if not on_gpu:
            checked = partial(ours, "cpp", group_sizes, value_checks=True)
            contenders.append(Contender("rlhf_fast cpp, value checks on", partial(step, checked, rewards)))
        contenders.append(
            Contender(
                "naive pairwise, pairs prebuilt",
                partial(step, partial(naive_prebuilt, chosen, rejected), rewards),
                "baseline",
            )
        )
        contenders.append(
            Contender(
                "naive pairwise, pairs per call",
                partial(step, partial(naive_per_call, sizes), rewards),
                "baseline",
            )
        )
        if not on_gpu and prompts <= 64:  # the reference loops over prompts in Python
            reference = partial(ranking_loss_reference, group_sizes=group_sizes)
            contenders.append(
                Contender("rlhf_fast reference", partial(step, reference, rewards), "reference")
            )
        yield Case(
            op="ranking",
            name=f"ranking_loss P={prompts} K={group} fp32 fwd+bwd",
            contenders=contenders,
            check=checker(rewards, group_sizes),
            floor_s=floor,
            floor_basis="two empty kernel launches, same run",
            rounds=10,
        )


__all__ = ["cases", "naive_pairwise_loss", "pair_indices", "ranking_batch"]
