"""The one structure an evaluation produces and the report reads: typed results, written as report.json.

    Results
      models:        [ModelResult]        name, kind (base | sft | best_of | ppo | ppo_ptx | ppo_oracle | ...),
                                           size, params, metrics {name: Estimate}, task_scores {task: Estimate},
                                           items {metric: per-prompt values} (not written to report.json)
      reward_models: [RewardModelResult]  name, size, params, metrics {name: Estimate}
      labeler_agreement: Estimate | None  held-out vs training labelers on the pairs the RM is judged on
      ppo_history:   {run: [PPOStep]}     reward and KL per PPO iteration
      targets:       [Target]             the paper's findings as checks, each MET or MISS with its value
      timings, config, notes, title, win_rate_baseline

Every metric is an `Estimate`: a mean and its standard error over prompts (NaN when it has none). Models that
answered the same prompts are compared prompt by prompt (`Results.contrast`, `Results.difference`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A mean over items and its standard error (NaN: a single item, or a value without one)."""

    value: float
    se: float = math.nan

    @classmethod
    def of(cls, pair: tuple[float, float]) -> Estimate:
        """From the (value, se) pair `rlhf_fast.eval.metrics` returns."""
        value, se = pair
        return cls(float(value), float(se))

    def format(self, digits: int = 3) -> str:
        if math.isnan(self.value):
            return "nan"
        return (
            f"{self.value:.{digits}f}"
            if math.isnan(self.se)
            else f"{self.value:.{digits}f} ± {self.se:.{digits}f}"
        )

    def minus(self, other: Estimate) -> Estimate:
        """The difference of two independent estimates; its SE adds in quadrature."""
        return Estimate(self.value - other.value, math.hypot(self.se, other.se))

    def times(self, weight: float) -> Estimate:
        return Estimate(weight * self.value, abs(weight) * self.se)


@dataclass
class ModelResult:
    name: str
    kind: str
    size: str
    params: int | None = None
    metrics: dict[str, Estimate] = field(default_factory=dict)
    task_scores: dict[str, Estimate] = field(default_factory=dict)
    # Per-prompt values of metrics (`rlhf_fast.eval.suite.PAIRED_METRICS`), the same prompts in the same order
    # for every model of one evaluation: what `Results.contrast` pairs.
    items: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class RewardModelResult:
    name: str
    size: str
    params: int | None = None
    metrics: dict[str, Estimate] = field(default_factory=dict)


@dataclass(frozen=True)
class PPOStep:
    iteration: int
    reward: float
    kl: float
    entropy: float | None = None
    length: float | None = None


@dataclass(frozen=True)
class Target:
    """One finding of the paper as a check: `value` and `se` are the quantity compared with `threshold`."""

    target: str
    value: float
    se: float
    met: bool
    detail: str = ""

    def line(self) -> str:
        se = "" if math.isnan(self.se) else f" ± {self.se:.3f}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{'MET ' if self.met else 'MISS'} {self.target}: {self.value:.3f}{se}{detail}"


@dataclass
class Results:
    models: list[ModelResult]
    title: str = "Evaluation report"
    win_rate_baseline: str | None = None
    reward_models: list[RewardModelResult] = field(default_factory=list)
    labeler_agreement: Estimate | None = None
    ppo_history: dict[str, list[PPOStep]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def model(self, name: str) -> ModelResult:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"no model named {name!r}; models: {[m.name for m in self.models]}")

    def metric(self, name: str, metric: str) -> Estimate:
        return self.model(name).metrics[metric]

    def contrast(self, weights: dict[str, float], metric: str) -> Estimate:
        """sum_k weights[k] * (model k's `metric`). When every model holds the metric's per-prompt values (the
        same prompts), paired: the mean and SE of the weighted sum on each prompt, so what the prompts share
        (their difficulty) cancels instead of counting in each model's SE; otherwise the models' estimates as
        independent, SEs in quadrature."""
        if not weights:
            raise ValueError("weights must name at least one model")
        models = {name: self.model(name) for name in weights}
        if all(metric in model.items for model in models.values()):
            from rlhf_fast.eval.metrics import contrast

            terms = [(weight, models[name].items[metric]) for name, weight in weights.items()]
            return Estimate.of(contrast(terms))
        parts = [self.metric(name, metric).times(weight) for name, weight in weights.items()]
        return Estimate(sum(p.value for p in parts), math.hypot(*(p.se for p in parts)))

    def difference(self, name: str, baseline: str, metric: str) -> Estimate:
        """Model `name`'s `metric` minus `baseline`'s, paired by prompt where both hold per-prompt values."""
        return self.contrast({name: 1.0, baseline: -1.0}, metric)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NaN as null): report.json, without the models' per-prompt values."""
        data = dataclasses.asdict(self)
        for model in data["models"]:
            del model["items"]
        return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value
