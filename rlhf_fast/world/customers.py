"""Simulated API customers. Each has its own task mix and phrasing habits (templates it favours, how often
it says "please", whether it asks for respectful continuations); customers are split into the ones whose
prompts feed training and the held-out ones whose prompts are used only for evaluation."""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf_fast.world.task import Task, TaskInstance


@dataclass(frozen=True)
class Customer:
    id: str
    task_weights: tuple[tuple[str, float], ...]  # (task name, probability), summing to 1
    template_weights: tuple[tuple[str, tuple[float, ...]], ...]  # per task, weights over its templates
    polite_rate: float
    respectful_rate: float  # share of its continuation requests that ask for respect
    held_out: bool


def _dirichlet(rng: random.Random, size: int, concentration: float) -> list[float]:
    draws = [rng.gammavariate(concentration, 1.0) for _ in range(size)]
    total = sum(draws)
    return [d / total for d in draws]


def make_customers(
    rng: random.Random, tasks: dict[str, Task], count: int, heldout_fraction: float
) -> list[Customer]:
    """`count` customers; the last round(heldout_fraction · count) (at least one of each group) are held
    out."""
    if count < 2:
        raise ValueError(f"count must be >= 2 (a training and a held-out customer), got {count}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n_heldout = min(count - 1, max(1, round(heldout_fraction * count)))
    customers = []
    for index in range(count):
        # A floor on every weight keeps every task present in every customer's traffic.
        mix = [0.03 + 0.76 * w for w in _dirichlet(rng, len(tasks), 1.0)]
        total = sum(mix)
        templates = tuple(
            (name, tuple(_dirichlet(rng, len(task.templates), 2.0))) for name, task in tasks.items()
        )
        customers.append(
            Customer(
                id=f"C{index:03d}",
                task_weights=tuple((name, w / total) for name, w in zip(tasks, mix)),
                template_weights=templates,
                polite_rate=rng.uniform(0.0, 0.5),
                respectful_rate=rng.uniform(0.2, 0.8),
                held_out=index >= count - n_heldout,
            )
        )
    return customers


def sample_prompt(customer: Customer, tasks: dict[str, Task], rng: random.Random) -> TaskInstance:
    """One prompt from `customer`: a task from its mix, a template from its habits."""
    names, weights = zip(*customer.task_weights)
    name = rng.choices(names, weights)[0]
    task = tasks[name]
    if name == "continue":
        respectful = rng.random() < customer.respectful_rate
        # Customers write instructions; raw web text is left to the toxicity probes.
        candidates = [i for i, r in enumerate(task.respectful_templates) if r == respectful and i != task.RAW]
    else:
        candidates = list(range(len(task.templates)))
    template_weights = dict(customer.template_weights)[name]
    template = rng.choices(candidates, [template_weights[i] for i in candidates])[0]
    return task.sample(rng, template=template, polite=rng.random() < customer.polite_rate)


def sample_prompts(
    customers: list[Customer], tasks: dict[str, Task], count: int, rng: random.Random
) -> list[tuple[str, TaskInstance]]:
    """`count` (customer id, instance) pairs, customers drawn uniformly from `customers`."""
    if not customers:
        raise ValueError("customers must not be empty")
    prompts = []
    for _ in range(count):
        customer = rng.choice(customers)
        prompts.append((customer.id, sample_prompt(customer, tasks, rng)))
    return prompts
