"""`rlhf-fast eval`: generate responses to a prompt file, and score them with a reward model.

Responses come from `rlhf_fast.rollout.sample` (greedy unless --temperature > 0). With --reward, every
response is scored the way PPO scores a rollout: the prompt's tokens, the response's tokens and the eos
token (whether the response ended or was cut at --max-new-tokens), read by the reward model at the eos.
With --baseline as well, the win rate of the policy against the baseline is the mean over prompts of 1
(higher reward), 1/2 (tie) or 0, with its standard error over prompts.

With --best-of N (and --reward, --temperature > 0), the policy answers with the best of N samples by the
reward model's score (`rlhf_fast.eval.generate.best_of_n`): what the reward model alone gets out of the policy.
Its reward-model win rate is then biased by the selection; --world judges it with labelers instead.

With --world DIR (a demo world's data directory), the world judges the responses as the demo does
(`rlhf_fast.eval.suite`): its held-out labelers give the win rate against --baseline, its scorers the task
score, hallucination and non-answers on the prompts (default: the world's held-out prompts), and the policy
also answers the world's probes (truthfulness, insults) and QA benchmark; the policy's metrics minus the
baseline's are compared prompt by prompt (the SE of the per-prompt differences).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_fast.cli.common import (
    CLIError,
    Dataset,
    check_file,
    check_model_dir,
    encode_dataset,
    load_tokenizer,
    load_weights,
    model_max_positions,
    note,
    output_lines,
    read_dataset,
    say,
)

if TYPE_CHECKING:
    from rlhf_fast.eval.generate import Generation
    from rlhf_fast.eval.suite import Answers

__all__ = ["run_eval"]


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    return torch.device(name)


def reward_rows(
    prompt_ids: list[list[int]],
    generation: Generation,
    tokenizer,
    reward_tokenizer,
    prompt_texts: list[str],
    limit: int | None,
) -> list[list[int]]:
    """The token rows the reward model scores: with the policy's own vocabulary the exact token ids; otherwise
    the texts tokenized with the reward model's tokenizer (`rlhf_fast.eval.generate.response_rows`)."""
    from rlhf_fast.eval.generate import response_rows, token_rows
    from rlhf_fast.models.loading import same_vocabulary

    if same_vocabulary(reward_tokenizer, tokenizer):  # true for the policy's own tokenizer too
        eos = int(reward_tokenizer.eos_token_id)
        return token_rows(prompt_ids, generation.token_ids, eos, limit)
    return response_rows(reward_tokenizer, prompt_texts, generation.texts, limit=limit)


def _estimate(values: list[float]) -> dict[str, float]:
    from rlhf_fast.eval.metrics import mean_and_standard_error

    mean, standard_error = mean_and_standard_error(values)
    return {"mean": mean, "se": standard_error}


def _fmt(estimate: dict[str, float]) -> str:
    se = estimate["se"]
    return (
        f"{estimate['mean']:.4g} ± {se:.2g} (SE)"
        if not math.isnan(se)
        else f"{estimate['mean']:.4g} (one prompt: no SE)"
    )


def _check_generation_args(args) -> None:
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.best_of < 1:
        raise CLIError(f"--best-of must be >= 1, got {args.best_of}")
    if args.best_of > 1 and (args.reward is None or args.temperature == 0):
        raise CLIError(
            f"--best-of {args.best_of} samples and chooses: it needs --reward and --temperature > 0"
        )


def _prompt_limit(flag: str, model_dir: str, requested: int | None, max_new_tokens: int) -> int:
    positions = model_max_positions(flag, model_dir)
    if requested is None:
        if positions is None:
            raise CLIError(
                f"{flag} {model_dir}: its config does not say how many positions it covers; pass --max-length"
            )
        requested = positions - max_new_tokens
        if requested < 1:
            raise CLIError(
                f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the {positions} "
                f"positions of {flag} {model_dir}"
            )
    elif positions is not None and requested + max_new_tokens > positions:
        raise CLIError(
            f"--max-length {requested} + --max-new-tokens {max_new_tokens} is more than the "
            f"{positions} positions of {flag} {model_dir}"
        )
    return requested


def run_eval(args) -> int:
    import torch

    from rlhf_fast.models.loading import same_vocabulary

    policy_dir = check_model_dir("--policy", args.policy)
    baseline_dir = check_model_dir("--baseline", args.baseline) if args.baseline is not None else None
    reward_dir = check_model_dir("--reward", args.reward, reward=True) if args.reward is not None else None
    world = _load_world(args.world) if args.world is not None else None
    if args.prompts is None:
        if world is None:
            raise CLIError(
                "--prompts FILE is required (or --world DIR, whose held-out prompts are the default)"
            )
        args.prompts = str(Path(args.world) / "prompts_heldout.jsonl")
    check_file("--prompts", args.prompts)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    _check_generation_args(args)
    device = _device(args.device)
    truncation = args.truncation or "error"

    # Validate the prompts (for every tokenizer involved) before any weights are loaded.
    tokenizer = load_tokenizer("--policy", policy_dir)
    limit = _prompt_limit("--policy", policy_dir, args.max_length, args.max_new_tokens)
    prompts = read_dataset("--prompts", "prompts", args.prompts, tokenizer, args.on_bad_record or "error")
    if prompts.loaded.num_skipped:
        note(f"--prompts {prompts.read_summary()}")
    encode_dataset(prompts, tokenizer, limit, truncation)
    kept_prompts = _kept_records(prompts)
    prompt_texts = [record.prompt for record in kept_prompts]
    suite = _world_suite(world, args.world, kept_prompts) if world is not None else None
    baseline_tokenizer = baseline_ids = None
    if baseline_dir is not None:
        baseline_tokenizer = load_tokenizer("--baseline", baseline_dir)
        baseline_ids = _baseline_prompt_ids(
            args, baseline_dir, baseline_tokenizer, tokenizer, prompts, kept_prompts, limit, truncation
        )
    reward_tokenizer = reward_limit = None
    if reward_dir is not None:
        try:
            reward_tokenizer = load_tokenizer("--reward", reward_dir)
        except CLIError:
            note(f"--reward {reward_dir}: no tokenizer saved there; using the policy's")
            reward_tokenizer = tokenizer
        reward_limit = model_max_positions("--reward", reward_dir)
        if args.best_of > 1 and not same_vocabulary(reward_tokenizer, tokenizer):
            raise CLIError(
                f"--best-of {args.best_of}: the reward model in {reward_dir} reads another vocabulary than the "
                f"policy; choosing among samples needs the policy's tokenizer"
            )
    fitted = prompts.fit_summary()
    if fitted:
        note(f"--prompts {fitted}")

    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "decoding": "greedy" if args.temperature == 0 else "sampling",
        "best_of": args.best_of,
        "max_prompt_length": limit,
    }
    policy_ids = [item.input_ids for item in prompts.encoded.items]
    models = [("policy", policy_dir, tokenizer, policy_ids)]
    if baseline_dir is not None:
        models.append(("baseline", baseline_dir, baseline_tokenizer, baseline_ids))
    generations, answers = _generate(args, models, suite, device, reward_dir)
    scores: dict[str, list[float]] = {}
    if reward_dir is not None:
        scores = _score(
            args, reward_dir, reward_tokenizer, reward_limit, models, generations, prompt_texts, device
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()

    results = _results(args, policy_dir, baseline_dir, reward_dir, settings, generations, scores)
    if suite is not None:
        results["world"] = _world_metrics(world, suite, answers)
    _write(out, prompt_texts, generations, scores)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    _print_summary(out, results, generations)
    return 0


def _baseline_prompt_ids(
    args, baseline_dir, baseline_tokenizer, tokenizer, prompts, kept_prompts, limit: int, truncation: str
) -> list[list[int]]:
    """The kept prompts as the baseline reads them: the policy's ids when both share a vocabulary, else the
    same texts encoded with the baseline's tokenizer (never skipping one the policy answers)."""
    from rlhf_fast.models.loading import same_vocabulary

    if same_vocabulary(baseline_tokenizer, tokenizer):
        _prompt_limit("--baseline", baseline_dir, limit, args.max_new_tokens)  # the same prompts fit it too
        return [item.input_ids for item in prompts.encoded.items]
    baseline_limit = _prompt_limit("--baseline", baseline_dir, args.max_length, args.max_new_tokens)
    baseline_prompts = Dataset("--prompts", "prompts", prompts.path, prompts.loaded)
    baseline_prompts.loaded = dataclasses.replace(prompts.loaded, records=kept_prompts)
    # Every prompt the policy answers must reach the baseline too: nothing may be skipped here.
    baseline_policy = "truncate_prompt" if truncation == "skip" else truncation
    encode_dataset(baseline_prompts, baseline_tokenizer, baseline_limit, baseline_policy)
    return [item.input_ids for item in baseline_prompts.encoded.items]


def _generate(args, models, suite, device, reward_dir) -> tuple[dict[str, Generation], dict[str, Answers]]:
    """Each (name, directory, tokenizer, prompt ids) model's responses to the prompts, and with a world its
    answers to the world's probes; one model in memory at a time (with --best-of, the policy with the reward
    model that chooses among its samples)."""
    from rlhf_fast.eval.generate import best_of_n, generate
    from rlhf_fast.eval.suite import respond
    from rlhf_fast.models import PolicyModel, RewardModel

    generations: dict[str, Generation] = {}
    answers: dict[str, Answers] = {}
    options = {"temperature": args.temperature, "batch_size": args.batch_size, "seed": args.seed}
    for name, directory, model_tokenizer, ids in models:
        model = load_weights(f"--{name}", directory, PolicyModel.from_pretrained).to(device).eval()
        chooser = None
        if name == "policy" and args.best_of > 1:
            chooser = load_weights("--reward", reward_dir, RewardModel.from_pretrained).to(device).eval()
            choice = (chooser, model_tokenizer, ids, args.best_of, args.max_new_tokens)
            generations[name] = best_of_n(model, *choice, top_p=args.top_p, **options)
        else:
            generations[name] = generate(
                model, model_tokenizer, ids, args.max_new_tokens, top_p=args.top_p, **options
            )
        if suite is not None:
            best = {"best_of": args.best_of, "reward_model": chooser} if chooser is not None else {}
            answers[name] = respond(
                model,
                model_tokenizer,
                suite,
                max_new_tokens=args.max_new_tokens,
                heldout=generations[name].texts,
                **options,
                **best,
            )
        del model, chooser
    return generations, answers


def _score(
    args, reward_dir, reward_tokenizer, reward_limit, models, generations, prompt_texts, device
) -> dict[str, list[float]]:
    """The reward model's score of each model's responses."""
    from rlhf_fast.eval.generate import reward_scores
    from rlhf_fast.models import RewardModel

    reward_model = load_weights("--reward", reward_dir, RewardModel.from_pretrained).to(device).eval()
    scores = {}
    for name, _, model_tokenizer, ids in models:
        rows = reward_rows(
            ids, generations[name], model_tokenizer, reward_tokenizer, prompt_texts, reward_limit
        )
        scores[name] = reward_scores(reward_model, rows, int(reward_tokenizer.pad_token_id), args.batch_size)
    return scores


def _load_world(directory: str):
    from rlhf_fast.world import load_world

    if not Path(directory).is_dir():
        raise CLIError(f"--world {directory}: no such directory (the demo writes it as <out>/data)")
    try:
        return load_world(directory)
    except ValueError as error:
        raise CLIError(f"--world {error}") from None


def _world_suite(world, world_dir: str, records: list):
    """The evaluation suite of `world` on the prompt records: each must be a prompt of that world."""
    from rlhf_fast.eval.suite import EvalSuite

    instances = []
    for record in records:
        instance = world.instance(record.prompt)
        if instance is None:
            raise CLIError(
                f"--prompts {record.source}: field 'prompt': not a prompt of the world in --world {world_dir}"
            )
        instances.append(instance)
    full = EvalSuite.from_world(world, len(world.qa_benchmark))
    return EvalSuite(heldout=instances, probes=full.probes, qa=full.qa)


def _world_metrics(world, suite, answers: dict[str, Answers]) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {metric: {"mean", "se"}}}, judged by the world; the policy's win rate is against the baseline.
    With a baseline, also "policy_minus_baseline": the differences of the metrics both have, paired by prompt
    (`rlhf_fast.eval.metrics.paired_difference`)."""
    from rlhf_fast.eval.metrics import paired_difference
    from rlhf_fast.eval.suite import judge_items

    judged, items = {}, {}
    for name, given in answers.items():
        baseline = answers.get("baseline") if name == "policy" else None
        metrics, items[name] = judge_items(world, suite, given, baseline)
        judged[name] = {metric: {"mean": e.value, "se": e.se} for metric, e in metrics.items()}
    if "baseline" in items:
        policy, baseline = items["policy"], items["baseline"]
        differences = {m: paired_difference(policy[m], baseline[m]) for m in policy if m in baseline}
        judged["policy_minus_baseline"] = {m: {"mean": v, "se": se} for m, (v, se) in differences.items()}
    return judged


def _kept_records(prompts: Dataset) -> list:
    """The prompt records that survived encoding (the "skip" policy may drop some), in order."""
    kept = {item.source for item in prompts.encoded.items}
    return [record for record in prompts.loaded.records if record.source in kept]


def _results(args, policy_dir, baseline_dir, reward_dir, settings, generations, scores) -> dict:
    metrics: dict[str, object] = {}
    for name, generation in generations.items():
        lengths = [len(ids) + int(ended) for ids, ended in zip(generation.token_ids, generation.finished)]
        metrics[f"{name}/response_tokens"] = _estimate(lengths)
        metrics[f"{name}/eos_fraction"] = sum(generation.finished) / len(generation.finished)
        if name in scores:
            metrics[f"{name}/reward"] = _estimate(scores[name])
    if "baseline" in scores:
        wins = [
            1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(scores["policy"], scores["baseline"])
        ]
        metrics["win_rate"] = _estimate(wins)
    return {
        "policy": policy_dir,
        "baseline": baseline_dir,
        "reward": reward_dir,
        "prompts": args.prompts,
        "num_prompts": len(generations["policy"].texts),
        "generation": settings,
        "metrics": metrics,
    }


def _write(out: Path, prompt_texts, generations, scores) -> None:
    from rlhf_fast.data import write_jsonl

    rows = []
    for index, prompt in enumerate(prompt_texts):
        row: dict[str, object] = {"prompt": prompt}
        for name, generation in generations.items():
            prefix = "" if name == "policy" else f"{name}_"
            row[f"{prefix}response"] = generation.texts[index]
            row[f"{prefix}finished"] = generation.finished[index]
            if name in scores:
                row[f"{prefix}reward"] = scores[name][index]
        rows.append(row)
    os.makedirs(out, exist_ok=True)
    write_jsonl(out / "responses.jsonl", rows)


def _print_summary(out: Path, results: dict, generations: dict[str, Generation]) -> None:
    metrics, settings = results["metrics"], results["generation"]
    lines = [
        (
            f"eval done: {results['num_prompts']} prompts, {settings['decoding']}, up to "
            f"{settings['max_new_tokens']} new tokens"
        )
    ]
    for name in generations:
        line = (
            f"  {name:<8} mean length {metrics[f'{name}/response_tokens']['mean']:.1f} tokens, "
            f"{metrics[f'{name}/eos_fraction']:.0%} ended with eos"
        )
        if f"{name}/reward" in metrics:
            line += f", mean reward {_fmt(metrics[f'{name}/reward'])}"
        lines.append(line)
    if "win_rate" in metrics:
        lines.append(
            f"  win rate of the policy against the baseline under the reward model: "
            f"{_fmt(metrics['win_rate'])}; ties count 1/2"
        )
    elif results["reward"] is None and "world" not in results:
        lines.append("  no --reward given: responses only (add --reward DIR for mean reward and win rate)")
    for name, judged in results.get("world", {}).items():
        cells = [f"{metric} {_fmt(estimate)}" for metric, estimate in judged.items()]
        lines.append(f"  judged by the world ({name}): " + "; ".join(cells))
    lines.append(f"  outputs in {out}:")
    lines += output_lines(
        [
            ("responses", str(out / "responses.jsonl"), "one JSON object per prompt"),
            ("summary", str(out / "eval.json"), "the metrics above, with standard errors"),
        ]
    )
    say(*lines)
