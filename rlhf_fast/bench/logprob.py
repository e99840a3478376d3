"""Per-token log-probs of the target tokens, from logits and from hidden states x LM head.

- naive torch (the baseline, what RLHF trainers do, e.g. TRL/OpenRLHF `logprobs_from_logits`):
  `log_softmax(x.float())` then gather (plus the entropy `-(p · log p).sum()` and the k3 KL to a reference
  where the case asks for them), autograd for the backward; from hidden, `hidden @ W.T` first.
- Liger-Kernel, when importable: `LigerCrossEntropyLoss(reduction="none")` (−log p only) and
  `fused_selective_log_softmax` (log p only, forward only) on logits; `LigerFusedLinearCrossEntropyLoss
  (reduction="none")` from hidden. Cut Cross-Entropy, when importable: `linear_cross_entropy(...,
  reduction="none")` from hidden. Peers compute less than rlhf_fast in some cases (no entropy, no KL); their
  names say what they compute.
- rlhf_fast: `token_logprobs` / `linear_token_logprobs` (Triton on a GPU; on a CPU the `cpp` backend, the
  default, and `chunked`, the same tiling in plain torch).

Every contender's log-probs are checked against naive before it is timed. GPU cases are the ones of
shared/ANCHORS.md (bf16); the floor is the bytes that must move at the H200's device-copy rate (from logits:
one read forward; read, read, write forward + backward) or 6·N·d·V flops at its bf16 matmul rate (from hidden,
forward + backward). CPU cases are fp32 at reduced shapes (N=4096 d=256 V=50257 from hidden, N=1024 V=50257
from logits): log-prob only forward, log-prob and entropy forward + backward; and one PPO minibatch of the
trainer benchmark (N=1024 d=128 V=2048).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from functools import cache, partial

import torch

from rlhf_fast.bench.case import Case, Contender, ours_contenders
from rlhf_fast.bench.timing import COPY_BYTES_PER_SECOND, MATMUL_FLOPS_PER_SECOND
from rlhf_fast.ops import linear_token_logprobs, token_logprobs, use_backend


@dataclasses.dataclass
class Shape:
    name: str
    kind: str  # "logits" or "hidden"
    tokens: int
    vocab: int
    width: int = 0
    backward: bool = False
    extras: bool = True  # entropy and k3 KL to a reference besides the log-prob


GPU_SHAPES = {
    "logits_fwd": Shape("from logits, fwd, log p + entropy + k3 KL, N=8192 V=50304", "logits", 8192, 50304),
    "logits_fwd_bwd": Shape(
        "from logits, fwd+bwd, log p + entropy + k3 KL, N=8192 V=50304", "logits", 8192, 50304, backward=True
    ),
    "hidden_2k": Shape(
        "from hidden, fwd+bwd, log p, N=8192 d=2048 V=50304",
        "hidden",
        8192,
        50304,
        2048,
        backward=True,
        extras=False,
    ),
    "hidden_4k": Shape(
        "from hidden, fwd+bwd, log p, N=4096 d=4096 V=128256",
        "hidden",
        4096,
        128256,
        4096,
        backward=True,
        extras=False,
    ),
    "logits_fwd_152k": Shape(
        "from logits, fwd, log p + entropy + k3 KL, N=8192 V=151936", "logits", 8192, 151936
    ),
    "hidden_2k_extras": Shape(
        "from hidden, fwd+bwd, log p + entropy + k3 KL, N=8192 d=2048 V=50304",
        "hidden",
        8192,
        50304,
        2048,
        backward=True,
    ),
}
CPU_SHAPES = {
    "hidden_fwd": Shape(
        "from hidden, fwd, log p, N=4096 d=256 V=50257", "hidden", 4096, 50257, 256, extras=False
    ),
    "hidden_fwd_bwd": Shape(
        "from hidden, fwd+bwd, log p + entropy, N=4096 d=256 V=50257",
        "hidden",
        4096,
        50257,
        256,
        backward=True,
    ),
    "logits_fwd": Shape("from logits, fwd, log p, N=1024 V=50257", "logits", 1024, 50257, extras=False),
    "logits_fwd_bwd": Shape(
        "from logits, fwd+bwd, log p + entropy, N=1024 V=50257", "logits", 1024, 50257, backward=True
    ),
    # A PPO minibatch of the trainer benchmark (bench/bench_trainers_trl.py): 16 x 64 response tokens, a
    # 128-wide model, a vocabulary of 2,048.
    "hidden_fwd_bwd_small": Shape(
        "from hidden, fwd+bwd, log p + entropy, N=1024 d=128 V=2048", "hidden", 1024, 2048, 128, backward=True
    ),
}


def make_inputs(shape: Shape, device: torch.device | str, dtype=torch.bfloat16, seed: int = 0) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    targets = torch.randint(0, shape.vocab, (shape.tokens,), generator=generator, device=device)
    inputs = {"targets": targets}
    if shape.kind == "logits":
        # One spare position, as a causal LM's logits have: Liger's selective kernel takes [B, L+1, V].
        logits = torch.randn(
            1, shape.tokens + 1, shape.vocab, generator=generator, device=device, dtype=dtype
        )
        inputs["logits_full"] = logits.mul_(2)
        inputs["logits"] = logits[:, :-1]
    else:
        inputs["hidden"] = torch.randn(
            shape.tokens, shape.width, generator=generator, device=device, dtype=dtype
        )
        weight = torch.randn(shape.vocab, shape.width, generator=generator, device=device, dtype=dtype)
        inputs["weight"] = weight.div_(shape.width**0.5)  # in place: no temporary
    inputs["ref"] = (
        torch.randn(shape.tokens, generator=generator, device=device) - 10.0
    )  # reference log-probs
    return inputs


def naive(shape: Shape, inputs: dict):
    """(log p [N], the sum to backpropagate)."""
    if shape.kind == "logits":
        logits = inputs["logits"].reshape(shape.tokens, shape.vocab)
    else:
        logits = inputs["hidden"] @ inputs["weight"].T
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logp = log_probs.gather(-1, inputs["targets"].unsqueeze(-1)).squeeze(-1)
    total = logp
    if shape.extras:
        total = total - (log_probs.exp() * log_probs).sum(-1)  # + entropy
        if shape.kind == "logits" or shape.width >= 1024:  # the GPU cases carry the k3 KL too
            log_ratio = inputs["ref"] - logp
            total = total + torch.exp(log_ratio) - log_ratio - 1
    return logp, total


def ours(shape: Shape, inputs: dict, backend: str = "auto"):
    extras = {}
    if shape.extras:
        extras["return_entropy"] = True
        if shape.kind == "logits" or shape.width >= 1024:
            extras |= {"ref_logprobs": inputs["ref"], "kl_estimator": "k3"}
    with use_backend(backend):
        if shape.kind == "logits":
            if "ref_logprobs" in extras:
                extras["ref_logprobs"] = extras["ref_logprobs"].reshape(1, -1)
            # The [1, N, V] view of the [1, N+1, V] buffer: strided rows, read in place.
            out = token_logprobs(inputs["logits"], inputs["targets"].reshape(1, -1), **extras)
        else:
            out = linear_token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], **extras)
    logp = out.logprobs.reshape(-1)
    total = logp
    if out.entropy is not None:
        total = total + out.entropy.reshape(-1)
    if out.kl is not None:
        total = total + out.kl.reshape(-1)
    return logp, total


def liger_cross_entropy(shape: Shape, inputs: dict):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    logits = inputs["logits"].reshape(shape.tokens, shape.vocab)
    loss = LigerCrossEntropyLoss(reduction="none")(logits, inputs["targets"])
    return -loss, loss


def liger_selective(shape: Shape, inputs: dict):
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    logp = fused_selective_log_softmax(
        inputs["logits_full"], inputs["targets"].reshape(1, -1), temperature=1.0
    )
    return logp.reshape(-1), logp


def liger_fused_linear(shape: Shape, inputs: dict):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(
        inputs["weight"], inputs["hidden"], inputs["targets"]
    )
    return -loss, loss


def cut_cross_entropy(shape: Shape, inputs: dict):
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], reduction="none")
    return -loss, loss


def peers(shape: Shape) -> dict[str, Callable]:
    """The peers whose operation fits `shape` (on a GPU)."""
    if shape.kind == "logits":
        table = {} if shape.backward else {"Liger selective (log p, fwd)": liger_selective}
        # Liger's cross-entropy writes its gradient into the logits buffer: it comes last.
        table["Liger CE (−log p)"] = liger_cross_entropy
        return table
    if shape.extras:
        return {}
    return {"Liger FLCE (−log p)": liger_fused_linear, "CCE (−log p)": cut_cross_entropy}


def prepared_call(shape: Shape, inputs: dict, contender: Callable) -> Callable[[], torch.Tensor]:
    """A no-argument call doing one forward (and backward) pass; it returns the log-probs [N]."""
    leaves: list[torch.Tensor] = []
    if shape.backward:
        names = ("logits",) if shape.kind == "logits" else ("hidden", "weight")
        inputs = dict(inputs, **{name: inputs[name].detach().requires_grad_() for name in names})
        leaves = [inputs[name] for name in names]

    def call():
        if not shape.backward:
            with torch.no_grad():
                return contender(shape, inputs)[0]
        for leaf in leaves:
            leaf.grad = None
        logp, total = contender(shape, inputs)
        total.sum().backward()
        return logp.detach()

    return call


def floor_seconds(shape: Shape, element_size: int = 2) -> float:
    if shape.kind == "logits":
        passes = 3 if shape.backward else 1  # read (fwd), read (bwd), write the gradient
        return passes * shape.tokens * shape.vocab * element_size / COPY_BYTES_PER_SECOND
    matmuls = 3 if shape.backward else 1
    return 2 * matmuls * shape.tokens * shape.width * shape.vocab / MATMUL_FLOPS_PER_SECOND


def checker(naive_call: Callable[[], torch.Tensor], low_precision: bool):
    """Compares with naive torch's log-probs, computed at the first check."""
    tolerance = {"atol": 0.05, "rtol": 0.02} if low_precision else {"atol": 2e-4, "rtol": 2e-4}
    want = cache(lambda: naive_call().float())

    def check(logp) -> None:
        torch.testing.assert_close(logp.detach().float(), want(), **tolerance)

    return check


def _ours_call(shape: Shape, inputs: dict, backend: str) -> Callable[[], torch.Tensor]:
    return prepared_call(shape, inputs, partial(ours, backend=backend))


def cases(device: torch.device) -> Iterator[Case]:
    on_gpu = device.type == "cuda"
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    dtype = torch.bfloat16 if on_gpu else torch.float32
    for shape in shapes.values():
        inputs = make_inputs(shape, device, dtype)
        baseline = prepared_call(shape, inputs, naive)
        contenders = ours_contenders(
            device,
            partial(_ours_call, shape, inputs),
            cpu_backends=("cpp", "chunked"),
            gpu_backends=("triton",),
        )
        contenders.append(Contender("naive torch", baseline, "baseline"))
        if on_gpu:
            contenders += [
                Contender(name, prepared_call(shape, inputs, peer), "peer")
                for name, peer in peers(shape).items()
            ]
        yield Case(
            op="logprob",
            name=f"{shape.name} {str(dtype).removeprefix('torch.')}",
            contenders=contenders,
            check=checker(baseline, on_gpu),
            floor_s=floor_seconds(shape) if on_gpu else None,
            floor_basis="bytes at the H200 copy rate (logits) / 6·N·d·V flops at its bf16 matmul rate (hidden)",
            rounds=5 if on_gpu else 3,
        )
        del inputs


__all__ = ["CPU_SHAPES", "GPU_SHAPES", "Shape", "cases", "make_inputs", "naive", "ours", "prepared_call"]
