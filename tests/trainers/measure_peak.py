"""Peak host memory of training steps, measured in a fresh process (run as a script by test_memory.py).

    python tests/trainers/measure_peak.py '{"kind": "sft", "rows": 4, "length": 128, ...}'

Imports and data come first; then the peak-RSS counter (VmHWM) is reset (`/proc/self/clear_refs` 5) and the
baseline RSS read; then the model is built and `steps` optimizer steps run. Prints JSON: the bytes of the peak
above the baseline, and the model config, for the plan to be computed from.
"""

from __future__ import annotations

import gc
import json
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(spec: dict) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_fast import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
    from rlhf_fast.data import SFTExample
    from rlhf_fast.data.encode import EncodedRanking

    torch.set_num_threads(1)
    config = GPT2Config(
        vocab_size=spec["vocab"],
        n_positions=spec["length"],
        n_embd=spec["hidden"],
        n_layer=spec["layers"],
        n_head=spec["heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    rows, length, steps = spec["rows"], spec["length"], spec.get("steps", 2)
    generator = torch.Generator().manual_seed(0)
    common = dict(
        learning_rate=1e-4,
        batch_size=rows,
        epochs=1,
        save_every=0,
        output_dir=spec["out"],
        dtype=spec.get("dtype", "float32"),
        gradient_checkpointing=spec.get("checkpointing", False),
        device="cpu",
    )
    if spec["kind"] == "sft":
        data = [
            SFTExample(torch.randint(4, spec["vocab"], (length,), generator=generator).tolist(), 1, None)
            for _ in range(rows * steps)
        ]
    else:  # rm: each prompt with K = 2 completions; rows = prompts × 2 sequences
        prompts = rows // 2
        data = [
            EncodedRanking(
                [5],
                tuple(
                    torch.randint(4, spec["vocab"], (length - 1,), generator=generator).tolist()
                    for _ in range(2)
                ),
                (0, 1),
                None,
            )
            for _ in range(prompts * steps)
        ]
    def run(config: GPT2Config, data: list, steps: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GPT2LMHeadModel(config)
        if spec["kind"] == "sft":
            trainer = SFTTrainer(SFTConfig(**common, residual_dropout=None), model, data, pad_token_id=0)
        else:
            trainer = RewardTrainer(
                RewardConfig(**{**common, "batch_size": rows // 2}), model, data, pad_token_id=0
            )
        del model
        order = list(range(len(data)))
        per_step = len(data) // steps
        for step in range(steps):
            trainer._train_batch(order[step * per_step : (step + 1) * per_step])

    # One step of a one-layer copy first: lazy imports and one-time set-up (the math library, the extension's
    # ops, autograd's checkpointing) happen before the baseline, so the peak is the training step's alone.
    run(GPT2Config(**{**config.to_dict(), "n_layer": 1, "n_embd": 32, "n_head": 2}), data[: len(data) // steps], 1)
    gc.collect()

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    baseline = _status("VmRSS")
    run(config, data, steps)
    return {"peak": _status("VmHWM") - baseline, "config": config.to_dict()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
