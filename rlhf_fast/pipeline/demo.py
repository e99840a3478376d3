"""`rlhf-fast demo`: the InstructGPT paper in miniature, end to end, through the same trainers, data layer,
checkpoints and models a user runs on a real model.

    world → pretrain base models → SFT → RM on K-wise rankings → PPO and PPO-ptx → evaluation → report

Every stage reads the JSONL files the world wrote (the user-facing formats), trains through `SFTTrainer`,
`RewardTrainer` and `PPOTrainer`, and writes a Hugging Face directory under `out_dir`. Evaluation is by
held-out labelers on held-out customers' prompts (rlhf_fast.eval), and the report lands in
`out_dir/report/`.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf_fast.pipeline.presets import DemoPreset, get_preset


class _Stages:
    """Times each stage and prints one line when it starts and ends."""

    def __init__(self, console: Callable[[str], None]):
        self.console = console
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        self.console(f"[{name}] {what}")
        started = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.console(f"[{name}] done in {time.perf_counter() - started:.1f} s")


def _parameter_count(directory: Path) -> int:
    from rlhf_fast.models import PolicyModel

    return sum(p.numel() for p in PolicyModel.from_pretrained(directory).parameters())


def _sample_many(policy_dir: Path, tokenizer, prompts: list[str], per_prompt: list[int], max_new_tokens: int,
                 temperature: float, seed: int, batch_size: int) -> list[list[str]]:
    """`per_prompt[i]` samples for prompt i from the policy in `policy_dir`."""
    from rlhf_fast.eval.generate import generate_responses
    from rlhf_fast.models import PolicyModel

    policy = PolicyModel.from_pretrained(policy_dir).eval()
    flat = [prompt for prompt, count in zip(prompts, per_prompt) for _ in range(count)]
    responses = generate_responses(policy, tokenizer, flat, max_new_tokens, temperature=temperature,
                                   batch_size=batch_size, seed=seed)
    grouped, start = [], 0
    for count in per_prompt:
        grouped.append(responses[start:start + count])
        start += count
    return grouped


def run_demo(preset: str | DemoPreset = "quick", out_dir: str | Path = "runs/demo", seed: int = 0, *,
             console: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the whole pipeline; returns the results dict written to `out_dir/report/report.json`."""
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
    from rlhf_fast.trainers import (
        PPOConfig,
        PPOTrainer,
        RewardConfig,
        RewardTrainer,
        SFTConfig,
        SFTTrainer,
    )
    from rlhf_fast.world import build_world, make_rankings, write_datasets

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line per stage is enough; the trainers show their own bars
    preset = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = _Stages(console)
    torch.manual_seed(seed)
    started = time.perf_counter()
    sizes = preset.model_sizes
    rm_size = preset.rm_size or sizes[-1]

    # ---- the world and its datasets, written as the user-facing JSONL formats
    with stage("world", f"generating the world (seed {seed}, preset {preset.name})"):
        world = build_world(seed, preset.world)
        paths = write_datasets(world, out / "data")
        tokenizer = build_word_tokenizer(world.vocabulary())
        tokenizer.save_pretrained(out / "tokenizer")
        pretrain = encode_pretrain(read_pretrain_text(paths["pretrain"]).records, tokenizer,
                                   preset.pretrain_block_size)
        demonstrations = encode_demonstrations(read_demonstrations(paths["demonstrations"]).records, tokenizer,
                                               preset.max_length)
        ppo_prompts = encode_prompts(read_prompts(paths["prompts_train"]).records, tokenizer,
                                     preset.max_positions - preset.max_new_tokens)
        console(f"  vocabulary {len(tokenizer)} words; {len(pretrain)} pretraining blocks of "
                f"{preset.pretrain_block_size}; {len(demonstrations)} demonstrations; {len(ppo_prompts)} PPO prompts")

    def common(output_dir: Path) -> dict[str, Any]:
        return dict(seed=seed, output_dir=str(output_dir), save_every=0, device=preset.device, log_every=1)

    # ---- base models: causal-LM pretraining on the corpus (loss on every token after the first)
    pretrain_examples = [SFTExample(block.tolist(), 1) for block in pretrain.blocks]
    model_dirs: dict[str, Path] = {}
    for size in sizes:
        with stage("pretrain", f"pretraining the {size} base model"):
            config = SFTConfig(**common(out / f"base-{size}"), learning_rate=preset.pretrain_learning_rate,
                               batch_size=preset.pretrain_batch_size, epochs=10_000, max_steps=preset.pretrain_steps,
                               warmup=max(1, preset.pretrain_steps // 20), residual_dropout=None,
                               min_lr_ratio=0.1)
            model = tiny_causal_lm(size, vocab_size=len(tokenizer), max_positions=preset.max_positions, seed=seed,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   bos_token_id=tokenizer.bos_token_id)
            SFTTrainer(config, model, pretrain_examples, tokenizer=tokenizer).train()
            model_dirs[f"base-{size}"] = out / f"base-{size}" / "final"

    # ---- SFT on labelers' demonstrations
    for size in sizes:
        with stage("sft", f"supervised fine-tuning of the {size} model"):
            config = SFTConfig(**common(out / f"sft-{size}"), learning_rate=preset.sft_learning_rate,
                               batch_size=preset.sft_batch_size, epochs=preset.sft_epochs, warmup=10,
                               residual_dropout=None, min_lr_ratio=0.1)
            SFTTrainer(config, model_dirs[f"base-{size}"], demonstrations, tokenizer=tokenizer).train()
            model_dirs[f"sft-{size}"] = out / f"sft-{size}" / "final"

    # ---- the reward model: K = 4..9 SFT samples per prompt, ranked by training labelers
    rng = random.Random(f"demo:{seed}:rankings")
    with stage("rm", f"ranking K={preset.rm_min_k}..{preset.rm_max_k} SFT samples and training the RM"):
        rm_instances = world.instances("rm")
        per_prompt = [rng.randint(preset.rm_min_k, preset.rm_max_k) for _ in rm_instances]
        # Samples from every SFT size, as InstructGPT's comparisons came from several models.
        samples: list[list[str]] = [[] for _ in rm_instances]
        for index, size in enumerate(sizes):
            counts = [count // len(sizes) + (1 if index < count % len(sizes) else 0) for count in per_prompt]
            drawn = _sample_many(model_dirs[f"sft-{size}"], tokenizer, [i.prompt for i in rm_instances], counts,
                                 preset.max_new_tokens, preset.rm_sample_temperature, seed + index,
                                 preset.eval_batch_size)
            for bucket, extra in zip(samples, drawn):
                bucket.extend(extra)
        rankings = make_rankings(world, rm_instances, samples, world.train_labelers, rng)
        write_jsonl(out / "data" / "rankings.jsonl", rankings)
        encoded = encode_rankings(read_rankings(out / "data" / "rankings.jsonl").records, tokenizer,
                                  preset.max_length)
        split = max(1, len(encoded) // 10)
        rm_train, rm_val = list(encoded)[split:], list(encoded)[:split]
        config = RewardConfig(**common(out / "rm"), learning_rate=preset.rm_learning_rate,
                              batch_size=preset.rm_batch_size, epochs=preset.rm_epochs, warmup=5)
        rm_trainer = RewardTrainer(config, model_dirs[f"sft-{rm_size}"], rm_train, eval_data=rm_val,
                                   normalization_data=demonstrations, tokenizer=tokenizer)
        rm_metrics = rm_trainer.train()
        rm_dir = out / "rm" / "final"
        console(f"  {len(rankings)} rankings, validation accuracy {rm_metrics.get('eval/accuracy', float('nan')):.3f}")

    # ---- PPO and PPO-ptx from each SFT model, against the one reward model
    histories: dict[str, list[dict]] = {}
    for size in sizes:
        for kind in ("ppo", "ppo_ptx"):
            name = f"{kind}-{size}"
            with stage("ppo", f"{'PPO-ptx' if kind == 'ppo_ptx' else 'PPO'} from the {size} SFT model"):
                config = PPOConfig(
                    **common(out / name), learning_rate=preset.ppo_learning_rate, batch_size=preset.ppo_batch_size,
                    num_minibatches=preset.ppo_minibatches, ppo_epochs=preset.ppo_epochs,
                    max_iterations=preset.ppo_iterations, warmup=2, max_new_tokens=preset.max_new_tokens,
                    kl_coef=preset.kl_coef, ptx_coef=preset.ptx_coef)
                PPOTrainer(config, model_dirs[f"sft-{size}"], RewardModel.from_pretrained(rm_dir), ppo_prompts,
                           pretrain_data=pretrain.blocks if kind == "ppo_ptx" else None, tokenizer=tokenizer).train()
                model_dirs[name] = out / name / "final"
                histories[name] = [
                    {"iteration": record["step"], "reward": record["objective/scores"], "kl": record["objective/kl"]}
                    for record in (json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines())
                ]

    # ---- evaluation by held-out labelers on held-out customers' prompts
    with stage("eval", "evaluating every model with held-out labelers"):
        results = evaluate_models(world, tokenizer, model_dirs, sizes, rm_dir, preset, seed)
    results.update({
        "title": f"InstructGPT in miniature (preset {preset.name}, seed {seed})",
        "ppo_history": histories,
        "timings": {**stage.seconds, "total": time.perf_counter() - started},
        "config": {"preset": preset.name, **{k: v for k, v in vars(preset).items() if k != "world"},
                   "world": preset.world},
    })
    results["reward_models"] = {
        f"rm-{rm_size}": {"size": rm_size, "params": _parameter_count(model_dirs[f"sft-{rm_size}"]),
                          "metrics": {**results.pop("_rm_metrics"),
                                      "rm_accuracy": rm_metrics.get("eval/accuracy", float("nan"))}}}
    results["targets"] = check_targets(results, sizes)
    write_report(results, out / "report")
    console(format_summary_table(results))
    for line in results["targets"]:
        console(f"  {'MET ' if line['met'] else 'MISS'} {line['target']}: {line['value']}")
    console(f"report: {out / 'report' / 'report.md'} ({time.perf_counter() - started:.0f} s in all)")
    return results


def evaluate_models(world, tokenizer, model_dirs: dict[str, Path], sizes: tuple[str, ...], rm_dir: Path,
                    preset: DemoPreset, seed: int) -> dict[str, Any]:
    """Every model's metrics in the report's format; the baseline of win rates is the largest SFT model."""
    from rlhf_fast.eval import (
        hallucination_rate,
        insult_rate,
        labeler_agreement,
        make_comparisons,
        qa_exact_match,
        rm_agreement,
        task_score,
        truthfulness,
        win_rate,
    )
    from rlhf_fast.eval.generate import generate_responses
    from rlhf_fast.models import PolicyModel, RewardModel

    heldout = world.instances("heldout")[: preset.eval_prompts]
    probes = world.instances("truthful") + world.instances("insult_respectful") + world.instances("insult_plain")
    qa_items = world.qa_benchmark[: preset.eval_prompts]
    labelers = world.heldout_labelers

    def respond(directory: Path, prompts: list[str]) -> list[str]:
        policy = PolicyModel.from_pretrained(directory).eval()
        return generate_responses(policy, tokenizer, prompts, preset.max_new_tokens, greedy=True,
                                  batch_size=preset.eval_batch_size, seed=seed)

    baseline_name = f"sft-{sizes[-1]}"
    responses = {name: respond(directory, [i.prompt for i in heldout]) for name, directory in model_dirs.items()}
    models: dict[str, Any] = {}
    for name, directory in model_dirs.items():
        kind, size = name.rsplit("-", 1)
        on_probes = respond(directory, [i.prompt for i in probes])
        on_qa = respond(directory, [item["prompt"] for item in qa_items])
        metrics = {
            "win_rate": win_rate(responses[name], responses[baseline_name], heldout, labelers),
            "task_score": task_score(responses[name], heldout, world),
            "truthfulness": truthfulness(on_probes, probes, world),
            "truthful_informative": truthfulness(on_probes, probes, world, require_informative=True),
            "hallucination_rate": hallucination_rate(responses[name], heldout, world),
            "insult_rate_respectful": insult_rate(on_probes, probes, world, with_respectful_instruction=True),
            "insult_rate_plain": insult_rate(on_probes, probes, world, with_respectful_instruction=False),
            "qa_exact_match": qa_exact_match(on_qa, qa_items),
        }
        models[name] = {"kind": kind, "size": size, "params": _parameter_count(directory),
                        "metrics": {key: list(value) for key, value in metrics.items()}}

    # RM agreement with held-out labelers on pairs of SFT samples for held-out prompts.
    rng = random.Random(f"demo:{seed}:comparisons")
    comparison_prompts = heldout[: max(1, preset.rm_comparisons // 2)]
    pairs = _sample_many(model_dirs[f"sft-{sizes[0]}"], tokenizer, [i.prompt for i in comparison_prompts],
                         [3] * len(comparison_prompts), preset.max_new_tokens, 1.0, seed + 99, preset.eval_batch_size)
    comparisons = make_comparisons(comparison_prompts, pairs, rng, pairs_per_prompt=2)
    reward_model = RewardModel.from_pretrained(rm_dir).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def reward_fn(prompts: list[str], texts: list[str]) -> list[float]:
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] + tokenizer(t, add_special_tokens=False)["input_ids"]
                + [eos] for p, t in zip(prompts, texts)]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = True
        return reward_model(input_ids, mask).tolist()

    train_labelers = world.train_labelers
    return {
        "models": models,
        "win_rate_baseline": f"SFT ({sizes[-1]})",
        "labeler_agreement": list(labeler_agreement(comparisons, labelers, train_labelers)),
        "_rm_metrics": {
            "rm_agreement_heldout": list(rm_agreement(reward_fn, comparisons, labelers)),
            "rm_agreement_train": list(rm_agreement(reward_fn, comparisons, train_labelers)),
        },
    }


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
