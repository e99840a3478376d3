"""Build a world from a seed and write its datasets.

Everything is drawn from `random.Random` generators seeded by (seed, component name): the same seed and
sizes give the same world, and changing one size does not reshuffle the other components.

Datasets written by `write_datasets` (JSONL, one object per line):
    pretrain.jsonl        {"text"}                                    pretraining documents
    qa_benchmark.jsonl    {"prompt", "answer"}                        public-benchmark-format extractive QA
    demonstrations.jsonl  {"prompt", "response", "labeler", "customer", "task"}   SFT data
    prompts_rm.jsonl      {"prompt", "customer", "task"}              prompts to sample K completions for RM
    prompts_train.jsonl   {"prompt", "customer", "task"}              PPO prompts
    prompts_heldout.jsonl {"prompt", "customer", "task"}              held-out customers, evaluation only
    probes.jsonl          {"prompt", "probe", "task"}                 truthfulness / insult probes
    world.json            seed, sizes, vocabulary, labeler and customer ids with their split
Only training labelers and customers appear in demonstrations, prompts_rm and prompts_train; no held-out
prompt text occurs in any training file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from rlhf_fast.world.corpus import CorpusOptions, make_corpus, make_qa_benchmark
from rlhf_fast.world.customers import Customer, make_customers, sample_prompt
from rlhf_fast.world.facts import FactTable, make_fact_table
from rlhf_fast.world.labelers import Labeler, make_labelers, rank, write_demonstration
from rlhf_fast.world.language import Language, make_language, split_words, vocabulary
from rlhf_fast.world.task import Task, TaskInstance, TaskScore
from rlhf_fast.world.tasks import make_tasks, parse_prompt


@dataclass(frozen=True)
class WorldSizes:
    """How much of everything to generate."""

    pretrain_documents: int = 20000
    qa_benchmark: int = 500
    demonstrations: int = 2000
    rm_prompts: int = 1000
    ppo_prompts: int = 1000
    heldout_prompts: int = 500
    probes: int = 300  # per probe set (distinct prompts)
    customers: int = 40
    heldout_customer_fraction: float = 0.25
    # About 40 labelers, as InstructGPT's team of contractors: panels this large share their mean taste
    # (rlhf_fast.world.labelers).
    labelers: int = 40
    heldout_labelers: int = 10
    insult_words: int = 12
    myth_fraction: float = 0.25
    fact_animals: int = 8  # animals in the fact table
    # probes: "truthful" holds every distinct question about a myth (5 per myth) up to `probes`

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0:
                raise ValueError(f"sizes.{f.name} must be >= 0, got {value}")

    @classmethod
    def of(cls, sizes: WorldSizes | dict | None) -> WorldSizes:
        if sizes is None:
            return cls()
        if isinstance(sizes, WorldSizes):
            return sizes
        if isinstance(sizes, dict):
            unknown = set(sizes) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"sizes has unknown keys {sorted(unknown)}")
            return cls(**sizes)
        raise ValueError(f"sizes must be a WorldSizes, a dict or None, got {type(sizes).__name__}")


MAX_SAMPLES_PER_PROMPT = 9  # InstructGPT's labelers ranked 4 to 9 completions


class PromptRecord(NamedTuple):
    customer: str
    instance: TaskInstance


@dataclass
class World:
    """One generated world: its language, facts, tasks, people, and datasets (see module docstring)."""

    seed: int
    sizes: WorldSizes
    corpus_options: CorpusOptions
    language: Language
    facts: FactTable
    tasks: dict[str, Task]
    customers: list[Customer]
    labelers: list[Labeler]
    pretrain_documents: list[str]
    qa_benchmark: list[dict]
    demonstrations: list[dict]
    splits: dict[str, list[PromptRecord]]  # "sft", "rm", "ppo", "heldout"
    # Distinct probe prompts: "truthful" (questions about myths, a TruthfulQA analog), "insult_respectful"
    # (baiting text under a respectful instruction), "insult_plain" (the same kind of text, raw).
    probes: dict[str, list[TaskInstance]]
    _instances: dict[str, TaskInstance] = field(default_factory=dict, repr=False)

    @property
    def train_labelers(self) -> list[Labeler]:
        return [labeler for labeler in self.labelers if not labeler.held_out]

    @property
    def heldout_labelers(self) -> list[Labeler]:
        return [labeler for labeler in self.labelers if labeler.held_out]

    @property
    def train_customers(self) -> list[Customer]:
        return [customer for customer in self.customers if not customer.held_out]

    @property
    def heldout_customers(self) -> list[Customer]:
        return [customer for customer in self.customers if customer.held_out]

    def instances(self, split: str) -> list[TaskInstance]:
        """The instances of a prompt split ("sft", "rm", "ppo", "heldout") or probe set."""
        if split in self.splits:
            return [record.instance for record in self.splits[split]]
        if split in self.probes:
            return list(self.probes[split])
        raise ValueError(f"split must be one of {sorted(self.splits) + sorted(self.probes)}, got {split!r}")

    def vocabulary(self) -> list[str]:
        return vocabulary(self)

    def instance(self, prompt: str) -> TaskInstance | None:
        """The instance behind a world prompt, or None for a foreign prompt (not made by any task)."""
        key = " ".join(prompt.split())
        found = self._instances.get(key)
        if found is None:
            found = parse_prompt(self.tasks, key)
            if found is not None:
                self._instances[key] = found
        return found

    def _task(self, instance: TaskInstance) -> Task:
        try:
            return self.tasks[instance.task]
        except KeyError:
            raise ValueError(
                f"instance.task must be one of {sorted(self.tasks)}, got {instance.task!r}"
            ) from None

    def score(self, instance: TaskInstance, response: str | list[str]) -> TaskScore:
        return self._task(instance).score(instance, response)

    def ideal_response(self, instance: TaskInstance) -> str:
        return " ".join(self._task(instance).ideal_response(instance))


def _rng(seed: int, component: str) -> random.Random:
    return random.Random(f"rlhf_fast.world:{seed}:{component}")


def _distinct(draw, count: int) -> list[TaskInstance]:
    """`count` instances with distinct prompts from `draw()` (fewer if the space runs out)."""
    found: dict[str, TaskInstance] = {}
    for _ in range(20 * count + 100):
        if len(found) == count:
            break
        instance = draw()
        found.setdefault(instance.prompt, instance)
    return list(found.values())


def _draw_heldout(
    customers: list[Customer], tasks: dict[str, Task], count: int, rng: random.Random, train_prompts: set[str]
) -> list[PromptRecord]:
    records: list[PromptRecord] = []
    for _ in range(50 * count + 100):
        if len(records) == count:
            return records
        customer = rng.choice(customers)
        instance = sample_prompt(customer, tasks, rng)
        if instance.prompt not in train_prompts:
            records.append(PromptRecord(customer.id, instance))
    raise ValueError(f"could not draw {count} held-out prompts that differ from every training prompt")


def build_world(
    seed: int, sizes: WorldSizes | dict | None = None, corpus_options: CorpusOptions | None = None
) -> World:
    """Generate the world for `seed` (deterministic). `sizes`: a WorldSizes, a dict of its fields, or None."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    sizes = WorldSizes.of(sizes)
    language = make_language(_rng(seed, "language"), sizes.insult_words)
    facts = make_fact_table(language, _rng(seed, "facts"), sizes.myth_fraction, sizes.fact_animals)
    tasks = make_tasks(language, facts)
    customers = make_customers(
        _rng(seed, "customers"), tasks, sizes.customers, sizes.heldout_customer_fraction
    )
    labelers = make_labelers(_rng(seed, "labelers"), tasks, sizes.labelers, sizes.heldout_labelers)
    qa_benchmark = make_qa_benchmark(tasks, _rng(seed, "qa_benchmark"), sizes.qa_benchmark)
    pretrain = make_corpus(
        tasks,
        _rng(seed, "corpus"),
        sizes.pretrain_documents,
        corpus_options,
        excluded_qa={item["prompt"] for item in qa_benchmark},
    )

    train_customers = [c for c in customers if not c.held_out]
    splits: dict[str, list[PromptRecord]] = {}
    for split, count in (("sft", sizes.demonstrations), ("rm", sizes.rm_prompts), ("ppo", sizes.ppo_prompts)):
        rng = _rng(seed, f"prompts:{split}")
        splits[split] = []
        for _ in range(count):
            customer = rng.choice(train_customers)
            splits[split].append(PromptRecord(customer.id, sample_prompt(customer, tasks, rng)))
    train_prompts = {record.instance.prompt for split in splits.values() for record in split}
    splits["heldout"] = _draw_heldout(
        [c for c in customers if c.held_out],
        tasks,
        sizes.heldout_prompts,
        _rng(seed, "prompts:heldout"),
        train_prompts,
    )

    train_labelers = [labeler for labeler in labelers if not labeler.held_out]
    rng = _rng(seed, "demonstrations")
    demonstrations = []
    for customer, instance in splits["sft"]:
        labeler = rng.choice(train_labelers)
        response = write_demonstration(labeler, instance, rng)
        demonstrations.append(
            {
                "prompt": instance.prompt,
                "response": response,
                "labeler": labeler.id,
                "customer": customer,
                "task": instance.task,
            }
        )

    rng = _rng(seed, "probes")
    myth_probes = tasks["truth"].myth_probes()
    probes = {
        "truthful": rng.sample(myth_probes, min(sizes.probes, len(myth_probes))),
        "insult_respectful": _distinct(
            lambda: tasks["continue"].sample(rng, respectful=True, bait=True), sizes.probes
        ),
        "insult_plain": _distinct(
            lambda: tasks["continue"].sample(rng, template=tasks["continue"].RAW, bait=True), sizes.probes
        ),
    }

    world = World(
        seed=seed,
        sizes=sizes,
        corpus_options=corpus_options or CorpusOptions(),
        language=language,
        facts=facts,
        tasks=tasks,
        customers=customers,
        labelers=labelers,
        pretrain_documents=pretrain,
        qa_benchmark=qa_benchmark,
        demonstrations=demonstrations,
        splits=splits,
        probes=probes,
    )
    for records in splits.values():
        for record in records:
            world._instances.setdefault(record.instance.prompt, record.instance)
    for instances in probes.values():
        for instance in instances:
            world._instances.setdefault(instance.prompt, instance)
    return world


def make_rankings(
    world: World,
    instances: Sequence[TaskInstance | str],
    samples_per_prompt: Sequence[Sequence[str]],
    labelers: Sequence[Labeler],
    rng: random.Random,
) -> list[dict]:
    """K-wise rankings {"prompt", "completions", "ranks", "labeler", "task"} (rank 0 = best) of the given
    samples, each prompt ranked by one labeler drawn from `labelers` with Plackett-Luce noise.

    `instances` may be world prompts (strings). Samples are whitespace-normalized; duplicates and empty
    samples are dropped (the data layer requires distinct, non-empty completions), so ranks are strict. A
    prompt left with fewer than two distinct samples carries no comparison and is skipped: the result can be
    shorter than `instances`.
    """
    if len(instances) != len(samples_per_prompt):
        raise ValueError(
            f"instances ({len(instances)}) and samples_per_prompt ({len(samples_per_prompt)}) "
            "must have the same length"
        )
    if not labelers:
        raise ValueError("labelers must not be empty")
    rankings = []
    for item, samples in zip(instances, samples_per_prompt):
        instance = world.instance(item) if isinstance(item, str) else item
        if instance is None:
            raise ValueError(f"instances holds a prompt that is not a world prompt: {item!r}")
        if not 2 <= len(samples) <= MAX_SAMPLES_PER_PROMPT:
            raise ValueError(
                f"each entry of samples_per_prompt needs 2..{MAX_SAMPLES_PER_PROMPT} samples, "
                f"got {len(samples)}"
            )
        labeler = rng.choice(list(labelers))
        # The data layer wants distinct, non-empty completions: duplicates collapse into one (the tie an
        # exact duplicate would get), empty samples are dropped.
        normalized = (" ".join(split_words(sample)) for sample in samples)
        completions = list(dict.fromkeys(text for text in normalized if text))
        if len(completions) < 2:
            continue
        ranks = rank(labeler, instance, completions, rng)
        rankings.append(
            {
                "prompt": instance.prompt,
                "completions": completions,
                "ranks": ranks,
                "labeler": labeler.id,
                "task": instance.task,
            }
        )
    return rankings


def _write_jsonl(path: Path, records) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def write_datasets(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write the world's datasets (see module docstring) into `out_dir`; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}

    def write(name: str, records) -> None:
        paths[name] = out / f"{name}.jsonl"
        _write_jsonl(paths[name], records)

    def prompt_records(split: str):
        return (
            {"prompt": r.instance.prompt, "customer": r.customer, "task": r.instance.task}
            for r in world.splits[split]
        )

    write("pretrain", ({"text": text} for text in world.pretrain_documents))
    write("qa_benchmark", world.qa_benchmark)
    write("demonstrations", world.demonstrations)
    write("prompts_rm", prompt_records("rm"))
    write("prompts_train", prompt_records("ppo"))
    write("prompts_heldout", prompt_records("heldout"))
    write(
        "probes",
        (
            {"prompt": i.prompt, "probe": name, "task": i.task}
            for name, instances in world.probes.items()
            for i in instances
        ),
    )
    paths["world"] = out / "world.json"
    paths["world"].write_text(
        json.dumps(
            {
                "seed": world.seed,
                "sizes": asdict(world.sizes),
                "corpus_options": asdict(world.corpus_options),
                "vocabulary": world.vocabulary(),
                "labelers": [{"id": labeler.id, "held_out": labeler.held_out} for labeler in world.labelers],
                "customers": [
                    {"id": customer.id, "held_out": customer.held_out} for customer in world.customers
                ],
            },
            indent=1,
        )
    )
    return paths


WORLD_FILE = "world.json"


def load_world(directory: str | Path) -> World:
    """The world whose datasets `write_datasets` wrote into `directory` (or whose world.json is `directory`),
    rebuilt from its seed, sizes and corpus options; its vocabulary must match the one written there."""
    path = Path(directory)
    if path.is_dir():
        path = path / WORLD_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read the world description ({error.strerror or error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    for key in ("seed", "sizes", "vocabulary"):
        if key not in saved:
            raise ValueError(
                f"{path}: field {key!r} is missing; write it with rlhf_fast.world.write_datasets"
            )
    options = dict(saved.get("corpus_options") or {})
    if "units_per_document" in options:
        options["units_per_document"] = tuple(options["units_per_document"])
    world = build_world(saved["seed"], saved["sizes"], CorpusOptions(**options))
    if world.vocabulary() != saved["vocabulary"]:
        raise ValueError(
            f"{path}: field 'vocabulary' differs from the world this code builds from its seed "
            "and sizes (written by another version of rlhf_fast.world)"
        )
    return world
