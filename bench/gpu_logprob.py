"""GPU benchmark of per-token log-probs (from logits, and from hidden states × LM head), bf16.

    python3 bench/gpu_logprob.py [--cases NAME,...]     (bench/gpu_check.sh runs it on the GPU machine)

One markdown table; each row is a case (shared/ANCHORS.md), each cell "time ms / peak extra GB":

- `naive`: plain torch, `log_softmax(x.float())` then gather (plus the entropy and k3 KL where the case asks
  for them), autograd for the backward; from hidden, `hidden @ W.T` first.
- Liger-Kernel, when importable: `LigerCrossEntropyLoss(reduction="none")` (−log p only) on logits,
  `fused_selective_log_softmax` (log p only, forward only) on logits, `LigerFusedLinearCrossEntropyLoss
  (reduction="none")` from hidden.
- Cut Cross-Entropy, when importable: `linear_cross_entropy(..., reduction="none")` from hidden.
- `ours`: `rlhf_fast.ops.token_logprobs` / `linear_token_logprobs` with the Triton backend, computing what the
  case names (log p, entropy and k3 KL to a reference in the from-logits cases; log p from hidden, like the
  peers, plus one case with entropy and KL too).

Time is the median of `triton.testing.do_bench` (gradients reset between calls); peak extra memory is
`torch.cuda.max_memory_allocated()` during one call minus the memory allocated before it (inputs exist
already), so it counts temporaries, outputs and gradients. Peers compute less than `ours` in some cases (no
entropy, no KL): the column header says what each computes. The floor: bytes that must move at the H200's
measured 4.25 TB/s device copy rate (from logits), or 6·N·d·V flops at its 696 TFLOP/s bf16 matmul rate
(from hidden; our backward recomputes the logits, 8·N·d·V), both from shared/ANCHORS.md.
Every contender's log-probs are checked against naive before timing; a peer that fails prints its error.

Without a GPU it runs reduced shapes on the CPU (naive vs ours on the chunked backend, wall clock), so the
script can be checked anywhere.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_fast.ops import linear_token_logprobs, token_logprobs, use_backend

COPY_BYTES_PER_SECOND = 4.25e12
MATMUL_FLOPS_PER_SECOND = 696e12
COLUMNS = ("naive", "Liger CE", "Liger selective", "Liger FLCE", "CCE", "ours")
HEADER = (
    "| case (bf16) | naive torch | Liger CE (−log p) | Liger selective (log p, fwd) | Liger FLCE (−log p) "
    "| CCE (−log p) | ours | floor |\n|---|---|---|---|---|---|---|---|"
)


@dataclass
class Case:
    name: str
    kind: str  # "logits" or "hidden"
    tokens: int
    vocab: int
    width: int = 0
    backward: bool = False
    extras: bool = True  # entropy and k3 KL to a reference besides the log-prob


CASES = {
    "logits_fwd": Case("from logits, fwd, log p + entropy + k3 KL, N=8192 V=50304", "logits", 8192, 50304),
    "logits_fwd_152k": Case(
        "from logits, fwd, log p + entropy + k3 KL, N=8192 V=151936", "logits", 8192, 151936
    ),
    "logits_fwd_bwd": Case(
        "from logits, fwd+bwd, log p + entropy + k3 KL, N=8192 V=50304", "logits", 8192, 50304, backward=True
    ),
    "hidden_2k": Case(
        "from hidden, fwd+bwd, log p, N=8192 d=2048 V=50304",
        "hidden",
        8192,
        50304,
        2048,
        backward=True,
        extras=False,
    ),
    "hidden_2k_extras": Case(
        "from hidden, fwd+bwd, log p + entropy + k3 KL, N=8192 d=2048 V=50304",
        "hidden",
        8192,
        50304,
        2048,
        backward=True,
    ),
    "hidden_4k": Case(
        "from hidden, fwd+bwd, log p, N=4096 d=4096 V=128256",
        "hidden",
        4096,
        128256,
        4096,
        backward=True,
        extras=False,
    ),
}
DEFAULT_CASES = (
    "logits_fwd",
    "logits_fwd_bwd",
    "hidden_2k",
    "hidden_4k",
    "logits_fwd_152k",
    "hidden_2k_extras",
)


# ----------------------------------------------------------------------------------------------------------
# Inputs and contenders. Each contender is (inputs) -> (logp, leaves); leaves get gradients when the case has
# a backward.
# ----------------------------------------------------------------------------------------------------------


def make_inputs(case: Case, device: str, dtype=torch.bfloat16, seed: int = 0) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    targets = torch.randint(0, case.vocab, (case.tokens,), generator=generator, device=device)
    inputs = {"targets": targets}
    if case.kind == "logits":
        # One spare position, as a causal LM's logits have: Liger's selective kernel takes [B, L+1, V].
        logits = torch.randn(1, case.tokens + 1, case.vocab, generator=generator, device=device, dtype=dtype)
        inputs["logits_full"] = logits.mul_(2)
        inputs["logits"] = logits[:, :-1]
    else:
        inputs["hidden"] = torch.randn(
            case.tokens, case.width, generator=generator, device=device, dtype=dtype
        )
        inputs["weight"] = torch.randn(
            case.vocab, case.width, generator=generator, device=device, dtype=dtype
        ).div_(case.width**0.5)
    ref = (
        torch.randn(case.tokens, generator=generator, device=device) - 10.0
    )  # log-probs of a reference policy
    inputs["ref"] = ref
    return inputs


def naive(case: Case, inputs: dict):
    if case.kind == "logits":
        logits = inputs["logits"].reshape(case.tokens, case.vocab)
        leaves = [logits]
    else:
        logits = inputs["hidden"] @ inputs["weight"].T
        leaves = [inputs["hidden"], inputs["weight"]]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logp = log_probs.gather(-1, inputs["targets"].unsqueeze(-1)).squeeze(-1)
    total = logp
    if case.extras:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        log_ratio = inputs["ref"] - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
        total = logp + entropy + kl
    return logp, total, leaves


def ours(case: Case, inputs: dict, backend: str = "triton"):
    extras = (
        {"ref_logprobs": inputs["ref"], "kl_estimator": "k3", "return_entropy": True} if case.extras else {}
    )
    with use_backend(backend):
        if case.kind == "logits":
            if case.extras:
                extras["ref_logprobs"] = extras["ref_logprobs"].reshape(1, -1)
            # The [1, N, V] view of the [1, N+1, V] buffer: strided rows, read in place.
            out = token_logprobs(inputs["logits"], inputs["targets"].reshape(1, -1), **extras)
        else:
            out = linear_token_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], **extras)
    logp = out.logprobs.reshape(-1)
    total = logp if not case.extras else logp + out.entropy.reshape(-1) + out.kl.reshape(-1)
    return logp, total, []


def liger_cross_entropy(case: Case, inputs: dict):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    logits = inputs["logits"].reshape(case.tokens, case.vocab)
    loss = LigerCrossEntropyLoss(reduction="none")(logits, inputs["targets"])
    return -loss, loss, [logits]


def liger_selective(case: Case, inputs: dict):
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    logp = fused_selective_log_softmax(
        inputs["logits_full"], inputs["targets"].reshape(1, -1), temperature=1.0
    )
    return logp.reshape(-1), logp, []


def liger_fused_linear(case: Case, inputs: dict):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(
        inputs["weight"], inputs["hidden"], inputs["targets"]
    )
    return -loss, loss, [inputs["hidden"], inputs["weight"]]


def cut_cross_entropy(case: Case, inputs: dict):
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], reduction="none")
    return -loss, loss, [inputs["hidden"], inputs["weight"]]


def contenders(case: Case) -> dict[str, Callable]:
    """The columns that apply to `case` (peers only where their operation fits the case)."""
    if case.kind == "logits":
        # Liger's cross-entropy writes its gradient into the logits buffer: it runs last.
        table = {"naive": naive, "ours": ours}
        if not case.backward:
            table["Liger selective"] = liger_selective
        table["Liger CE"] = liger_cross_entropy
    else:
        table = {"naive": naive, "ours": ours}
        if not case.extras:
            table |= {"Liger FLCE": liger_fused_linear, "CCE": cut_cross_entropy}
    return table


def prepared_call(case: Case, inputs: dict, contender: Callable) -> tuple[Callable, list[torch.Tensor]]:
    """A no-argument call doing one forward (and backward) pass, and the tensors whose .grad it fills."""
    if case.kind == "logits" and case.backward:
        # Gradients flow to the [N, V] logits: a leaf view of the same storage.
        leaf = inputs["logits"].detach().requires_grad_()
        inputs = dict(inputs, logits=leaf)
        leaves = [leaf]
    elif case.kind == "hidden" and case.backward:
        inputs = dict(
            inputs,
            hidden=inputs["hidden"].detach().requires_grad_(),
            weight=inputs["weight"].detach().requires_grad_(),
        )
        leaves = [inputs["hidden"], inputs["weight"]]
    else:
        leaves = []

    def call():
        if not case.backward:
            with torch.no_grad():
                return contender(case, inputs)[0]
        logp, total, _ = contender(case, inputs)
        total.sum().backward()
        return logp

    return call, leaves


def floor_ms(case: Case) -> float:
    if case.kind == "logits":
        passes = 3 if case.backward else 1  # read (fwd), read (bwd), write the gradient
        return passes * case.tokens * case.vocab * 2 / COPY_BYTES_PER_SECOND * 1e3
    matmuls = 3 if case.backward else 1
    return 2 * matmuls * case.tokens * case.width * case.vocab / MATMUL_FLOPS_PER_SECOND * 1e3


# ----------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------


def peak_extra_gb(call: Callable, leaves: list[torch.Tensor]) -> float:
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    for leaf in leaves:
        leaf.grad = None
    return peak / 1e9


def run_gpu(case_names: list[str]) -> None:
    import triton
    import triton.testing

    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        "cells: median ms of do_bench / peak extra GB"
    )
    print(HEADER, flush=True)
    for name in case_names:
        case = CASES[name]
        inputs = make_inputs(case, "cuda")
        cells = {}
        want = None
        for column, contender in contenders(case).items():
            try:
                call, leaves = prepared_call(case, inputs, contender)
                logp = call()
                if column == "naive":
                    want = logp.detach().float()
                elif want is not None:
                    torch.testing.assert_close(logp.detach().float(), want, atol=0.05, rtol=0.02)
                del logp
                ms = triton.testing.do_bench(call, grad_to_none=leaves or None, return_mode="median")
                cells[column] = f"{ms:.3f} / {peak_extra_gb(call, leaves):.2f}"
            # A peer missing or failing must not stop the table.
            except Exception as error:  # noqa: BLE001
                reason = "not installed" if isinstance(error, ImportError) else type(error).__name__
                cells[column] = f"n/a ({reason})"
                if not isinstance(error, ImportError):
                    print(
                        f"{column} on {name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}",
                        file=sys.stderr,
                    )
            torch.cuda.empty_cache()
        row = " | ".join(cells.get(column, "–") for column in COLUMNS)
        print(f"| {case.name} | {row} | {floor_ms(case):.3f} ms |", flush=True)
        del inputs
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# CPU fallback: reduced shapes, naive vs ours (chunked), wall clock.
# ----------------------------------------------------------------------------------------------------------


def run_cpu_fallback(case_names: list[str]) -> None:
    torch.set_num_threads(1)
    print(
        "no CUDA device: CPU fallback at reduced shapes (N/32 tokens, d/8), naive vs ours on the chunked "
        "backend, one thread, best of 3 wall-clock ms; fp32"
    )
    print("| case (fp32, CPU, reduced) | naive torch | ours (chunked) |\n|---|---|---|")
    for name in case_names:
        full = CASES[name]
        case = Case(
            full.name, full.kind, full.tokens // 32, full.vocab, full.width // 8, full.backward, full.extras
        )
        inputs = make_inputs(case, "cpu", dtype=torch.float32)
        timings = {}
        want = None
        for column, contender in (("naive", naive), ("ours", functools.partial(ours, backend="chunked"))):
            call, _ = prepared_call(case, inputs, contender)
            logp = call()
            if want is None:
                want = logp.detach()
            else:
                torch.testing.assert_close(logp.detach(), want, atol=1e-4, rtol=1e-4)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - start)
            timings[column] = best * 1e3
        label = (
            f"{case.name.split(', N=')[0]}, N={case.tokens}"
            + (f" d={case.width}" if case.width else "")
            + f" V={case.vocab}"
        )
        print(f"| {label} | {timings['naive']:.1f} | {timings['ours']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated subset of {', '.join(CASES)}"
    )
    names = [name for name in parser.parse_args().cases.split(",") if name]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    run_gpu(names) if torch.cuda.is_available() else run_cpu_fallback(names)


if __name__ == "__main__":
    main()
