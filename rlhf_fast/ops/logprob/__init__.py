"""Per-token log-prob, entropy and KL to a reference, from logits or from hidden states × LM head.

For z = logits / τ and p = softmax(z) over the vocabulary:

    logprobs = log p_y = z_y − lse(z)
    entropy  = −Σ_k p_k log p_k = lse(z) − Σ_k p_k z_k
    kl       = k1: logp − ref          k2: ½ (logp − ref)²          k3: exp(ref − logp) − (ref − logp) − 1

(k1/k2/k3 are Schulman's estimators of KL(π‖π_ref) from samples of π). Gradients, with a = dL/dlogp +
dL/dkl · dkl/dlogp and b = dL/dH:

    dL/dz_k = a · (1[k = y] − p_k) − b · p_k · (log p_k + H)          (dH/dz_k = −p_k (z_k − Σ_j p_j z_j))

and dL/dlogits = dL/dz / τ. ref_logprobs gets no gradient. Tokens with mask == 0 are skipped: their targets may
hold anything (e.g. −100 padding), they read no logits, and their outputs and gradients are 0.

`linear_token_logprobs` computes the same from hidden [.., d] and the LM head weight [V, d] (+ bias [V])
without ever holding the [N, V] logits at once: the logits are made tile by tile (tokens × vocabulary), each
tile is folded into per-row online-softmax statistics, and backward recomputes each tile. Nothing
vocabulary-sized per token is saved for backward: only the per-row lse (and the entropy, an output).

Backends: `reference` (reference.py: the full log_softmax, for testing), `chunked` (chunked.py: plain
torch over cache-sized tiles, `CHUNK_ELEMENTS` elements each; masked tokens are dropped before any work, a
host sync), `cpp` (cpp.py: the same tiling with each tile's arithmetic in C++; the CPU default where the
extension is built), `triton` (rlhf_fast/ops/triton/logprob.py and linear_logprob.py; the GPU default; runs
on CPU tensors under TRITON_INTERPRET=1). Outputs are float32 (float64 for float64 inputs, which the Triton
kernels do not take: on a GPU they go to `chunked`).

The package: this file holds the public functions and their argument checks; spec.py the argument bundles
and the row math they share; reference.py and chunked.py the plain-torch backends, cpp.py the C++ tiles;
op.py the custom ops, their autograd and the backend table.
"""

from __future__ import annotations

import torch

from rlhf_fast.ops._checks import check_mask, check_same_device, check_tensor, value_checks_enabled
from rlhf_fast.ops._contract import KL_ESTIMATORS
from rlhf_fast.ops.logprob.chunked import CHUNK_ELEMENTS, LINEAR_TILE_ROWS
from rlhf_fast.ops.logprob.op import (
    GPU_ORDER,
    IMPLEMENTED,
    linear_token_logprobs_forward,
    token_logprobs_forward,
)
from rlhf_fast.ops.logprob.reference import linear_token_logprobs_reference, token_logprobs_reference
from rlhf_fast.ops.logprob.spec import LogprobSpec, TokenLogprobs

__all__ = [
    "CHUNK_ELEMENTS",
    "GPU_ORDER",
    "IMPLEMENTED",
    "KL_ESTIMATORS",
    "LINEAR_TILE_ROWS",
    "TokenLogprobs",
    "linear_token_logprobs",
    "linear_token_logprobs_reference",
    "token_logprobs",
    "token_logprobs_reference",
]


def _checked_spec(name: str, reference: torch.Tensor, vocab: int, given: LogprobSpec) -> LogprobSpec:
    """Checks the arguments both public functions share, `given` as the caller passed them (`reference` is
    logits or hidden); returns the spec the ops take: mask bool or None, ref_logprobs detached, temperature
    a float."""
    targets, mask, ref_logprobs = given.targets, given.mask, given.ref_logprobs
    temperature, kl_estimator, return_entropy = given.temperature, given.kl_estimator, given.want_entropy
    leading = reference.shape[:-1]
    check_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if targets.shape != leading:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}, expected {tuple(leading)} "
            f"(the leading dimensions of {name})"
        )
    if ref_logprobs is not None:
        check_tensor("ref_logprobs", ref_logprobs, floating=True)
        if ref_logprobs.shape != leading:
            raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected {tuple(leading)}")
    if mask is not None:
        check_mask("mask", mask, leading)
        mask = mask if mask.dtype == torch.bool else mask != 0
    check_same_device(name, reference, targets=targets, ref_logprobs=ref_logprobs, mask=mask)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (0.0 < float(temperature) < float("inf"))
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")  # noqa: TRY004 (project rule)
    if value_checks_enabled() and targets.numel():
        checked = targets if mask is None else targets[mask]
        if checked.numel() and (bool((checked < 0).any()) or bool((checked >= vocab).any())):
            raise ValueError(
                f"targets must lie in [0, {vocab}) at every valid token, got values in "
                f"[{int(checked.min())}, {int(checked.max())}]"
            )
    if ref_logprobs is not None and ref_logprobs.requires_grad:
        ref_logprobs = ref_logprobs.detach()
    return LogprobSpec(targets, mask, ref_logprobs, float(temperature), kl_estimator, return_entropy)


def _outputs(forward_outputs: tuple[torch.Tensor, ...], spec: LogprobSpec) -> TokenLogprobs:
    """The public result from a forward op's (logprobs, entropy, kl, lse), leaving out what was not asked for."""
    logp, entropy, kl, _ = forward_outputs
    return TokenLogprobs(
        logp, entropy if spec.want_entropy else None, kl if spec.ref_logprobs is not None else None
    )


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k1",
    return_entropy: bool = False,
) -> TokenLogprobs:
    """Log-prob of each target token under softmax(logits / temperature), with optional entropy and KL.

    logits: [..., V] float32/bfloat16/float16 (float64 for testing), any strides; targets: [...] integer ids;
    ref_logprobs: [...] float, the reference policy's log-probs of the same tokens (enables `kl`; no gradient);
    mask: [...] bool/integer, nonzero = compute this token (others come back 0 with zero gradient).
    kl_estimator: "k1" | "k2" | "k3" (see the module docstring); return_entropy: also return the entropy.

    Returns TokenLogprobs(logprobs, entropy, kl), each float32 [...] (entropy/kl None unless asked for),
    differentiable with respect to logits through logprobs, entropy and kl.
    """
    check_tensor("logits", logits, floating=True)
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension, got a 0-dim tensor")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    given = LogprobSpec(targets, mask, ref_logprobs, temperature, kl_estimator, return_entropy)
    spec = _checked_spec("logits", logits, logits.shape[-1], given)
    return _outputs(token_logprobs_forward(logits, *spec.op_args()), spec)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k1",
    return_entropy: bool = False,
) -> TokenLogprobs:
    """`token_logprobs` of the logits hidden @ weight.T + bias, without materializing them.

    hidden: [..., d] float32/bfloat16/float16; weight: [V, d] (the LM head) and bias: [V], same dtype as hidden;
    the other arguments and the result are those of `token_logprobs`. Gradients flow to hidden, weight and bias.
    """
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} but weight has shape {tuple(weight.shape)}: "
            "the last dimension of hidden must equal weight.shape[1]"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}: cast one to the other"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}")
    check_same_device("hidden", hidden, weight=weight, bias=bias)
    given = LogprobSpec(targets, mask, ref_logprobs, temperature, kl_estimator, return_entropy)
    spec = _checked_spec("hidden", hidden, weight.shape[0], given)
    return _outputs(linear_token_logprobs_forward(hidden, weight, bias, *spec.op_args()), spec)
