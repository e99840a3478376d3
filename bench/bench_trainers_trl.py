"""rlhf_fast's trainers side by side with TRL 1.12 on the CPU, same tiny model, same data.

1. PPO: one iteration (rollout, scoring, GAE, 4 PPO epochs of one minibatch) of a random 2-layer 64-wide GPT-2
   policy, with a reference, a reward model and a value model of the same shape; batch 4 prompts, 16 new
   tokens, temperature 0.7, KL coefficient 0.05. TRL: `trl.experimental.ppo.PPOTrainer` (the last release that
   ships it), timed between `on_step_end` callbacks; rlhf_fast: `PPOTrainer`, its logged `time/seconds`.
   The first iterations are warm-up; the figure is the median of the rest.
2. Reward model: 64 prompts with K=4 ranked completions, 16 prompts (96 comparisons) per optimizer step, one
   epoch. rlhf_fast trains on the K-wise rankings (each completion encoded once); TRL's `RewardTrainer` on the
   same rankings expanded to C(4, 2) = 6 (chosen, rejected) pairs per prompt, 96 pairs per step. Forward
   tokens are the [rows, length] sizes the model was run on (padding included) and the real tokens among them.

TRL runs in its own interpreter (trl==1.12.0 pins its own dependencies), given by --trl-python or $TRL_PYTHON
(default /work/trl-venv/bin/python); rlhf_fast runs in this one. Both sides build the same token ids and the
same GPT-2 configuration. Usage:

    .venv/bin/python bench/bench_trainers_trl.py [--iterations 20] [--write-results]

`--side ours|trl` runs one side and prints its JSON (what the default `--side both` calls).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [f"w{i}" for i in range(60)]
SPECIAL = (
    "[pad]",
    "[bos]",
    "[eos]",
    "[unk]",
)  # ids 0..3, the layout of rlhf_fast.models.build_word_tokenizer
PAD, EOS = 0, 2
PPO_BATCH, NEW_TOKENS, TEMPERATURE, KL_COEF = 4, 16, 0.7, 0.05
RM_PROMPTS, RM_K, RM_PROMPTS_PER_STEP = 64, 4, 16
WARMUP_ITERATIONS = 3


# ------------------------------------------------------------------------------------------- shared data


def tokenizer():
    """A word-level tokenizer with the ids of `rlhf_fast.models.build_word_tokenizer(WORDS)`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + tuple(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[unk]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[pad]",
        bos_token="[bos]",
        eos_token="[eos]",
        unk_token="[unk]",
        padding_side="left",
    )


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(SPECIAL) + len(WORDS),
        n_positions=128,
        n_layer=2,
        n_embd=64,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=EOS,
        tie_word_embeddings=True,
    )


def prompt_ids(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [len(SPECIAL) + rng.randrange(len(WORDS)) for _ in range(rng.randint(4, 8))] for _ in range(count)
    ]


def rankings(seed: int = 1) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, K completion ids listed best first, each ending with eos)."""
    rng = random.Random(seed)
    items = []
    for prompt in prompt_ids(RM_PROMPTS, seed):
        completions = [
            [len(SPECIAL) + rng.randrange(len(WORDS)) for _ in range(rng.randint(6, 12))] + [EOS]
            for _ in range(RM_K)
        ]
        items.append((prompt, completions))
    return items


def torch_setup():
    import torch

    # One intra-op thread on both sides: on shared cores a second OpenMP thread that loses its core stalls
    # every parallel region, which swamps the comparison.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return torch


# ------------------------------------------------------------------------------------------------ ours


def ours_ppo(iterations: int, workdir: Path) -> dict:
    torch = torch_setup()
    from transformers import GPT2LMHeadModel

    from rlhf_fast import PPOConfig, PPOTrainer
    from rlhf_fast.models import PolicyModel, RewardModel

    policy = PolicyModel(GPT2LMHeadModel(gpt2_config()))
    reward_model = RewardModel.from_policy(GPT2LMHeadModel(gpt2_config()))
    config = PPOConfig(
        batch_size=PPO_BATCH,
        num_minibatches=1,
        ppo_epochs=4,
        max_iterations=iterations,
        max_new_tokens=NEW_TOKENS,
        temperature=TEMPERATURE,
        kl_coef=KL_COEF,
        learning_rate=3e-6,
        warmup=0,
        save_every=0,
        device="cpu",
        output_dir=str(workdir / "ours_ppo"),
    )
    trainer = PPOTrainer(
        config, policy, reward_model, prompt_ids(PPO_BATCH * iterations), tokenizer=tokenizer()
    )
    trainer.train()
    with open(workdir / "ours_ppo" / "metrics.jsonl") as handle:
        seconds = [json.loads(line)["time/seconds"] for line in handle]
    return {"seconds": seconds, "threads": torch.get_num_threads()}


def ours_rm(workdir: Path) -> dict:
    torch = torch_setup()
    from transformers import GPT2LMHeadModel

    from rlhf_fast import RewardConfig, RewardTrainer
    from rlhf_fast.data import EncodedRanking

    data = [
        EncodedRanking(prompt, tuple(completions), tuple(range(RM_K))) for prompt, completions in rankings()
    ]
    config = RewardConfig(
        batch_size=RM_PROMPTS_PER_STEP,
        epochs=1,
        learning_rate=1e-4,
        save_every=0,
        normalize=False,
        device="cpu",
        output_dir=str(workdir / "ours_rm"),
    )
    trainer = RewardTrainer(config, GPT2LMHeadModel(gpt2_config()), data, pad_token_id=PAD)
    counts = {"tokens": 0, "real_tokens": 0, "rows": 0}

    def count(module, args):
        counts["tokens"] += args[0].numel()
        counts["real_tokens"] += int(args[1].sum())
        counts["rows"] += args[0].shape[0]

    trainer.model.register_forward_pre_hook(count)
    trainer.train()
    with open(workdir / "ours_rm" / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    seconds = sum(r["time/seconds"] for r in records if "time/seconds" in r)
    return {"epoch_seconds": seconds, "steps": len(records), "threads": torch.get_num_threads(), **counts}


# ------------------------------------------------------------------------------------------------- TRL


class _StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.stamps: list[float] = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.stamps.append(time.perf_counter())

            def on_epoch_begin(self, args, state, control, **kwargs):
                outer.epoch_start = time.perf_counter()

            def on_epoch_end(self, args, state, control, **kwargs):
                outer.epoch_end = time.perf_counter()

        self.callback = Callback()


def trl_ppo(iterations: int, workdir: Path) -> dict:
    torch = torch_setup()
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    config = gpt2_config()
    policy = GPT2LMHeadModel(config)
    reward_model = GPT2ForSequenceClassification(
        gpt2_config().__class__(**{**config.to_dict(), "num_labels": 1})
    )
    value_model = GPT2ForSequenceClassification(
        gpt2_config().__class__(**{**config.to_dict(), "num_labels": 1})
    )
    ref_model = GPT2LMHeadModel(config)
    ref_model.load_state_dict(policy.state_dict())
    args = PPOConfig(
        output_dir=str(workdir / "trl_ppo"),
        per_device_train_batch_size=PPO_BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=4,
        total_episodes=PPO_BATCH * iterations,
        response_length=NEW_TOKENS,
        temperature=TEMPERATURE,
        kl_coef=KL_COEF,
        learning_rate=3e-6,
        stop_token="eos",
        local_rollout_forward_batch_size=PPO_BATCH,
        num_sample_generations=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        seed=0,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"input_ids": prompt_ids(PPO_BATCH * iterations)})
    timer = _StepTimer()
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer(),
        model=policy,
        ref_model=ref_model,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        callbacks=[timer.callback],
    )
    start = time.perf_counter()
    trainer.train()
    stamps = [start] + timer.stamps
    return {"seconds": [b - a for a, b in itertools.pairwise(stamps)], "threads": torch.get_num_threads()}


def trl_rm(workdir: Path) -> dict:
    torch = torch_setup()
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    config = gpt2_config()
    model = GPT2ForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": 1}))
    chosen, rejected = [], []
    for prompt, completions in rankings():
        for better in range(RM_K):
            for worse in range(better + 1, RM_K):
                chosen.append(prompt + completions[better])
                rejected.append(prompt + completions[worse])
    pairs_per_step = RM_PROMPTS_PER_STEP * RM_K * (RM_K - 1) // 2
    args = RewardConfig(
        output_dir=str(workdir / "trl_rm"),
        per_device_train_batch_size=pairs_per_step,
        num_train_epochs=1,
        learning_rate=1e-4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        seed=0,
        dataloader_num_workers=0,
        max_length=None,
    )
    dataset = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    timer = _StepTimer()
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer(),
        callbacks=[timer.callback],
    )
    counts = {"tokens": 0, "real_tokens": 0, "rows": 0}

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["tokens"] += ids.numel()
        counts["rows"] += ids.shape[0]
        mask = kwargs.get("attention_mask")
        counts["real_tokens"] += int(mask.sum()) if mask is not None else ids.numel()

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.train()
    return {
        "epoch_seconds": timer.epoch_end - timer.epoch_start,
        "steps": len(timer.stamps),
        "threads": torch.get_num_threads(),
        **counts,
    }


# ---------------------------------------------------------------------------------------------- driver


def run_side(side: str, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if side == "ours":
            return {"ppo": ours_ppo(iterations, workdir), "rm": ours_rm(workdir)}
        return {"ppo": trl_ppo(iterations, workdir), "rm": trl_rm(workdir)}


def run_subprocess(python: str, side: str, iterations: int) -> dict:
    env = dict(os.environ, RLHF_FAST_NO_PROGRESS="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    output = subprocess.run(
        [python, __file__, "--side", side, "--iterations", str(iterations)],
        env=env,
        check=False,  # the return code is checked below, with the side's stderr
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if output.returncode != 0:
        raise RuntimeError(f"the {side} side failed:\n{output.stderr[-4000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def machine_description() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0]
    return f"{model}, {os.cpu_count()} cores (load average {load:.1f})"


def table(ours: dict, trl: dict) -> list[str]:
    ours_ppo = ours["ppo"]["seconds"][WARMUP_ITERATIONS:]
    trl_ppo = trl["ppo"]["seconds"][WARMUP_ITERATIONS:]
    ours_median, trl_median = statistics.median(ours_ppo), statistics.median(trl_ppo)
    ours_rm, trl_rm = ours["rm"], trl["rm"]

    def row(case: str, mine: str, theirs: str, ratio: str) -> str:
        return f"| {case} | {mine} | {theirs} | {ratio} |"

    return [
        row("case", "rlhf_fast", "TRL 1.12", "ratio"),
        "|---|---|---|---|",
        row(
            f"PPO iteration, batch {PPO_BATCH}, {NEW_TOKENS} new tokens: median (min) of {len(ours_ppo)}",
            f"{ours_median:.3f} s ({min(ours_ppo):.3f} s)",
            f"{trl_median:.3f} s ({min(trl_ppo):.3f} s)",
            f"{trl_median / ours_median:.2f}x faster ({min(trl_ppo) / min(ours_ppo):.2f}x)",
        ),
        row(
            f"RM epoch, {RM_PROMPTS} prompts x K={RM_K}",
            f"{ours_rm['epoch_seconds']:.3f} s",
            f"{trl_rm['epoch_seconds']:.3f} s",
            f"{trl_rm['epoch_seconds'] / ours_rm['epoch_seconds']:.2f}x faster",
        ),
        row(
            "RM epoch: sequences encoded",
            str(ours_rm["rows"]),
            str(trl_rm["rows"]),
            f"{trl_rm['rows'] / ours_rm['rows']:.2f}x fewer",
        ),
        row(
            "RM epoch: forward tokens (padded)",
            str(ours_rm["tokens"]),
            str(trl_rm["tokens"]),
            f"{trl_rm['tokens'] / ours_rm['tokens']:.2f}x fewer",
        ),
        row(
            "RM epoch: forward tokens (real)",
            str(ours_rm["real_tokens"]),
            str(trl_rm["real_tokens"]),
            f"{trl_rm['real_tokens'] / ours_rm['real_tokens']:.2f}x fewer",
        ),
    ]


def commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                check=False,
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("both", "ours", "trl"), default="both")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", "/work/trl-venv/bin/python"))
    parser.add_argument("--write-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if args.side != "both":
        print(json.dumps(run_side(args.side, args.iterations)))
        return
    ours = run_subprocess(sys.executable, "ours", args.iterations)
    trl = run_subprocess(args.trl_python, "trl", args.iterations)
    rows = table(ours, trl)
    heading = (
        f"### Trainers vs TRL 1.12 (`bench/bench_trainers_trl.py`), {machine_description()}, "
        f"{ours['ppo']['threads']} intra-op thread(s), {datetime.date.today()}, commit {commit()}"
    )
    print(heading)
    print("\n".join(rows))
    print(f"\nPPO seconds per iteration, ours: {[round(s, 3) for s in ours['ppo']['seconds']]}")
    print(f"PPO seconds per iteration, TRL:  {[round(s, 3) for s in trl['ppo']['seconds']]}")
    if args.write_results:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        with open(results, "a") as handle:
            handle.write("\n" + heading + "\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
