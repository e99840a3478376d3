"""`rlhf-fast demo`: the InstructGPT paper in miniature, end to end, through the same trainers, data layer,
checkpoints and models a user runs on a real model.

    make_world → pretrain_base_models → finetune_sft_models → train_reward_model → train_ppo_models
               → evaluate → check_targets → report

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
from rlhf_fast.pipeline.evaluation import evaluate, parameter_count, sample_from_policies
from rlhf_fast.pipeline.presets import DemoPreset, get_preset
from rlhf_fast.pipeline.stages import Stages, oracle_ppo_name, rm_sample_sizes, rm_size, stage_keys
from rlhf_fast.pipeline.targets import check_targets

KINDS = ("base", "sft", "ppo", "ppo_ptx")


@dataclass
class DemoRun:
    """What the stages share: the settings, the world, its datasets (as files and encoded), the stage keys,
    and the models made so far (`model_dirs`, by name: base-tiny, sft-small, ppo_ptx-small, ...)."""

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
    from rlhf_fast.data import (
        encode_demonstrations,
        encode_pretrain,
        encode_prompts,
        read_demonstrations,
        read_pretrain_text,
        read_prompts,
    )
    from rlhf_fast.models.tiny import build_word_tokenizer
    from rlhf_fast.world import CorpusOptions, build_world, write_datasets

    def generate():
        world = build_world(seed, preset.world, CorpusOptions(**preset.corpus))
        paths = write_datasets(world, out / "data")
        tokenizer = build_word_tokenizer(world.vocabulary())
        tokenizer.save_pretrained(out / "tokenizer")
        return world, paths, tokenizer

    world, paths, tokenizer = stages.timed(
        "world", f"generating the world (seed {seed}, preset {preset.name})", generate
    )
    run = DemoRun(
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
    stages.console(
        f"  vocabulary {len(tokenizer)} words; {len(run.pretrain)} pretraining blocks of "
        f"{preset.pretrain_block_size} tokens; {len(run.demonstrations)} demonstrations; "
        f"{len(run.ppo_prompts)} PPO prompts"
    )
    return run


def pretrain_base_models(run: DemoRun) -> None:
    """Causal-LM pretraining on the corpus (loss on every token after the first), one model per size."""
    from rlhf_fast.models.tiny import tiny_causal_lm
    from rlhf_fast.trainers import SFTConfig, SFTTrainer

    preset, tokenizer = run.preset, run.tokenizer
    for size in run.sizes:
        name = f"base-{size}"
        steps = preset.per_size("pretrain_steps", size)

        def pretrain(size=size, name=name, steps=steps):
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

        run.stages.run(
            "pretrain",
            f"pretraining the {size} base model ({steps} steps)",
            run.out / name,
            run.keys[name],
            pretrain,
        )
        run.model_dirs[name] = run.out / name / "final"


def finetune_sft_models(run: DemoRun) -> None:
    """SFT of each base model on the labelers' demonstrations, and `sft_pretrain_mix` pretraining blocks per
    demonstration mixed in (one draw for every size; a block's loss is on every token after its first)."""
    from rlhf_fast.trainers import SFTConfig, SFTTrainer

    preset = run.preset
    examples = list(run.demonstrations.examples)
    mixed = round(preset.sft_pretrain_mix * len(examples))
    if mixed:
        rng = random.Random(f"demo:{run.seed}:sft-pretrain-mix")
        blocks = rng.sample(range(len(run.pretrain)), min(mixed, len(run.pretrain)))
        examples += [run.pretrain_examples[i] for i in blocks]
    for size in run.sizes:
        name = f"sft-{size}"

        def finetune(size=size, name=name):
            config = SFTConfig(
                **run.trainer_settings(name),
                learning_rate=preset.sft_learning_rate,
                batch_size=preset.sft_batch_size,
                epochs=preset.sft_epochs,
                warmup=10,
                residual_dropout=None,
                min_lr_ratio=0.1,
            )
            SFTTrainer(
                config, run.model_dirs[f"base-{size}"], examples, tokenizer=run.tokenizer
            ).train()

        run.stages.run(
            "sft", f"supervised fine-tuning of the {size} model", run.out / name, run.keys[name], finetune
        )
        run.model_dirs[name] = run.out / name / "final"


def train_reward_model(run: DemoRun) -> RewardModelSummary:
    """K = rm_min_k..rm_max_k SFT samples per prompt, ranked by training labelers; the RM learns the rankings
    (rankings.jsonl, as a user would have them, lands beside the other datasets)."""
    from rlhf_fast.data import encode_rankings, read_rankings, write_jsonl
    from rlhf_fast.trainers import RewardConfig, RewardTrainer
    from rlhf_fast.world import make_rankings

    preset, world, out = run.preset, run.world, run.out

    def train():
        rng = random.Random(f"demo:{run.seed}:rankings")
        instances = world.instances("rm")
        per_prompt = [rng.randint(preset.rm_min_k, preset.rm_max_k) for _ in instances]
        samples = sample_from_policies(
            [run.model_dirs[f"sft-{s}"] for s in rm_sample_sizes(preset)],
            run.tokenizer,
            [i.prompt for i in instances],
            per_prompt,
            preset.max_new_tokens,
            preset.rm_sample_temperature,
            run.seed,
            preset.eval_batch_size,
        )
        rankings = make_rankings(world, instances, samples, world.train_labelers, rng)
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
            run.model_dirs[f"sft-{rm_size(preset)}"],
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
    summary = RewardModelSummary(**json.loads((out / "rm" / "summary.json").read_text()))
    shutil.copyfile(out / "rm" / "rankings.jsonl", out / "data" / "rankings.jsonl")
    run.console(
        f"  {summary.rankings} rankings; RM validation accuracy (training labelers) "
        f"{summary.validation_accuracy:.3f}"
    )
    return summary


def train_ppo_models(run: DemoRun) -> dict[str, list[PPOStep]]:
    """PPO and PPO-ptx from each SFT model against the one reward model; returns each run's history. With
    `oracle_ppo`, also PPO from the largest SFT model against the training labelers' own utility (a perfect
    reward model, on another scale: its history is left out of the reward-model runs' plot)."""
    from rlhf_fast.models import RewardModel, ValueModel
    from rlhf_fast.trainers import PPOConfig, PPOTrainer
    from rlhf_fast.world import LabelerReward

    preset = run.preset

    def reinforce(name: str, size: str, reward_model, value_model=None, pretrain_data=None) -> None:
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
        PPOTrainer(
            config,
            run.model_dirs[f"sft-{size}"],
            reward_model,
            run.ppo_prompts,
            value_model=value_model,
            pretrain_data=pretrain_data,
            tokenizer=run.tokenizer,
        ).train()

    def train(name: str, description: str, make) -> None:
        run.stages.run("ppo", description, run.out / name, run.keys[name], make)
        run.model_dirs[name] = run.out / name / "final"

    histories: dict[str, list[PPOStep]] = {}
    for size in run.sizes:
        for kind in ("ppo", "ppo_ptx"):
            name = f"{kind}-{size}"
            pretrain = run.pretrain.blocks if kind == "ppo_ptx" else None
            label = "PPO-ptx" if kind == "ppo_ptx" else "PPO"
            train(
                name,
                f"{label} from the {size} SFT model",
                lambda name=name, size=size, pretrain=pretrain: reinforce(
                    name, size, RewardModel.from_pretrained(run.rm_dir), pretrain_data=pretrain
                ),
            )
            histories[name] = _ppo_history(run.out / name / "metrics.jsonl")
    if preset.oracle_ppo:
        name, size = oracle_ppo_name(preset), run.sizes[-1]

        def against_labelers() -> None:
            # The PPO prompts (prompts_train.jsonl) are the world's "ppo" split.
            prompts = [instance.prompt for instance in run.world.instances("ppo")]
            reward = LabelerReward(run.world, run.tokenizer, prompts)
            # The value function starts from the RM, as PPO's does: only the reward differs.
            value = ValueModel.from_reward_model(RewardModel.from_pretrained(run.rm_dir))
            reinforce(name, size, reward, value_model=value)

        train(
            name, f"PPO from the {size} SFT model against the labelers' own utility (no RM)", against_labelers
        )
    return histories


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
            f"The RM starts from the {rm_size(preset)} SFT model and learns from rankings of samples of the "
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
        chosen = "set by --threads" if fixed_threads else "chosen from the load average"
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
) -> Results:
    """Runs the whole pipeline; returns the results written to `out_dir/report/` (report.md, report.json).

    Stages that finished in an earlier run into `out_dir` with the same settings are reused (`fresh=True`
    reruns them all). The terminal gets one line per stage, the trainers' progress bars, then the evaluation
    table and each target of the paper's findings marked MET or MISS with its standard error.
    `threads`: the CPU intra-op threads of every stage; None picks them per stage from the machine's load
    (`rlhf_fast.pipeline.threads`). The results depend on the counts through rounding, so a fixed count
    makes a seed's run reproducible on the same machine whatever else was running before it.
    """
    from transformers.utils import logging as transformers_logging

    from rlhf_fast.eval import format_summary_table, write_report

    transformers_logging.disable_progress_bar()  # one line per stage; the trainers draw their own bars
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if not isinstance(preset, DemoPreset):
        raise ValueError(  # noqa: TRY004 (project rule: bad input is a ValueError)
            f"preset must be a preset name or a DemoPreset, got {type(preset).__name__}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004 (project rule)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(console, fresh, threads)
    started, cpu_started = time.perf_counter(), time.process_time()

    run = make_world(preset, seed, out, stages)
    pretrain_base_models(run)
    finetune_sft_models(run)
    rm_summary = train_reward_model(run)
    histories = train_ppo_models(run)
    evaluation = stages.timed(
        "eval", "evaluating every model with held-out labelers", lambda: evaluate(run, fresh)
    )

    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
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
