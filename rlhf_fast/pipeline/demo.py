"""`rlhf-fast demo`: the InstructGPT paper in miniature, end to end, through the same trainers, data layer,
checkpoints and models a user runs on a real model.

    make_world → pretrain_base_model → finetune_sft_model → sample_for_rankings → train_reward_model
               → train_ppo_model → evaluate → check_targets → report

one training stage per model (the reward model's backbone, the base model of its size pretrained further, is
one too); stages that read none of each other's models run side by side (`demo_jobs`,
`rlhf_fast.pipeline.parallel`).

Every stage reads the JSONL files the world wrote (the user-facing formats), trains through `SFTTrainer`,
`RewardTrainer` and `PPOTrainer`, and writes a Hugging Face directory under `out_dir`. Evaluation is by
held-out labelers on held-out customers' prompts (`rlhf_fast.eval.suite`), and the report lands in
`out_dir/report/`.

Rerunning into the same `out_dir` reuses every stage that finished before with the same settings
(`rlhf_fast.pipeline.stages`); `fresh=True` reruns everything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_fast.eval.results import Estimate, PPOStep, Results, RewardModelResult
from rlhf_fast.pipeline.evaluation import (
    evaluate,
    merge_shares,
    parameter_count,
    policy_shares,
    sample_policy,
)
from rlhf_fast.pipeline.parallel import Job, concurrency, plan_threads, remaining, run_jobs
from rlhf_fast.pipeline.presets import DemoPreset, get_preset
from rlhf_fast.pipeline.stages import (
    Stages,
    oracle_ppo_name,
    rm_backbone,
    rm_sample_sizes,
    rm_size,
    stage_keys,
)
from rlhf_fast.pipeline.targets import check_targets


def samples_file(out: Path, size: str) -> Path:
    """Where the sampling stage of the `size` SFT model writes its share of each RM prompt's samples."""
    return out / f"rm_samples-{size}" / "samples.json"


@dataclass
class DemoRun:
    """What the stages share: the settings, the world, its datasets (as files and encoded), the stage keys,
    and, once trained, the models to evaluate (`model_dirs`, by name: base-tiny, sft-small, ...)."""

    preset: DemoPreset
    seed: int
    out: Path
    stages: Stages
    world: Any  # rlhf_fast.world.World
    paths: dict[str, Path]
    tokenizer: Any
    keys: dict[str, Any]
    pretrain: Any  # rlhf_fast.data.EncodedPretrain
    demonstrations: Any  # rlhf_fast.data.EncodedDemonstrations
    ppo_prompts: Any  # rlhf_fast.data.EncodedPrompts
    model_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def console(self) -> Callable[[str], None]:
        return self.stages.console

    @property
    def sizes(self) -> tuple[str, ...]:
        return self.preset.model_sizes

    @property
    def rm_dir(self) -> Path:
        return self.out / "rm" / "final"

    def model_dir(self, name: str) -> Path:
        """Where the stage `name` writes its model."""
        return self.out / name / "final"

    @functools.cached_property
    def pretrain_examples(self) -> list[Any]:
        """The corpus blocks as SFT examples (rlhf_fast.data.SFTExample): loss on all but the first token."""
        from rlhf_fast.data import SFTExample

        return [SFTExample(block.tolist(), 1) for block in self.pretrain.blocks]

    def trainer_settings(self, name: str) -> dict[str, Any]:
        """The settings every trainer of the demo shares; `name` is the stage's directory."""
        return {
            "seed": self.seed,
            "output_dir": str(self.out / name),
            "save_every": 0,
            "device": self.preset.device,
            "log_every": 1,
        }


@dataclass(frozen=True)
class RewardModelSummary:
    rankings: int
    validation_rankings: int
    validation_accuracy: float


# ---- stages ------------------------------------------------------------------------------------------------
def make_world(preset: DemoPreset, seed: int, out: Path, stages: Stages) -> DemoRun:
    """The world and its datasets, written as the user-facing JSONL formats, read back and encoded."""
    from rlhf_fast.world import CorpusOptions, build_world, write_datasets

    def generate():
        world = build_world(seed, preset.world, CorpusOptions(**preset.corpus))
        return world, write_datasets(world, out / "data")

    what = f"generating the world (seed {seed}, preset {preset.name})"
    world, paths = stages.timed("world", what, generate)
    run = open_run(preset, seed, out, paths, stages, world)
    run.tokenizer.save_pretrained(out / "tokenizer")
    stages.console(
        f"  vocabulary {len(run.tokenizer)} words; {len(run.pretrain)} pretraining blocks of "
        f"{preset.pretrain_block_size} tokens; {len(run.demonstrations)} demonstrations; "
        f"{len(run.ppo_prompts)} PPO prompts"
    )
    return run


def open_run(
    preset: DemoPreset, seed: int, out: Path, paths: dict[str, Path], stages: Stages, world: Any = None
) -> DemoRun:
    """The run whose datasets `make_world` wrote to `paths`, read and encoded; its world rebuilt from them
    (`rlhf_fast.world.load_world`) when `world` is None, as in a worker process."""
    from rlhf_fast.data import (
        encode_demonstrations,
        encode_pretrain,
        encode_prompts,
        read_demonstrations,
        read_pretrain_text,
        read_prompts,
    )
    from rlhf_fast.models.tiny import build_word_tokenizer
    from rlhf_fast.world import load_world

    world = world if world is not None else load_world(out / "data")
    tokenizer = build_word_tokenizer(world.vocabulary())
    return DemoRun(
        preset=preset,
        seed=seed,
        out=out,
        stages=stages,
        world=world,
        paths=paths,
        tokenizer=tokenizer,
        keys=stage_keys(preset, seed, paths, world.vocabulary()),
        pretrain=encode_pretrain(
            read_pretrain_text(paths["pretrain"]).records, tokenizer, preset.pretrain_block_size
        ),
        demonstrations=encode_demonstrations(
            read_demonstrations(paths["demonstrations"]).records, tokenizer, preset.max_length
        ),
        ppo_prompts=encode_prompts(
            read_prompts(paths["prompts_train"]).records,
            tokenizer,
            preset.max_positions - preset.max_new_tokens,
        ),
    )


def open_worker_run(
    preset: DemoPreset,
    seed: int,
    out: Path,
    paths: dict[str, Path],
    fresh: bool,
    default_threads: int,
    threads: dict[str, int],
    *,
    console: Callable[[str], None],
) -> DemoRun:
    """`open_run` in a worker process of `rlhf_fast.pipeline.parallel.run_jobs`."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return open_run(preset, seed, out, paths, Stages(console, fresh, default_threads, threads))


def demo_jobs(preset: DemoPreset) -> list[Job]:
    """The training stages by the models each reads, the larger models' first and the reward model's own
    backbone before the SFT models (they take longer: started first, they end the run sooner)."""
    largest_first = tuple(reversed(preset.model_sizes))
    size = rm_size(preset)
    jobs = [Job(f"base-{s}") for s in largest_first]
    if preset.rm_pretrain_steps:
        jobs.append(Job(f"rm_base-{size}", (f"base-{size}",)))
    jobs += [Job(f"sft-{s}", (f"base-{s}",)) for s in largest_first]
    if preset.rm_pretrain_steps:
        jobs.append(Job(f"rm_sft-{size}", (f"rm_base-{size}",)))
    sampled = [s for s in largest_first if s in rm_sample_sizes(preset)]
    jobs += [Job(f"rm_samples-{s}", (f"sft-{s}",)) for s in sampled]
    jobs.append(Job("rm", (rm_backbone(preset), *(f"rm_samples-{s}" for s in sampled))))
    for s in largest_first:
        jobs += [Job(f"{kind}-{s}", (f"sft-{s}", "rm")) for kind in ("ppo_ptx", "ppo")]
        if preset.oracle_ppo and s == preset.model_sizes[-1]:
            jobs.append(Job(oracle_ppo_name(preset), (f"sft-{s}", "rm")))
    return jobs


def trained_models(preset: DemoPreset) -> list[str]:
    """Every policy the training stages write, in the report's order."""
    names = [f"{kind}-{size}" for kind in ("base", "sft") for size in preset.model_sizes]
    names += [f"{kind}-{size}" for size in preset.model_sizes for kind in ("ppo", "ppo_ptx")]
    return names + ([oracle_ppo_name(preset)] if preset.oracle_ppo else [])


def run_stage(run: DemoRun, name: str) -> dict[str, Any]:
    """Runs the training stage `name` (a `demo_jobs` name); returns what `run.stages` recorded
    (`Stages.take_record`)."""
    kind, _, size = name.rpartition("-")
    if name == "rm":
        train_reward_model(run)
    elif kind in ("base", "rm_base"):
        pretrain_base_model(run, size, kind)
    elif kind in ("sft", "rm_sft"):
        finetune_sft_model(run, size, kind)
    elif kind == "rm_samples":
        sample_for_rankings(run, size)
    else:
        train_ppo_model(run, kind, size)
    return run.stages.take_record()


def pretrain_base_model(run: DemoRun, size: str, kind: str = "base") -> None:
    """Causal-LM pretraining on the corpus (loss on every token after the first). kind "rm_base": the reward
    model's backbone, the `size` base model pretrained `rm_pretrain_steps` more (a warm-up and cosine decay of
    its own)."""
    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.trainers import SFTConfig, SFTTrainer

    preset, tokenizer = run.preset, run.tokenizer
    name = f"{kind}-{size}"
    steps = preset.per_size("pretrain_steps", size) if kind == "base" else preset.rm_pretrain_steps

    def pretrain():
        config = SFTConfig(
            **run.trainer_settings(name),
            batch_size=preset.pretrain_batch_size,
            learning_rate=preset.per_size("pretrain_learning_rate", size),
            epochs=10_000,
            max_steps=steps,
            warmup=max(1, steps // 20),
            residual_dropout=None,
            min_lr_ratio=0.1,
        )
        if kind == "rm_base":
            model = run.model_dir(f"base-{size}")
        else:
            model = tiny_causal_lm(
                size,
                vocab_size=len(tokenizer),
                max_positions=preset.max_positions,
                seed=run.seed,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
            )
        SFTTrainer(config, model, run.pretrain_examples, tokenizer=tokenizer).train()

    what = (
        f"pretraining the {size} base model ({steps} steps)"
        if kind == "base"
        else f"pretraining the reward model's backbone: the {size} base model, {steps} steps more"
    )
    run.stages.run("pretrain", what, run.out / name, run.keys[name], pretrain)


def finetune_sft_model(run: DemoRun, size: str, kind: str = "sft") -> None:
    """SFT of the base model on the labelers' demonstrations, and `sft_pretrain_mix` pretraining blocks per
    demonstration mixed in (one draw for every size; a block's loss is on every token after its first). kind
    "rm_sft": the same for the reward model's backbone."""
    from rlhf_fast.trainers import SFTConfig, SFTTrainer

    preset = run.preset
    name = f"{kind}-{size}"
    base = f"{'base' if kind == 'sft' else 'rm_base'}-{size}"

    def finetune():
        examples = list(run.demonstrations.examples)
        mixed = round(preset.sft_pretrain_mix * len(examples))
        if mixed:
            rng = random.Random(f"demo:{run.seed}:sft-pretrain-mix")
            blocks = rng.sample(range(len(run.pretrain)), min(mixed, len(run.pretrain)))
            examples += [run.pretrain_examples[i] for i in blocks]
        config = SFTConfig(
            **run.trainer_settings(name),
            learning_rate=preset.sft_learning_rate,
            batch_size=preset.sft_batch_size,
            epochs=preset.sft_epochs,
            warmup=10,
            residual_dropout=None,
            min_lr_ratio=0.1,
        )
        SFTTrainer(config, run.model_dir(base), examples, tokenizer=run.tokenizer).train()

    model = f"the {size} model" if kind == "sft" else f"the reward model's {size} backbone"
    run.stages.run("sft", f"supervised fine-tuning of {model}", run.out / name, run.keys[name], finetune)


def rm_sample_counts(run: DemoRun) -> tuple[random.Random, list[int]]:
    """K = rm_min_k..rm_max_k samples for each RM prompt, and the generator that drew them (it draws the
    rankings next)."""
    rng = random.Random(f"demo:{run.seed}:rankings")
    preset = run.preset
    return rng, [rng.randint(preset.rm_min_k, preset.rm_max_k) for _ in run.world.instances("rm")]


def sample_for_rankings(run: DemoRun, size: str) -> None:
    """The `size` SFT model's share of each RM prompt's K samples (`policy_shares`), which the RM stage
    ranks."""
    preset = run.preset
    sizes = rm_sample_sizes(preset)
    index, name = sizes.index(size), f"rm_samples-{size}"

    def sample():
        counts = policy_shares(rm_sample_counts(run)[1], len(sizes))[index]
        samples = sample_policy(
            run.model_dir(f"sft-{size}"),
            run.tokenizer,
            [i.prompt for i in run.world.instances("rm")],
            counts,
            preset.max_new_tokens,
            preset.rm_sample_temperature,
            run.seed + index,
            preset.eval_batch_size,
        )
        path = samples_file(run.out, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(samples))

    what = f"sampling the {size} SFT model for the rankings"
    run.stages.run("rm", what, run.out / name, run.keys[name], sample)


def train_reward_model(run: DemoRun) -> None:
    """Training labelers rank each RM prompt's K samples (`sample_for_rankings`); the RM learns the rankings
    (`reward_model_summary` puts rankings.jsonl, as a user would have them, beside the other datasets)."""
    from rlhf_fast.data import encode_rankings, read_rankings, write_jsonl
    from rlhf_fast.trainers import RewardConfig, RewardTrainer
    from rlhf_fast.world import make_rankings

    preset, world, out = run.preset, run.world, run.out

    def train():
        rng, per_prompt = rm_sample_counts(run)
        shares = [json.loads(samples_file(out, size).read_text()) for size in rm_sample_sizes(preset)]
        samples = merge_shares(shares)
        if [len(texts) for texts in samples] != per_prompt:
            raise RuntimeError(f"the samples in {out}/rm_samples-*/ are not this run's (their counts differ)")
        rankings = make_rankings(world, world.instances("rm"), samples, world.train_labelers, rng)
        (out / "rm").mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "rm" / "rankings.jsonl", rankings)
        encoded = list(
            encode_rankings(
                read_rankings(out / "rm" / "rankings.jsonl").records, run.tokenizer, preset.max_length
            )
        )
        split = max(1, len(encoded) // 10)
        config = RewardConfig(
            **run.trainer_settings("rm"),
            learning_rate=preset.rm_learning_rate,
            batch_size=preset.rm_batch_size,
            epochs=preset.rm_epochs,
            warmup=5,
        )
        trainer = RewardTrainer(
            config,
            run.model_dir(rm_backbone(preset)),
            encoded[split:],
            eval_data=encoded[:split],
            normalization_data=run.demonstrations,
            tokenizer=run.tokenizer,
        )
        metrics = trainer.train()
        summary = RewardModelSummary(len(rankings), split, float(metrics.get("eval/accuracy", float("nan"))))
        (out / "rm" / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1))

    run.stages.run(
        "rm",
        f"ranking K={preset.rm_min_k}..{preset.rm_max_k} SFT samples and training the RM",
        out / "rm",
        run.keys["rm"],
        train,
    )


def reward_model_summary(run: DemoRun) -> RewardModelSummary:
    """The trained RM's summary, told on the console; its rankings copied beside the other datasets."""
    out = run.out
    summary = RewardModelSummary(**json.loads((out / "rm" / "summary.json").read_text()))
    shutil.copyfile(out / "rm" / "rankings.jsonl", out / "data" / "rankings.jsonl")
    run.console(
        f"  {summary.rankings} rankings; RM validation accuracy (training labelers) "
        f"{summary.validation_accuracy:.3f}"
    )
    return summary


def train_ppo_model(run: DemoRun, kind: str, size: str) -> None:
    """PPO ("ppo") or PPO-ptx ("ppo_ptx") from the `size` SFT model against the reward model, or PPO against
    the training labelers' own utility (`ORACLE_PPO_KIND`: a perfect reward model, on another scale)."""
    from rlhf_fast.eval.report import ORACLE_PPO_KIND
    from rlhf_fast.models import RewardModel, ValueModel
    from rlhf_fast.trainers import PPOConfig, PPOTrainer
    from rlhf_fast.world import LabelerReward

    preset, name = run.preset, f"{kind}-{size}"

    def reinforce():
        config = PPOConfig(
            **run.trainer_settings(name),
            learning_rate=preset.ppo_learning_rate,
            output_norm_learning_rate=preset.ppo_output_norm_learning_rate,
            batch_size=preset.ppo_batch_size,
            num_minibatches=preset.ppo_minibatches,
            ppo_epochs=preset.ppo_epochs,
            max_iterations=preset.ppo_iterations,
            warmup=2,
            max_new_tokens=preset.max_new_tokens,
            kl_coef=preset.kl_coef,
            ptx_coef=preset.ptx_coef,
        )
        reward_model = RewardModel.from_pretrained(run.rm_dir)
        value_model = None
        if kind == ORACLE_PPO_KIND:
            # The PPO prompts (prompts_train.jsonl) are the world's "ppo" split. The value function starts
            # from the RM, as PPO's does: only the reward differs.
            value_model = ValueModel.from_reward_model(reward_model)
            prompts = [instance.prompt for instance in run.world.instances("ppo")]
            reward_model = LabelerReward(run.world, run.tokenizer, prompts)
        PPOTrainer(
            config,
            run.model_dir(f"sft-{size}"),
            reward_model,
            run.ppo_prompts,
            value_model=value_model,
            pretrain_data=run.pretrain.blocks if kind == "ppo_ptx" else None,
            tokenizer=run.tokenizer,
        ).train()

    if kind == ORACLE_PPO_KIND:
        what = f"PPO from the {size} SFT model against the labelers' own utility (no RM)"
    else:
        what = f"{'PPO-ptx' if kind == 'ppo_ptx' else 'PPO'} from the {size} SFT model"
    run.stages.run("ppo", what, run.out / name, run.keys[name], reinforce)


def ppo_histories(run: DemoRun) -> dict[str, list[PPOStep]]:
    """Each PPO and PPO-ptx run's history against the RM (PPO against the labelers' utility is on another
    scale: left out of the reward-model runs' plot)."""
    names = [f"{kind}-{size}" for size in run.sizes for kind in ("ppo", "ppo_ptx")]
    return {name: _ppo_history(run.out / name / "metrics.jsonl") for name in names}


def _ppo_history(metrics_path: Path) -> list[PPOStep]:
    history = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "objective/scores" in record:
            history.append(
                PPOStep(
                    record["step"],
                    record["objective/scores"],
                    record["objective/kl"],
                    record.get("policy/entropy"),
                    record.get("episode/length"),
                )
            )
    return history


# ---- report ------------------------------------------------------------------------------------------------
def _rm_start(preset: DemoPreset) -> str:
    size = rm_size(preset)
    if not preset.rm_pretrain_steps:
        return f"the {size} SFT model"
    return (
        f"an SFT model of its own: the {size} base model pretrained {preset.rm_pretrain_steps} steps more, "
        "then fine-tuned as the policies"
    )


def _notes(
    preset: DemoPreset, reused: list[str], stage_threads: dict[str, int], fixed_threads: bool = False
) -> list[str]:
    temperature = (
        f"sampled at temperature {preset.eval_temperature:g}" if preset.eval_temperature > 0 else "greedy"
    )
    notes = [
        (
            f"Responses judged by labelers (win rate, hallucination) and the truthfulness / insult probes are "
            f"{temperature}, as the paper's labelers saw sampled outputs; the QA benchmark is decoded greedily "
            "(exact match on a public-benchmark format)."
        ),
        (
            f"The RM starts from {_rm_start(preset)} and learns from rankings of samples of the "
            f"{', '.join(rm_sample_sizes(preset))} SFT model(s); its agreement is measured on pairs of samples of "
            "the same models for held-out prompts, judged by held-out labelers."
        ),
        (
            "Win rates (Figure 1) are against the largest SFT model; 'win rate vs SFT (same size)' against the SFT "
            "model each model was trained from. All labeler judgments come from labelers held out of every "
            "training set, on prompts of customers held out of every training set."
        ),
    ]
    if reused:
        notes.append(f"Reused from an earlier run into the same directory: {', '.join(reused)}.")
    if stage_threads:
        by_count: dict[int, list[str]] = {}
        for stage, count in stage_threads.items():
            by_count.setdefault(count, []).append(stage)
        counts = "; ".join(
            f"{count} thread{'s' if count > 1 else ''}: {', '.join(stages)}"
            for count, stages in sorted(by_count.items())
        )
        chosen = (
            "set by --threads"
            if fixed_threads
            else "each stage's share of the cores free at the start (a stage that runs alone: all of them)"
        )
        notes.append(
            f"CPU threads per stage ({counts}), {chosen} for the stages this run ran. The numbers depend on "
            "them through rounding: the same seed and thread counts reproduce this report bit for bit on the "
            "same machine (`rlhf-fast demo --threads N` sets one count for every stage)."
        )
    return notes


def _write_samples(samples: dict[str, list], path: Path, per_task: int = 3) -> None:
    """A few held-out prompts per task with every model's response, for reading the models' behaviour."""
    names = list(samples)
    if not names:
        return
    chosen: dict[str, list[int]] = {}
    for index, (instance, _) in enumerate(samples[names[0]]):
        picked = chosen.setdefault(instance.task, [])
        if len(picked) < per_task:
            picked.append(index)
    lines = ["# Samples on held-out prompts", ""]
    for task, indices in chosen.items():
        lines += [f"## {task}", ""]
        for index in indices:
            lines.append(f"- `{samples[names[0]][index][0].prompt}`")
            lines += [f"  - {name}: `{samples[name][index][1]}`" for name in names]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def run_demo(
    preset: str | DemoPreset = "quick",
    out_dir: str | Path = "runs/demo",
    seed: int = 0,
    *,
    console: Callable[[str], None] = print,
    fresh: bool = False,
    threads: int | None = None,
    jobs: int | None = None,
) -> Results:
    """Runs the whole pipeline; returns the results written to `out_dir/report/` (report.md, report.json).

    Stages that finished in an earlier run into `out_dir` with the same settings are reused (`fresh=True`
    reruns them all). The terminal gets one line per stage, the trainers' progress bars (with several stages
    at once: in `out_dir/logs/`), then the evaluation table and each target of the paper's findings marked MET
    or MISS with its standard error.

    `jobs`: training stages run at once, each in a process of its own (`rlhf_fast.pipeline.parallel`);
    default: the cores free when the run starts. `threads`: the CPU intra-op threads of every stage (and,
    without `jobs`, one stage per `threads` free cores); default: each stage's share of the free cores
    (`rlhf_fast.pipeline.parallel.plan_threads`). The results depend on the thread counts through rounding,
    not on `jobs`: the same seed and counts reproduce a run on the same machine. Stages side by side run in
    spawned processes, which import the calling script again: call `run_demo` from a script under
    `if __name__ == "__main__":`.
    """
    from transformers.utils import logging as transformers_logging

    from rlhf_fast.eval import format_summary_table, write_report
    from rlhf_fast.pipeline.threads import free_cores

    transformers_logging.disable_progress_bar()  # one line per stage; the trainers draw their own bars
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if not isinstance(preset, DemoPreset):
        raise ValueError(  # noqa: TRY004 (project rule: bad input is a ValueError)
            f"preset must be a preset name or a DemoPreset, got {type(preset).__name__}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004 (project rule)
    for option, value in (("threads", threads), ("jobs", jobs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{option} must be a positive int or None, got {value!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started, children_started = time.perf_counter(), time.process_time(), _children_cpu()

    training = demo_jobs(preset)
    cores = free_cores()
    workers = jobs or (max(1, cores // threads) if threads else cores)
    workers = min(workers, max(concurrency(training).values()))
    if threads:
        stages = Stages(console, fresh, default_threads=threads, threads={})
    else:
        stages = Stages(console, fresh, default_threads=cores, threads=plan_threads(training, cores, workers))

    run = make_world(preset, seed, out, stages)
    reused = {job.name for job in training if stages.finished(run.out / job.name, run.keys[job.name])}
    for job in training:
        if job.name in reused:
            stages.add_record(run_stage(run, job.name))  # one line on the console
    to_run = remaining(training, reused)
    lanes = workers if len(to_run) > 1 else 1  # a single stage left runs in this process
    if lanes > 1:
        console(
            f"  {workers} training stages at a time, each in a process of its own (progress bars in "
            f"{out / 'logs'}/)"
        )
    run_jobs(
        to_run,
        run_stage,
        run,
        lanes,
        open_context=open_worker_run,
        open_args=(preset, seed, out, run.paths, fresh, stages.default_threads, stages.threads),
        log_dir=out / "logs",
        console=console,
        on_done=lambda name, record: stages.add_record(record),
    )
    run.model_dirs = {name: run.model_dir(name) for name in trained_models(preset)}
    rm_summary = reward_model_summary(run)
    histories = ppo_histories(run)
    evaluation = stages.timed(
        "eval", "evaluating every model with held-out labelers", lambda: evaluate(run, fresh)
    )

    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started + _children_cpu() - children_started
    results = Results(
        title=f"InstructGPT in miniature (preset {preset.name}, seed {seed})",
        models=evaluation.models,
        win_rate_baseline=f"SFT ({run.sizes[-1]})",
        reward_models=[
            RewardModelResult(
                name=f"rm-{rm_size(preset)}",
                size=rm_size(preset),
                params=parameter_count(run.rm_dir),
                metrics={
                    **evaluation.reward_model_agreement,
                    "rm_accuracy": Estimate(rm_summary.validation_accuracy),
                },
            )
        ],
        labeler_agreement=evaluation.labeler_agreement,
        ppo_history=histories,
        timings={
            **{k: round(v, 1) for k, v in stages.seconds.items()},
            "total": round(wall, 1),
            "total_cpu": round(cpu, 1),
        },
        config={"preset": preset.name, "seed": seed, **dataclasses.asdict(preset)},
        notes=_notes(preset, stages.reused, stages.stage_threads, fixed_threads=threads is not None),
    )
    results.targets = check_targets(results, run.sizes)
    write_report(results, out / "report")
    _write_samples(evaluation.samples, out / "report" / "samples.md")
    console(format_summary_table(results))
    for target in results.targets:
        console(f"  {target.line()}")
    console(
        f"report: {out / 'report' / 'report.md'} ({wall:.0f} s wall, {cpu:.0f} s of CPU time, "
        f"{sum(t.met for t in results.targets)} of {len(results.targets)} targets met)"
    )
    return results


def _children_cpu() -> float:
    """CPU seconds of this process's finished child processes (the stages' workers)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
