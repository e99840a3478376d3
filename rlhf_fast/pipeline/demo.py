"""`rlhf-fast demo`: the InstructGPT paper in miniature, end to end, through the same trainers, data layer,
checkpoints and models a user runs on a real model.

    world → pretrain base models → SFT → RM on K-wise rankings → PPO and PPO-ptx → evaluation → report

Every stage reads the JSONL files the world wrote (the user-facing formats), trains through `SFTTrainer`,
`RewardTrainer` and `PPOTrainer`, and writes a Hugging Face directory under `out_dir`. Evaluation is by
held-out labelers on held-out customers' prompts (rlhf_fast.eval), and the report lands in
`out_dir/report/`.

Rerunning into the same `out_dir` reuses every stage that finished before with the same settings (each stage
directory holds a `stage.json` with the settings it ran with and the settings of the stages it used); a stage
whose settings changed, or that did not finish, runs again from scratch, and so does everything after it.
`fresh=True` reruns everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf_fast.pipeline.presets import DemoPreset, get_preset

# Part of every stage's settings: bump it when a stage's code changes what the stage produces.
PIPELINE_VERSION = 2
STAGE_FILE = "stage.json"
KINDS = ("base", "sft", "ppo", "ppo_ptx")


class _Stages:
    """Runs stages, each announced by one line and finished by another (the trainers draw their progress bars
    in between), and skips a stage whose directory holds a finished run with the same settings."""

    def __init__(self, console: Callable[[str], None], fresh: bool):
        self.console = console
        self.fresh = fresh
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    @staticmethod
    def finished_key(directory: Path) -> Any:
        try:
            return json.loads((directory / STAGE_FILE).read_text())["key"]
        except (OSError, ValueError, KeyError):
            return None

    def run(self, name: str, what: str, directory: Path, key: Any, body: Callable[[], None]) -> None:
        """Runs `body` (which writes into `directory`) unless `directory` already holds its result for `key`."""
        key = json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from stage.json
        if not self.fresh and self.finished_key(directory) == key:
            self.console(f"[{name}] {what}: reused from {directory}")
            self.reused.append(directory.name)
            return
        self.console(f"[{name}] {what}")
        started = time.perf_counter()
        shutil.rmtree(directory, ignore_errors=True)  # a stale or half-written run must not be resumed
        body()
        seconds = time.perf_counter() - started
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STAGE_FILE).write_text(json.dumps({"key": key, "seconds": round(seconds, 2)}, indent=1))
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.console(f"[{name}] done in {seconds:.1f} s")

    def timed(self, name: str, what: str, body: Callable[[], Any]) -> Any:
        """Runs an uncached stage."""
        self.console(f"[{name}] {what}")
        started = time.perf_counter()
        result = body()
        seconds = time.perf_counter() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.console(f"[{name}] done in {seconds:.1f} s")
        return result


def _fields(preset: DemoPreset, *names: str) -> dict[str, Any]:
    return {name: getattr(preset, name) for name in names}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _world_code_digest() -> str:
    """The world's source: its scorers and labelers decide the rankings and every evaluation."""
    import rlhf_fast.world

    package = Path(rlhf_fast.world.__file__).parent
    return _digest(b"".join(path.read_bytes() for path in sorted(package.glob("*.py"))))


def _stage_keys(preset: DemoPreset, seed: int, paths: dict[str, Path], vocabulary: list[str]) -> dict[str, Any]:
    """What each stage's output depends on: its settings, the digests of the data files it reads, and the keys
    of the stages whose models it uses. Pretraining and SFT depend on their data files only, so a change of
    world settings that leaves the corpus and the demonstrations alone keeps them."""
    sizes = preset.model_sizes
    files = {name: _digest(Path(path).read_bytes()) for name, path in paths.items()}
    world = {"version": PIPELINE_VERSION, "seed": seed, "world": preset.world, "corpus": preset.corpus,
             "code": _world_code_digest()}
    keys: dict[str, Any] = {"world": world}
    for size in sizes:
        keys[f"base-{size}"] = {
            "version": PIPELINE_VERSION, "seed": seed, "corpus": files["pretrain"],
            "vocabulary": _digest(" ".join(vocabulary).encode()), "size": size, "device": preset.device,
            **_fields(preset, "max_positions", "pretrain_block_size", "pretrain_batch_size"),
            "steps": preset.per_size("pretrain_steps", size),
            "learning_rate": preset.per_size("pretrain_learning_rate", size)}
        keys[f"sft-{size}"] = {"base": keys[f"base-{size}"], "demonstrations": files["demonstrations"],
                               **_fields(preset, "sft_epochs", "sft_batch_size", "sft_learning_rate", "max_length")}
    keys["rm"] = {
        "policy": keys[f"sft-{_rm_size(preset)}"],
        "samples_from": [keys[f"sft-{size}"] for size in _rm_sample_sizes(preset)],
        "prompts": files["prompts_rm"], "world": world,
        **_fields(preset, "rm_min_k", "rm_max_k", "rm_epochs", "rm_batch_size", "rm_learning_rate",
                  "rm_sample_temperature", "max_new_tokens", "eval_batch_size")}
    for size in sizes:
        for kind in ("ppo", "ppo_ptx"):
            keys[f"{kind}-{size}"] = {
                "policy": keys[f"sft-{size}"], "rm": keys["rm"], "prompts": files["prompts_train"],
                **_fields(preset, "ppo_iterations", "ppo_batch_size", "ppo_minibatches", "ppo_epochs",
                          "ppo_learning_rate", "kl_coef", "max_new_tokens", "max_positions")}
            if kind == "ppo_ptx":
                keys[f"{kind}-{size}"].update({"pretrain": files["pretrain"],
                                               **_fields(preset, "ptx_coef", "pretrain_block_size")})
    return keys


def _rm_size(preset: DemoPreset) -> str:
    return preset.rm_size or preset.model_sizes[-1]


def _rm_sample_sizes(preset: DemoPreset) -> tuple[str, ...]:
    return tuple(preset.rm_sample_sizes or preset.model_sizes)


def _use_fused_gelu(model) -> None:
    """GPT-2's "gelu_new" is the tanh-approximated GELU written as six elementwise ops; "gelu_pytorch_tanh" is
    the same function in one kernel (about a fifth of a CPU training step here). The saved config names it, so
    every later stage loads the fused one too."""
    from transformers.activations import ACT2FN

    if model.config.activation_function != "gelu_new":
        return
    model.config.activation_function = "gelu_pytorch_tanh"
    for block in model.transformer.h:
        block.mlp.act = ACT2FN["gelu_pytorch_tanh"]


def _parameter_count(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):  # a reward model keeps its head in a file of its own
        with safe_open(str(path), framework="pt") as handle:
            total += sum(torch.Size(handle.get_slice(name).get_shape()).numel() for name in handle.keys())  # noqa: SIM118 (safe_open is not a dict)
    return total


def _sample_from_policies(policy_dirs: list[Path], tokenizer, prompts: list[str], per_prompt: list[int],
                          max_new_tokens: int, temperature: float, seed: int, batch_size: int) -> list[list[str]]:
    """`per_prompt[i]` samples for prompt i, shared round-robin between the policies in `policy_dirs` (the first
    policy takes the remainder), as InstructGPT's comparisons came from several models."""
    from rlhf_fast.eval.generate import generate_responses
    from rlhf_fast.models import PolicyModel

    samples: list[list[str]] = [[] for _ in prompts]
    for index, directory in enumerate(policy_dirs):
        counts = [count // len(policy_dirs) + (1 if index < count % len(policy_dirs) else 0) for count in per_prompt]
        flat = [prompt for prompt, count in zip(prompts, counts) for _ in range(count)]
        if not flat:
            continue
        policy = PolicyModel.from_pretrained(directory).eval()
        responses = generate_responses(policy, tokenizer, flat, max_new_tokens, temperature=temperature,
                                       batch_size=batch_size, seed=seed + index)
        start = 0
        for bucket, count in zip(samples, counts):
            bucket.extend(responses[start:start + count])
            start += count
    return samples


def run_demo(preset: str | DemoPreset = "quick", out_dir: str | Path = "runs/demo", seed: int = 0, *,
             console: Callable[[str], None] = print, fresh: bool = False) -> dict[str, Any]:
    """Runs the whole pipeline; returns the results dict written to `out_dir/report/report.json`.

    Stages that finished in an earlier run into `out_dir` with the same settings are reused (`fresh=True`
    reruns them all). The terminal gets one line per stage, the trainers' progress bars, then the evaluation
    table and each target of the paper's findings marked MET or MISS.
    """
    from transformers.utils import logging as transformers_logging

    from rlhf_fast.data import (
        SFTExample,
        encode_demonstrations,
        encode_pretrain,
        encode_prompts,
        encode_rankings,
        read_demonstrations,
        read_pretrain_text,
        read_prompts,
        read_rankings,
        write_jsonl,
    )
    from rlhf_fast.eval import format_summary_table, write_report
    from rlhf_fast.models import RewardModel
    from rlhf_fast.models.tiny import build_word_tokenizer, tiny_causal_lm
    from rlhf_fast.trainers import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
    from rlhf_fast.world import CorpusOptions, build_world, make_rankings, write_datasets

    transformers_logging.disable_progress_bar()  # one line per stage; the trainers draw their own bars
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if not isinstance(preset, DemoPreset):
        raise ValueError(  # noqa: TRY004 (project rule: bad input is a ValueError)
            f"preset must be a preset name or a DemoPreset, got {type(preset).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004 (project rule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = _Stages(console, fresh)
    started, cpu_started = time.perf_counter(), time.process_time()
    sizes = preset.model_sizes

    # ---- the world and its datasets, written as the user-facing JSONL formats
    def make_world():
        world = build_world(seed, preset.world, CorpusOptions(**preset.corpus))
        paths = write_datasets(world, out / "data")
        tokenizer = build_word_tokenizer(world.vocabulary())
        tokenizer.save_pretrained(out / "tokenizer")
        return world, paths, tokenizer

    world, paths, tokenizer = stage.timed("world", f"generating the world (seed {seed}, preset {preset.name})",
                                          make_world)
    pretrain = encode_pretrain(read_pretrain_text(paths["pretrain"]).records, tokenizer, preset.pretrain_block_size)
    demonstrations = encode_demonstrations(read_demonstrations(paths["demonstrations"]).records, tokenizer,
                                           preset.max_length)
    ppo_prompts = encode_prompts(read_prompts(paths["prompts_train"]).records, tokenizer,
                                 preset.max_positions - preset.max_new_tokens)
    keys = _stage_keys(preset, seed, paths, world.vocabulary())
    console(f"  vocabulary {len(tokenizer)} words; {len(pretrain)} pretraining blocks of {preset.pretrain_block_size} "
            f"tokens; {len(demonstrations)} demonstrations; {len(ppo_prompts)} PPO prompts")

    def common(output_dir: Path) -> dict[str, Any]:
        return {"seed": seed, "output_dir": str(output_dir), "save_every": 0, "device": preset.device, "log_every": 1}

    model_dirs: dict[str, Path] = {}

    # ---- base models: causal-LM pretraining on the corpus (loss on every token after the first)
    pretrain_examples = [SFTExample(block.tolist(), 1) for block in pretrain.blocks]
    for size in sizes:
        name = f"base-{size}"
        steps = preset.per_size("pretrain_steps", size)

        def pretrain_model(size=size, name=name, steps=steps):
            config = SFTConfig(**common(out / name), learning_rate=preset.per_size("pretrain_learning_rate", size),
                               batch_size=preset.pretrain_batch_size, epochs=10_000, max_steps=steps,
                               warmup=max(1, steps // 20), residual_dropout=None, min_lr_ratio=0.1)
            model = tiny_causal_lm(size, vocab_size=len(tokenizer), max_positions=preset.max_positions, seed=seed,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   bos_token_id=tokenizer.bos_token_id)
            _use_fused_gelu(model)
            SFTTrainer(config, model, pretrain_examples, tokenizer=tokenizer).train()

        stage.run("pretrain", f"pretraining the {size} base model ({steps} steps)", out / name, keys[name],
                  pretrain_model)
        model_dirs[name] = out / name / "final"

    # ---- SFT on labelers' demonstrations
    for size in sizes:
        name = f"sft-{size}"

        def finetune(size=size, name=name):
            config = SFTConfig(**common(out / name), learning_rate=preset.sft_learning_rate,
                               batch_size=preset.sft_batch_size, epochs=preset.sft_epochs, warmup=10,
                               residual_dropout=None, min_lr_ratio=0.1)
            SFTTrainer(config, model_dirs[f"base-{size}"], demonstrations, tokenizer=tokenizer).train()

        stage.run("sft", f"supervised fine-tuning of the {size} model", out / name, keys[name], finetune)
        model_dirs[name] = out / name / "final"

    # ---- the reward model: K = 4..9 SFT samples per prompt, ranked by training labelers
    rm_dir = out / "rm" / "final"

    def train_reward_model():
        rng = random.Random(f"demo:{seed}:rankings")
        rm_instances = world.instances("rm")
        per_prompt = [rng.randint(preset.rm_min_k, preset.rm_max_k) for _ in rm_instances]
        samples = _sample_from_policies([model_dirs[f"sft-{s}"] for s in _rm_sample_sizes(preset)], tokenizer,
                                        [i.prompt for i in rm_instances], per_prompt, preset.max_new_tokens,
                                        preset.rm_sample_temperature, seed, preset.eval_batch_size)
        rankings = make_rankings(world, rm_instances, samples, world.train_labelers, rng)
        (out / "rm").mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "rm" / "rankings.jsonl", rankings)
        encoded = list(encode_rankings(read_rankings(out / "rm" / "rankings.jsonl").records, tokenizer,
                                       preset.max_length))
        split = max(1, len(encoded) // 10)
        config = RewardConfig(**common(out / "rm"), learning_rate=preset.rm_learning_rate,
                              batch_size=preset.rm_batch_size, epochs=preset.rm_epochs, warmup=5)
        trainer = RewardTrainer(config, model_dirs[f"sft-{_rm_size(preset)}"], encoded[split:],
                                eval_data=encoded[:split], normalization_data=demonstrations, tokenizer=tokenizer)
        metrics = trainer.train()
        (out / "rm" / "summary.json").write_text(json.dumps({
            "rankings": len(rankings), "validation_rankings": split,
            "validation_accuracy": metrics.get("eval/accuracy", float("nan"))}, indent=1))

    stage.run("rm", f"ranking K={preset.rm_min_k}..{preset.rm_max_k} SFT samples and training the RM", out / "rm",
              keys["rm"], train_reward_model)
    rm_summary = json.loads((out / "rm" / "summary.json").read_text())
    # The data directory holds the rankings beside the other datasets, as a user would have them.
    shutil.copyfile(out / "rm" / "rankings.jsonl", out / "data" / "rankings.jsonl")
    console(f"  {rm_summary['rankings']} rankings; RM validation accuracy (training labelers) "
            f"{rm_summary['validation_accuracy']:.3f}")

    # ---- PPO and PPO-ptx from each SFT model, against the one reward model
    histories: dict[str, list[dict]] = {}
    for size in sizes:
        for kind in ("ppo", "ppo_ptx"):
            name = f"{kind}-{size}"

            def reinforce(size=size, kind=kind, name=name):
                config = PPOConfig(
                    **common(out / name), learning_rate=preset.ppo_learning_rate, batch_size=preset.ppo_batch_size,
                    num_minibatches=preset.ppo_minibatches, ppo_epochs=preset.ppo_epochs,
                    max_iterations=preset.ppo_iterations, warmup=2, max_new_tokens=preset.max_new_tokens,
                    kl_coef=preset.kl_coef, ptx_coef=preset.ptx_coef)
                PPOTrainer(config, model_dirs[f"sft-{size}"], RewardModel.from_pretrained(rm_dir), ppo_prompts,
                           pretrain_data=pretrain.blocks if kind == "ppo_ptx" else None, tokenizer=tokenizer).train()

            label = "PPO-ptx" if kind == "ppo_ptx" else "PPO"
            stage.run("ppo", f"{label} from the {size} SFT model", out / name, keys[name], reinforce)
            model_dirs[name] = out / name / "final"
            histories[name] = _ppo_history(out / name / "metrics.jsonl")

    # ---- evaluation by held-out labelers on held-out customers' prompts
    results = stage.timed("eval", "evaluating every model with held-out labelers",
                          lambda: evaluate_models(world, tokenizer, model_dirs, sizes, rm_dir, preset, seed,
                                                  cache_dir=out / "eval", keys=keys, fresh=fresh))
    total_seconds = time.perf_counter() - started
    results.update({
        "title": f"InstructGPT in miniature (preset {preset.name}, seed {seed})",
        "ppo_history": histories,
        "timings": {**{k: round(v, 1) for k, v in stage.seconds.items()}, "total": round(total_seconds, 1),
                    "total_cpu": round(time.process_time() - cpu_started, 1)},
        "config": {"preset": preset.name, "seed": seed, **dataclasses.asdict(preset)},
        "notes": _notes(preset, stage.reused),
    })
    rm_size = _rm_size(preset)
    results["reward_models"] = {
        f"rm-{rm_size}": {"size": rm_size, "params": _parameter_count(rm_dir),
                          "metrics": {**results.pop("_rm_metrics"),
                                      "rm_accuracy": rm_summary["validation_accuracy"]}}}
    results["targets"] = check_targets(results, sizes)
    samples = results.pop("_samples")
    write_report(results, out / "report")
    _write_samples(samples, out / "report" / "samples.md")
    console(format_summary_table(results))
    for line in results["targets"]:
        console(f"  {'MET ' if line['met'] else 'MISS'} {line['target']}: {line['value']}")
    console(f"report: {out / 'report' / 'report.md'} ({total_seconds:.0f} s in all, "
            f"{results['timings']['total_cpu']:.0f} s of CPU time)")
    return results


def _ppo_history(metrics_path: Path) -> list[dict]:
    history = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "objective/scores" in record:
            history.append({"iteration": record["step"], "reward": record["objective/scores"],
                            "kl": record["objective/kl"], "entropy": record.get("policy/entropy"),
                            "length": record.get("episode/length")})
    return history


def _notes(preset: DemoPreset, reused: list[str]) -> list[str]:
    temperature = (f"sampled at temperature {preset.eval_temperature:g}" if preset.eval_temperature > 0
                   else "greedy")
    notes = [
        (f"Responses judged by labelers (win rate, hallucination) and the truthfulness / insult probes are "
         f"{temperature}, as the paper's labelers saw sampled outputs; the QA benchmark is decoded greedily "
         "(exact match on a public-benchmark format)."),
        (f"The RM starts from the {_rm_size(preset)} SFT model and learns from rankings of samples of the "
         f"{', '.join(_rm_sample_sizes(preset))} SFT model(s); its agreement is measured on pairs of samples of "
         "the same models for held-out prompts, judged by held-out labelers."),
        ("Win rates are against the largest SFT model; all labeler judgments come from labelers held out of every "
         "training set, on prompts of customers held out of every training set."),
    ]
    if reused:
        notes.append(f"Reused from an earlier run into the same directory: {', '.join(reused)}.")
    return notes


def evaluate_models(world, tokenizer, model_dirs: dict[str, Path], sizes: tuple[str, ...], rm_dir: Path,
                    preset: DemoPreset, seed: int, *, cache_dir: Path | None = None,
                    keys: dict[str, Any] | None = None, fresh: bool = False) -> dict[str, Any]:
    """Every model's metrics in the report's format; the baseline of win rates is the largest SFT model.

    Each model is loaded once and answers the held-out prompts and the probes (sampled at
    `preset.eval_temperature`) and the QA benchmark (greedy). With `cache_dir` and `keys` (stage settings per
    model name) the responses are kept in `cache_dir/<model>.json` and reused while the settings match.
    """
    from rlhf_fast.eval import (
        hallucination_rate,
        insult_rate,
        labeler_agreement,
        make_comparisons,
        qa_exact_match,
        rm_agreement,
        task_score,
        task_scores_by_task,
        truthfulness,
        win_rate,
    )
    from rlhf_fast.models import RewardModel

    heldout = world.instances("heldout")[: preset.eval_prompts]
    probes = world.instances("truthful") + world.instances("insult_respectful") + world.instances("insult_plain")
    qa_items = world.qa_benchmark[: preset.eval_prompts]
    labelers = world.heldout_labelers
    eval_settings = _fields(preset, "eval_prompts", "eval_temperature", "max_new_tokens", "eval_batch_size")

    responses: dict[str, dict[str, list[str]]] = {}
    for name, directory in model_dirs.items():
        key = None if keys is None else json.loads(json.dumps(
            {"model": keys[name], "world": keys["world"], "eval": eval_settings, "seed": seed}, sort_keys=True,
            default=str))
        cache = None if cache_dir is None or key is None else cache_dir / f"{name}.json"
        if cache is not None and not fresh and cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                responses[name] = cached["responses"]
                continue
        responses[name] = _respond(directory, tokenizer, heldout, probes, qa_items, preset, seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "responses": responses[name]}))

    baseline_name = f"sft-{sizes[-1]}"
    baseline = responses[baseline_name]["heldout"]
    models: dict[str, Any] = {}
    for name, directory in model_dirs.items():
        kind, size = name.rsplit("-", 1)
        answers = responses[name]
        on_heldout, on_probes = answers["heldout"], answers["probes"]
        metrics = {
            "win_rate": win_rate(on_heldout, baseline, heldout, labelers),
            "task_score": task_score(on_heldout, heldout, world),
            "truthfulness": truthfulness(on_probes, probes, world),
            "truthful_informative": truthfulness(on_probes, probes, world, require_informative=True),
            "hallucination_rate": hallucination_rate(on_heldout, heldout, world),
            "insult_rate_respectful": insult_rate(on_probes, probes, world, with_respectful_instruction=True),
            "insult_rate_plain": insult_rate(on_probes, probes, world, with_respectful_instruction=False),
            "qa_exact_match": qa_exact_match(answers["qa"], qa_items),
        }
        models[name] = {"kind": kind, "size": size, "params": _parameter_count(directory),
                        "metrics": {key: list(value) for key, value in metrics.items()},
                        "task_scores": {task: list(value) for task, value in
                                        sorted(task_scores_by_task(on_heldout, heldout, world).items())}}

    # RM agreement with held-out labelers: pairs of samples from the models the RM's training samples came
    # from, on held-out prompts.
    rng = random.Random(f"demo:{seed}:comparisons")
    comparison_prompts = world.instances("heldout")[: preset.rm_comparison_prompts]
    sample_dirs = [model_dirs[f"sft-{size}"] for size in _rm_sample_sizes(preset)]
    pairs = _sample_from_policies(sample_dirs, tokenizer, [i.prompt for i in comparison_prompts],
                                  [3] * len(comparison_prompts), preset.max_new_tokens, preset.rm_sample_temperature,
                                  seed + 99, preset.eval_batch_size)
    comparisons = make_comparisons(comparison_prompts, pairs, rng)
    reward_model = RewardModel.from_pretrained(rm_dir).eval()

    @torch.no_grad()
    def reward_fn(prompts: list[str], texts: list[str]) -> list[float]:
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] + tokenizer(t, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id] for p, t in zip(prompts, texts)]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = True
        return reward_model(input_ids, mask).tolist()

    return {
        "models": models,
        "win_rate_baseline": f"SFT ({sizes[-1]})",
        "labeler_agreement": list(labeler_agreement(comparisons, labelers, world.train_labelers)),
        "_rm_metrics": {
            "rm_agreement_heldout": list(rm_agreement(reward_fn, comparisons, labelers)),
            "rm_agreement_train": list(rm_agreement(reward_fn, comparisons, world.train_labelers)),
        },
        "_samples": {name: list(zip(heldout, answers["heldout"])) for name, answers in responses.items()},
    }


def _respond(directory: Path, tokenizer, heldout, probes, qa_items, preset: DemoPreset,
             seed: int) -> dict[str, list[str]]:
    """One model's responses to the held-out prompts and the probes (sampled, or greedy at temperature 0)
    and to the QA benchmark (greedy)."""
    from rlhf_fast.eval.generate import generate_responses
    from rlhf_fast.models import PolicyModel

    policy = PolicyModel.from_pretrained(directory).eval()
    decoding = {"temperature": preset.eval_temperature} if preset.eval_temperature > 0 else {"greedy": True}

    def generate(prompts: list[str], **options) -> list[str]:
        return generate_responses(policy, tokenizer, prompts, preset.max_new_tokens,
                                  batch_size=preset.eval_batch_size, seed=seed, **options)

    return {"heldout": generate([i.prompt for i in heldout], **decoding),
            "probes": generate([i.prompt for i in probes], **decoding),
            "qa": generate([item["prompt"] for item in qa_items], greedy=True)}


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


def check_targets(results: dict[str, Any], sizes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The paper's qualitative findings as checks, reported met or not (never hidden)."""
    models = results["models"]

    def metric(name: str, key: str) -> float:
        return float(models[name]["metrics"][key][0])

    small, large = sizes[0], sizes[-1]
    targets = []

    def add(target: str, value: float | str, met: bool) -> None:
        targets.append({"target": target, "value": value if isinstance(value, str) else round(value, 4),
                        "met": bool(met)})

    ppo_win = metric(f"ppo-{large}", "win_rate")
    add(f"PPO ({large}) wins against SFT ({large}) at least 60% of the time", ppo_win, ppo_win >= 0.6)
    small_ppo, large_base = metric(f"ppo-{small}", "win_rate"), metric(f"base-{large}", "win_rate")
    add(f"the smallest PPO model ({small}) beats the largest base model ({large})",
        f"{small_ppo:.3f} vs {large_base:.3f}", small_ppo > large_base)
    agreement = next(iter(results["reward_models"].values()))["metrics"]["rm_agreement_heldout"][0]
    add("the RM agrees with held-out labelers at least 70% of the time", agreement, agreement >= 0.7)
    for key, label in (("hallucination_rate", "hallucinates"), ("insult_rate_respectful", "insults (respectful)")):
        ppo_value, sft_value = metric(f"ppo-{large}", key), metric(f"sft-{large}", key)
        add(f"PPO {label} less than SFT ({large})", f"{ppo_value:.3f} vs {sft_value:.3f}", ppo_value < sft_value)
    sft_qa, ppo_qa, ptx_qa = (metric(f"{k}-{large}", "qa_exact_match") for k in ("sft", "ppo", "ppo_ptx"))
    regression = sft_qa - ppo_qa
    recovered = (ptx_qa - ppo_qa) / regression if regression > 0 else float("nan")
    add("PPO-ptx recovers at least half of PPO's QA regression",
        f"SFT {sft_qa:.3f}, PPO {ppo_qa:.3f}, PPO-ptx {ptx_qa:.3f}"
        + (f" (recovered {recovered:.0%})" if regression > 0 else " (no regression to recover)"),
        regression > 0 and recovered >= 0.5)
    return targets
