"""The demo's evaluation: every model answers the held-out suite once (answers cached while their settings
match), held-out labelers judge the win rates, the world's scorers give the rest, and the reward model's
agreement with labelers is measured on fresh samples of the policies its training samples came from. Beside the
trained models, the largest SFT model's best-of-n samples by the reward model (`eval_best_of`) show what the
reward model gets with no RL, the reference for PPO's gains."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf_fast.eval.report import BEST_OF_N_KIND
from rlhf_fast.eval.results import Estimate, ModelResult
from rlhf_fast.pipeline.stages import as_stored, rm_sample_sizes

if TYPE_CHECKING:
    from rlhf_fast.pipeline.demo import DemoRun


@dataclass
class Evaluation:
    """What `evaluate` measures: every model's metrics, the RM's agreement with labelers, and the samples."""

    models: list[ModelResult]
    reward_model_agreement: dict[str, Estimate]
    labeler_agreement: Estimate
    samples: dict[str, list]  # model name -> [(instance, response)] on the held-out prompts


def parameter_count(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):  # a reward model keeps its head in a file of its own
        with safe_open(str(path), framework="pt") as handle:
            total += sum(torch.Size(handle.get_slice(name).get_shape()).numel() for name in handle.keys())  # noqa: SIM118 (safe_open is not a dict)
    return total


def policy_shares(per_prompt: list[int], policies: int) -> list[list[int]]:
    """How many of prompt i's `per_prompt[i]` samples each of `policies` policies draws: an equal share, the
    first policies one more while a remainder lasts."""
    return [
        [count // policies + (1 if index < count % policies else 0) for count in per_prompt]
        for index in range(policies)
    ]


def sample_policy(
    policy_dir: Path,
    tokenizer,
    prompts: list[str],
    counts: list[int],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
) -> list[list[str]]:
    """`counts[i]` samples of the policy in `policy_dir` for `prompts[i]`."""
    from rlhf_fast.eval.generate import generate_responses
    from rlhf_fast.models import PolicyModel

    flat = [prompt for prompt, count in zip(prompts, counts) for _ in range(count)]
    if not flat:
        return [[] for _ in prompts]
    policy = PolicyModel.from_pretrained(policy_dir).eval()
    responses = generate_responses(
        policy, tokenizer, flat, max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed
    )
    ends = list(itertools.accumulate(counts))
    return [responses[end - count : end] for count, end in zip(counts, ends)]


def sample_from_policies(
    policy_dirs: list[Path],
    tokenizer,
    prompts: list[str],
    per_prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
) -> list[list[str]]:
    """`per_prompt[i]` samples for prompt i, shared between the policies in `policy_dirs` (`policy_shares`;
    policy k samples with `seed + k`), as InstructGPT's comparisons came from several models; each prompt's
    samples in the order of the policies."""
    shares = policy_shares(per_prompt, len(policy_dirs))
    samples = [
        sample_policy(
            directory, tokenizer, prompts, counts, max_new_tokens, temperature, seed + index, batch_size
        )
        for index, (directory, counts) in enumerate(zip(policy_dirs, shares))
    ]
    return merge_shares(samples)


def merge_shares(shares: list[list[list[str]]]) -> list[list[str]]:
    """Each prompt's samples from the policies' shares (`shares[k][i]`: policy k's for prompt i), in the order
    of the policies."""
    return [[text for share in per_policy for text in share] for per_policy in zip(*shares)]


def _answers(run: DemoRun, name: str, suite, fresh: bool, model: str | None = None, best_of: int = 1):
    """The answers of `model` (default `name`) to the suite, kept in out/eval/<name>.json while their settings
    match; `best_of` > 1: each sampled answer is the best of that many samples by the reward model."""
    from rlhf_fast.eval.suite import Answers, respond
    from rlhf_fast.models import PolicyModel, RewardModel

    model = model or name
    settings = {
        "model": run.keys[model],
        "world": run.keys["world"],
        "eval": run.keys["eval"],
        "seed": run.seed,
    }
    if best_of > 1:
        settings |= {"best_of": best_of, "reward_model": run.keys["rm"]}
    key = as_stored(settings)
    cache = run.out / "eval" / f"{name}.json"
    if not fresh and cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return Answers.from_json(cached["responses"])
    policy = PolicyModel.from_pretrained(run.model_dirs[model]).eval()
    answers = respond(
        policy,
        run.tokenizer,
        suite,
        max_new_tokens=run.preset.max_new_tokens,
        temperature=run.preset.eval_temperature,
        batch_size=run.preset.eval_batch_size,
        seed=run.seed,
        best_of=best_of,
        reward_model=RewardModel.from_pretrained(run.rm_dir).eval() if best_of > 1 else None,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "responses": answers.to_json()}))
    return answers


def _reward_model_agreement(run: DemoRun) -> tuple[dict[str, Estimate], Estimate]:
    """The RM's agreement with held-out (and training) labelers, and the labelers' agreement with each other,
    on pairs of samples of the models the RM's training samples came from, for held-out prompts."""
    from rlhf_fast.eval import labeler_agreement, make_comparisons, rm_agreement
    from rlhf_fast.eval.generate import response_rows, reward_scores
    from rlhf_fast.models import RewardModel

    preset, world = run.preset, run.world
    rng = random.Random(f"demo:{run.seed}:comparisons")
    prompts = world.instances("heldout")[: preset.rm_comparison_prompts]
    samples = sample_from_policies(
        [run.model_dirs[f"sft-{size}"] for size in rm_sample_sizes(preset)],
        run.tokenizer,
        [i.prompt for i in prompts],
        [3] * len(prompts),
        preset.max_new_tokens,
        preset.rm_sample_temperature,
        run.seed + 99,
        preset.eval_batch_size,
    )
    comparisons = make_comparisons(prompts, samples, rng)
    reward_model = RewardModel.from_pretrained(run.rm_dir).eval()

    def reward_fn(prompt_texts: list[str], responses: list[str]) -> list[float]:
        rows = response_rows(run.tokenizer, prompt_texts, responses)
        return reward_scores(reward_model, rows, run.tokenizer.pad_token_id, preset.eval_batch_size)

    agreement = {
        "rm_agreement_heldout": Estimate.of(rm_agreement(reward_fn, comparisons, world.heldout_labelers)),
        "rm_agreement_train": Estimate.of(rm_agreement(reward_fn, comparisons, world.train_labelers)),
    }
    return agreement, Estimate.of(
        labeler_agreement(comparisons, world.heldout_labelers, world.train_labelers)
    )


def evaluate(run: DemoRun, fresh: bool = False) -> Evaluation:
    """Every model answers the suite once; held-out labelers judge the win rate against the largest SFT model
    (Figure 1) and against the SFT model of its own size; the world's scorers give the rest."""
    from rlhf_fast.eval.suite import EvalSuite, judge_items, task_scores, win_rate

    suite = EvalSuite.from_world(run.world, run.preset.eval_prompts)
    answers = {name: _answers(run, name, suite, fresh) for name in run.model_dirs}
    largest = run.sizes[-1]
    baseline = answers[f"sft-{largest}"]
    entries = {name: (name.rsplit("-", 1), directory) for name, directory in run.model_dirs.items()}
    best_of = run.preset.eval_best_of
    if best_of > 1:
        # The reward model alone, no RL: the largest SFT model's best of `best_of` samples by the RM's score.
        name = f"{BEST_OF_N_KIND}_{best_of}-{largest}"
        answers[name] = _answers(run, name, suite, fresh, model=f"sft-{largest}", best_of=best_of)
        entries[name] = ((BEST_OF_N_KIND, largest), run.model_dirs[f"sft-{largest}"])
    models = []
    for name, ((kind, size), directory) in entries.items():
        metrics, items = judge_items(run.world, suite, answers[name], baseline)
        metrics["win_rate_same_size"] = win_rate(run.world, suite, answers[name], answers[f"sft-{size}"])
        models.append(
            ModelResult(
                name=name,
                kind=kind,
                size=size,
                params=parameter_count(directory),
                metrics=metrics,
                task_scores=task_scores(run.world, suite, answers[name]),
                items=items,
            )
        )
    agreement, labelers = _reward_model_agreement(run)
    samples = {name: list(zip(suite.heldout, given.heldout)) for name, given in answers.items()}
    return Evaluation(models, agreement, labelers, samples)
