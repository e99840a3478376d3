"""rlhf_fast's trainers side by side with TRL 1.12 on the CPU, same random model, same prompts, interleaved.

1. PPO, two cases: batch 8 x 32 new tokens and batch 32 x 64 new tokens; one PPO epoch of two minibatches,
   temperature 1, KL coefficient 0.05, on a random 2-layer, 128-wide GPT-2 with a vocabulary of 2,048 (fp32)
   for policy, reference, reward and value models. TRL: `trl.experimental.ppo.PPOTrainer` (1.12, the last
   release that ships it) with bf16 autocast and activation checkpointing off (its defaults; both slow a
   CPU), timed between `on_step_end` callbacks; its two hard-coded `gc.collect()` calls per iteration are
   timed apart, so each iteration gives a stock figure and one with the gc time excluded. rlhf_fast:
   `PPOTrainer.train()`, from the start of one iteration's rollout to the next's.
   Per-phase profile of each side (rollout, scoring, rewards+GAE, update, other): ours from the `phase(...)`
   marks of `PPOTrainer.iteration()` (`rlhf_fast.trainers.phases.PhaseTimer`), TRL's by wrapping the
   functions its `train()` calls (`batch_generation`, `forward`, `get_reward`, `gc.collect`, `log`).
   One difference in the work: rlhf_fast's reward model reads a response cut at the token limit at an eos
   appended to it (one more column in its forward, `rlhf_fast.models.ended_with_eos`); TRL's reads such a
   response at its last token.
2. Reward model: 64 prompts with K=4 ranked completions, 16 prompts (96 comparisons) per optimizer step, one
   epoch, the same model shape. rlhf_fast trains on the K-wise rankings (each completion encoded once, and
   each prompt once for its K completions: `RewardConfig.share_prompt`, the default); TRL's
   `RewardTrainer` (bf16 and activation checkpointing off) on the same rankings expanded to C(4, 2) = 6
   (chosen, rejected) pairs per prompt, 96 pairs per step.

Times are process CPU time by default (`--clock wall` for wall time): each side runs one thread, and on cores
shared with other jobs CPU time swings far less than wall time. Each side runs in a fresh interpreter (`--trl-python`, default this one when it imports trl), alternating
ours, TRL, ours, TRL (`--rounds`), so load bursts of the shared machine hit both; per round the figure is
the median iteration after warm-up, and the table gives the min and median over rounds of the ratios. Usage:

    .venv/bin/python bench/bench_trainers_trl.py [--rounds 2] [--iterations 8] [--write-results]

`--side ours|trl --case ppo-8x32|ppo-32x64|rm` runs one side of one case and prints its JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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

VOCAB = 2048
SPECIAL = ("[pad]", "[bos]", "[eos]", "[unk]")  # ids 0..3, the layout of rlhf_fast.models.build_word_tokenizer
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
PAD, EOS = 0, 2
PPO_CASES = {"ppo-8x32": (8, 32), "ppo-32x64": (32, 64)}  # name -> (prompts per iteration, new tokens)
TEMPERATURE, KL_COEF, MINIBATCHES, PPO_EPOCHS = 1.0, 0.05, 2, 1
RM_PROMPTS, RM_K, RM_PROMPTS_PER_STEP = 64, 4, 16
WARMUP_ITERATIONS = 2
PHASES = ("rollout", "score", "rewards_gae", "update", "gc", "other")
# The clock of every figure: process CPU time ("cpu", the default: each side runs one thread, and CPU time is far
# less exposed than wall time to the other jobs sharing the cores) or wall time ("wall").
CLOCK_NAME = os.environ.get("BENCH_CLOCK", "cpu")
clock = time.process_time if CLOCK_NAME == "cpu" else time.perf_counter


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


def gpt2_config(**overrides):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_layer=2,
        n_embd=128,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=EOS,
        tie_word_embeddings=True,
        **overrides,
    )


def prompt_ids(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [len(SPECIAL) + rng.randrange(len(WORDS)) for _ in range(rng.randint(4, 16))] for _ in range(count)
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


class IterationPhases:
    """Seconds per phase of each iteration (on `clock`): a new iteration starts at every "rollout"."""

    def __init__(self):
        self.iterations: list[dict[str, float]] = []
        self.starts: list[float] = []
        self._open: list[tuple[str, float]] = []

    def begin(self, name: str) -> None:
        now = clock()
        if name == "rollout":
            self.iterations.append({})
            self.starts.append(now)
        self._open.append((name, now))

    def end(self, name: str) -> None:
        opened, started = self._open.pop()
        assert opened == name, (opened, name)
        if self.iterations and "/" not in name:
            current = self.iterations[-1]
            current[name] = current.get(name, 0.0) + clock() - started


# ------------------------------------------------------------------------------------------------ ours


def ours_ppo(case: str, iterations: int, workdir: Path) -> dict:
    torch = torch_setup()
    from transformers import GPT2LMHeadModel

    from rlhf_fast import PPOConfig, PPOTrainer
    from rlhf_fast.models import PolicyModel, RewardModel
    from rlhf_fast.trainers.phases import recording

    batch, new_tokens = PPO_CASES[case]
    with torch.random.fork_rng():
        policy = PolicyModel(GPT2LMHeadModel(gpt2_config()))
        reward_model = RewardModel.from_policy(GPT2LMHeadModel(gpt2_config()))
    config = PPOConfig(
        batch_size=batch,
        num_minibatches=MINIBATCHES,
        ppo_epochs=PPO_EPOCHS,
        max_iterations=iterations + 1,  # an iteration lasts until the next one starts: the last is not timed
        max_new_tokens=new_tokens,
        temperature=TEMPERATURE,
        kl_coef=KL_COEF,
        learning_rate=3e-6,
        warmup=0,
        save_every=0,
        device="cpu",
        output_dir=str(workdir / "ours_ppo"),
        **json.loads(os.environ.get("BENCH_PPO_OVERRIDES", "{}")),
    )
    trainer = PPOTrainer(config, policy, reward_model, prompt_ids(batch * (iterations + 1)), tokenizer=tokenizer())
    phases = IterationPhases()
    with recording(phases):
        trainer.train()
    with open(workdir / "ours_ppo" / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    seconds = [b - a for a, b in itertools.pairwise(phases.starts)]
    profile = []
    for total, parts in zip(seconds, phases.iterations):
        row = {name: parts.get(name, 0.0) for name in ("rollout", "score", "rewards_gae", "update")}
        row["gc"] = 0.0
        row["other"] = total - sum(row.values())
        profile.append(row)
    mismatch = [r.get("rollout/logprob_mismatch") for r in records]
    return {"seconds": seconds, "stock_seconds": seconds, "phases": profile, "logprob_mismatch": mismatch,
            "threads": torch.get_num_threads()}


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

    def count(module, args):  # the prompt once per ranking and its completions after it (`share_prompt`)
        counts["tokens"] += args[0].numel()
        counts["real_tokens"] += int((args[0] != PAD).sum())  # PAD is no token of the data
        counts["rows"] += args[0].shape[0]

    trainer.model.register_forward_pre_hook(count)
    step_seconds = []
    train_step = trainer.train_step

    def timed_step(*args, **kwargs):
        started = clock()
        try:
            return train_step(*args, **kwargs)
        finally:
            step_seconds.append(clock() - started)

    trainer.train_step = timed_step
    trainer.train()
    with open(workdir / "ours_rm" / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    seconds = sum(step_seconds)  # every optimizer step of the epoch: collation, forward, backward, step
    return {"epoch_seconds": seconds, "steps": len(records), "threads": torch.get_num_threads(), **counts}


# ------------------------------------------------------------------------------------------------- TRL


class TRLPhases:
    """Times TRL's PPO iteration by phase, wrapping the module-level functions its `train()` calls:
    rollout = `batch_generation`; score = the no-grad `forward` / `get_reward` calls (and the log-softmax
    between them, up to the first `gc.collect`); gc = `gc.collect`; rewards_gae = from the end of the first
    gc.collect to the first forward with gradients; update = from there to `log`; other = the rest."""

    def __init__(self, module, trainer):
        self.iterations: list[dict[str, float]] = []
        self._marks: dict[str, float] = {}
        self._carried_gc = 0.0  # gc time after an iteration's `on_step_end`: charged to the next iteration
        outer = self

        def wrap(name, function):
            def wrapped(*args, **kwargs):
                started = clock()
                outer._on_begin(name, started)
                try:
                    return function(*args, **kwargs)
                finally:
                    outer._on_end(name, started, clock())

            return wrapped

        module.batch_generation = wrap("rollout", module.batch_generation)
        module.forward = wrap("forward", module.forward)
        module.get_reward = wrap("get_reward", module.get_reward)
        gc_module = module.gc

        class TimedGC:
            collect = staticmethod(wrap("gc", gc_module.collect))

        module.gc = TimedGC
        trainer.log = wrap("log", trainer.log)

    def _on_begin(self, name: str, now: float) -> None:
        import torch

        marks = self._marks
        if name == "rollout":
            self.iterations.append(dict.fromkeys(PHASES, 0.0))
            self.iterations[-1]["gc"] = self._carried_gc
            self._carried_gc = 0.0
            marks.clear()
        elif name == "forward" and torch.is_grad_enabled() and "update_start" not in marks:
            marks["update_start"] = now
            self.iterations[-1]["rewards_gae"] += now - marks.get("first_gc_end", now)
        elif name == "log" and "update_start" in marks:
            self.iterations[-1]["update"] += now - marks.pop("update_start")
            marks["updated"] = now

    def _on_end(self, name: str, started: float, now: float) -> None:

        if not self.iterations:
            return
        current, marks = self.iterations[-1], self._marks
        elapsed = now - started
        if name == "rollout":
            current["rollout"] += elapsed
            marks["score_start"] = now
        elif name == "gc" and "step_end" in marks:
            self._carried_gc += elapsed
        elif name == "gc":
            current["gc"] += elapsed
            if "first_gc_end" not in marks:
                marks["first_gc_end"] = now
                current["score"] += started - marks.get("score_start", started)

    def step_end(self) -> None:
        self._marks["step_end"] = clock()

    def finish(self, seconds: list[float]) -> list[dict[str, float]]:
        for total, row in zip(seconds, self.iterations):
            row["other"] = total - sum(value for key, value in row.items() if key != "other")
        return self.iterations


def trl_ppo(case: str, iterations: int, workdir: Path) -> dict:
    torch = torch_setup()
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    batch, new_tokens = PPO_CASES[case]
    with torch.random.fork_rng():
        policy = GPT2LMHeadModel(gpt2_config())
        reward_model = GPT2ForSequenceClassification(gpt2_config(num_labels=1))
        value_model = GPT2ForSequenceClassification(gpt2_config(num_labels=1))
    ref_model = GPT2LMHeadModel(gpt2_config())
    ref_model.load_state_dict(policy.state_dict())
    args = PPOConfig(
        output_dir=str(workdir / "trl_ppo"),
        per_device_train_batch_size=batch,  # micro-batch slices of a B/2 minibatch: one step per minibatch
        gradient_accumulation_steps=1,
        num_mini_batches=MINIBATCHES,
        num_ppo_epochs=PPO_EPOCHS,
        total_episodes=batch * iterations,
        response_length=new_tokens,
        temperature=TEMPERATURE,
        kl_coef=KL_COEF,
        learning_rate=3e-6,
        stop_token="eos",
        local_rollout_forward_batch_size=batch,
        num_sample_generations=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        seed=0,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"input_ids": prompt_ids(batch * iterations)})
    timer = _StepTimer()
    timer.on_step_end.append(lambda: phases.step_end())
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
    phases = TRLPhases(ppo_module, trainer)
    start = clock()
    trainer.train()
    stamps = [start] + timer.stamps
    stock = [b - a for a, b in itertools.pairwise(stamps)]
    profile = phases.finish(stock)
    return {"stock_seconds": stock, "seconds": [t - row["gc"] for t, row in zip(stock, profile)],
            "phases": profile, "threads": torch.get_num_threads()}


class _StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.stamps: list[float] = []
        self.on_step_end: list = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.stamps.append(clock())
                for hook in outer.on_step_end:
                    hook()

            def on_epoch_begin(self, args, state, control, **kwargs):
                outer.epoch_start = clock()

            def on_epoch_end(self, args, state, control, **kwargs):
                outer.epoch_end = clock()

        self.callback = Callback()


def trl_rm(workdir: Path) -> dict:
    torch = torch_setup()
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = GPT2ForSequenceClassification(gpt2_config(num_labels=1))
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
        bf16=False,
        gradient_checkpointing=False,
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


def run_side(side: str, case: str, iterations: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if case == "rm":
            return ours_rm(workdir) if side == "ours" else trl_rm(workdir)
        return ours_ppo(case, iterations, workdir) if side == "ours" else trl_ppo(case, iterations, workdir)


def run_subprocess(python: str, side: str, case: str, iterations: int) -> dict:
    env = dict(os.environ, RLHF_FAST_NO_PROGRESS="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1",
               TRL_EXPERIMENTAL_SILENCE="1")
    output = subprocess.run(
        [python, __file__, "--side", side, "--case", case, "--iterations", str(iterations)],
        env=env,
        check=False,  # the return code is checked below, with the side's stderr
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if output.returncode != 0:
        raise RuntimeError(f"the {side} side of {case} failed:\n{output.stderr[-4000:]}")
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


def _median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[WARMUP_ITERATIONS:])


def _median_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    rows = rows[WARMUP_ITERATIONS:]
    return {name: statistics.median(row.get(name, 0.0) for row in rows) for name in PHASES}


def ppo_rows(case: str, rounds: list[tuple[dict, dict]]) -> list[str]:
    """Table rows of one PPO case: per round the median iteration after warm-up of each side."""
    batch, new_tokens = PPO_CASES[case]
    ours = [_median_after_warmup(o["seconds"]) for o, _ in rounds]
    stock = [_median_after_warmup(t["stock_seconds"]) for _, t in rounds]
    no_gc = [_median_after_warmup(t["seconds"]) for _, t in rounds]
    ratio_gc = [t / o for t, o in zip(no_gc, ours)]
    ratio_stock = [t / o for t, o in zip(stock, ours)]
    row = (
        f"| PPO iteration, batch {batch} x {new_tokens} new tokens | {statistics.median(ours) * 1e3:.0f} ms "
        f"| {statistics.median(stock) * 1e3:.0f} ms | {statistics.median(no_gc) * 1e3:.0f} ms "
        f"| {min(ratio_gc):.2f}x / {statistics.median(ratio_gc):.2f}x "
        f"| {min(ratio_stock):.2f}x / {statistics.median(ratio_stock):.2f}x |"
    )
    return [row]


def phase_rows(case: str, rounds: list[tuple[dict, dict]]) -> list[str]:
    batch, new_tokens = PPO_CASES[case]
    rows = []
    for side, index in (("rlhf_fast", 0), ("TRL 1.12", 1)):
        per_round = [_median_phases(pair[index]["phases"]) for pair in rounds]
        medians = {name: statistics.median(r[name] for r in per_round) for name in PHASES}
        cells = " | ".join(f"{medians[name] * 1e3:.0f}" for name in PHASES)
        rows.append(f"| {batch} x {new_tokens} | {side} | {cells} |")
    return rows


def rm_rows(rounds: list[tuple[dict, dict]]) -> list[str]:
    ratios = [t["epoch_seconds"] / o["epoch_seconds"] for o, t in rounds]
    ours, trl = rounds[0]
    row = (
        f"| RM epoch, {RM_PROMPTS} prompts x K={RM_K} | "
        f"{statistics.median(o['epoch_seconds'] for o, _ in rounds) * 1e3:.0f} ms | "
        f"{statistics.median(t['epoch_seconds'] for _, t in rounds) * 1e3:.0f} ms | "
        f"{min(ratios):.2f}x / {statistics.median(ratios):.2f}x | rows {ours['rows']} (each a prompt and its "
        f"{RM_K} completions) vs {trl['rows']} (prompt + one completion), forward tokens {ours['tokens']} "
        f"(real {ours['real_tokens']}) vs {trl['tokens']} (real {trl['real_tokens']}) |"
    )
    return [row]


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


def default_trl_python() -> str:
    if "TRL_PYTHON" in os.environ:
        return os.environ["TRL_PYTHON"]
    return sys.executable if importlib.util.find_spec("trl") is not None else "/work/trl-venv/bin/python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("both", "ours", "trl"), default="both")
    parser.add_argument("--case", choices=(*PPO_CASES, "rm", "all"), default="all")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trl-python", default=default_trl_python())
    parser.add_argument("--clock", choices=("cpu", "wall"), default=CLOCK_NAME,
                        help="process CPU time (default) or wall time")
    parser.add_argument("--write-results", action="store_true", help="append the tables to bench/RESULTS.md")
    args = parser.parse_args()
    if args.side != "both":
        print(json.dumps(run_side(args.side, args.case, args.iterations)))
        return
    os.environ["BENCH_CLOCK"] = args.clock
    cases = (*PPO_CASES, "rm") if args.case == "all" else (args.case,)
    results: dict[str, list[tuple[dict, dict]]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:  # A B A B: each round runs both sides of every case back to back
            ours = run_subprocess(sys.executable, "ours", case, args.iterations)
            trl = run_subprocess(args.trl_python, "trl", case, args.iterations)
            results[case].append((ours, trl))
    heading = (
        f"### PPO and RM trainers vs TRL 1.12 (`bench/bench_trainers_trl.py`), {machine_description()}, "
        f"1 intra-op thread, {args.clock} time, {datetime.date.today()}, commit {commit()}"
    )
    lines = [heading, ""]
    ppo_cases = [case for case in cases if case in PPO_CASES]
    if ppo_cases:
        lines += [
            (
                f"{args.rounds} rounds (ours, TRL, ours, TRL), {args.iterations} iterations per run, the first "
                f"{WARMUP_ITERATIONS} warm-up; per round the median iteration; ratios min / median over rounds."
            ),
            "",
            "| case | rlhf_fast | TRL stock | TRL without gc.collect | ratio vs TRL without gc | ratio vs TRL stock |",
            "|---|---|---|---|---|---|",
        ]
        for case in ppo_cases:
            lines += ppo_rows(case, results[case])
        lines += [
            "",
            "Per-phase profile, ms (median over iterations and rounds):",
            "",
            "| case | side | " + " | ".join(PHASES) + " |",
            "|---|---|" + "---|" * len(PHASES),
        ]
        for case in ppo_cases:
            lines += phase_rows(case, results[case])
    if "rm" in cases:
        lines += ["", "| case | rlhf_fast | TRL 1.12 | ratio min / median | work |", "|---|---|---|---|---|"]
        lines += rm_rows(results["rm"])
    for case in ppo_cases:
        for index, (ours, trl) in enumerate(results[case]):
            print(f"{case} round {index}: ours {[round(s, 3) for s in ours['seconds']]}, TRL stock "
                  f"{[round(s, 3) for s in trl['stock_seconds']]}, TRL without gc {[round(s, 3) for s in trl['seconds']]}, "
                  f"mismatch {ours.get('logprob_mismatch')}")
    print("\n".join(lines))
    if args.write_results:
        results_file = Path(__file__).resolve().parent / "RESULTS.md"
        with open(results_file, "a") as handle:
            handle.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
