"""The argument bundles every log-prob backend takes, and the row math they share.

A backend's forward takes the logits (or hidden, weight, bias) and one `LogprobSpec`; its backward also takes
one `LogprobGrads`. The custom ops (op.py) keep flat schemas, as torch.library requires, and build these
bundles from their arguments in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from rlhf_fast.ops._contract import output_dtype


class TokenLogprobs(NamedTuple):
    """Per-token outputs, each float32 (float64 for float64 inputs) with the shape of `targets`."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    kl: torch.Tensor | None


@dataclass(frozen=True)
class LogprobSpec:
    """What one call computes, besides the logits (or hidden × LM head) it reads.

    targets: [...] integer ids; mask: [...] bool or None (every token valid); ref_logprobs: [...] float or
    None (no KL); temperature > 0; kl_estimator: "k1" | "k2" | "k3"; want_entropy: also return the entropy.
    """

    targets: torch.Tensor
    mask: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    temperature: float
    kl_estimator: str
    want_entropy: bool

    @property
    def inv_temp(self) -> float:
        return 1.0 / self.temperature

    @property
    def rows(self) -> int:
        return self.targets.numel()

    def flat_targets(self) -> torch.Tensor:
        return self.targets.reshape(-1).long()

    def flat_valid(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask.reshape(-1).bool()

    def op_args(self) -> tuple:
        """The fields in order, as the forward ops' schemas end (op.py)."""
        return tuple(getattr(self, field.name) for field in fields(self))

    def flattened(self) -> LogprobSpec:
        """The same call over [N] rows."""
        return LogprobSpec(
            self.targets.reshape(-1),
            None if self.mask is None else self.mask.reshape(-1),
            None if self.ref_logprobs is None else self.ref_logprobs.reshape(-1),
            self.temperature,
            self.kl_estimator,
            self.want_entropy,
        )


@dataclass(frozen=True)
class LogprobGrads:
    """What a backward takes besides the spec: the gradients of the outputs (d entropy and d kl are None when
    that output was not asked for or got no gradient) and the forward's per-row results."""

    grad_logprobs: torch.Tensor
    grad_entropy: torch.Tensor | None
    grad_kl: torch.Tensor | None
    logprobs: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor

    def row_coefficients(
        self, spec: LogprobSpec, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """a/τ and b/τ per row, flattened (see the package docstring for a and b)."""
        a = self.grad_logprobs.reshape(-1).to(dtype)
        if self.grad_kl is not None and spec.ref_logprobs is not None:
            _, slope = kl_and_slope(
                self.logprobs.reshape(-1).to(dtype),
                spec.ref_logprobs.reshape(-1).to(dtype),
                spec.kl_estimator,
            )
            a = a + self.grad_kl.reshape(-1).to(dtype) * slope
        b = None if self.grad_entropy is None else self.grad_entropy.reshape(-1).to(dtype) * spec.inv_temp
        return a * spec.inv_temp, b


def kl_and_slope(
    logp: torch.Tensor, ref: torch.Tensor, kl_estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token KL estimate and its derivative with respect to logp."""
    diff = logp - ref
    if kl_estimator == "k1":
        return diff, torch.ones_like(diff)
    if kl_estimator == "k2":
        return 0.5 * diff * diff, diff
    ratio = torch.exp(-diff)
    return ratio + diff - 1.0, 1.0 - ratio


def kl_output(logp: torch.Tensor, spec: LogprobSpec) -> torch.Tensor:
    """The flat kl output for flat logp (a [0] placeholder without a reference); 0 at masked rows."""
    if spec.ref_logprobs is None:
        return logp.new_empty(0)
    kl = kl_and_slope(logp, spec.ref_logprobs.reshape(-1).to(logp.dtype), spec.kl_estimator)[0]
    valid = spec.flat_valid()
    return kl if valid is None else torch.where(valid, kl, 0)


def shape_outputs(outputs, spec: LogprobSpec) -> tuple[torch.Tensor, ...]:
    """Flat per-row outputs -> targets' shape; an output not asked for stays a [0] placeholder."""
    logp, entropy, kl, lse = outputs
    shape = spec.targets.shape
    return (
        logp.reshape(shape),
        entropy.reshape(shape) if spec.want_entropy else entropy,
        kl.reshape(shape) if spec.ref_logprobs is not None else kl,
        lse.reshape(shape),
    )


def empty_outputs(like: torch.Tensor, spec: LogprobSpec) -> tuple[torch.Tensor, ...]:
    """The forward ops' outputs as the fake kernels give them: (logprobs, entropy or [0], kl or [0], lse) on
    `like`'s device, in the output dtype of `like`'s dtype."""
    dtype = output_dtype(like.dtype)
    shape = spec.targets.shape
    return (
        like.new_empty(shape, dtype=dtype),
        like.new_empty(shape if spec.want_entropy else (0,), dtype=dtype),
        like.new_empty(shape if spec.ref_logprobs is not None else (0,), dtype=dtype),
        like.new_empty(shape, dtype=dtype),
    )
