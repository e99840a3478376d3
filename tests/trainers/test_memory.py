"""Fitting big models: bf16 trainers learn, LoRA PPO shares its reference, a reward model with its own tokenizer,
and the memory plan against peaks measured in fresh processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import PPOConfig, PPOTrainer
from rlhf_fast.models import PolicyModel, RewardModel, build_word_tokenizer, tiny_causal_lm
from rlhf_fast.models.loading import LoRAConfig
from rlhf_fast.trainers._modules import PolicyLogprobs
from rlhf_fast.trainers.memory import Setting, largest_fitting, llama_7b_config, plan_epoch_step, plan_ppo
from tests.trainers import toy
from tests.trainers.conftest import read_jsonl

HERE = Path(__file__).parent

# ------------------------------------------------------------------------------------------------- bf16


def test_bf16_sft_learns_with_float32_master_weights(tmp_path):
    trainer = toy.make_trainer("sft", tmp_path, dtype="bfloat16", save_every=0, epochs=3)
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    before = trainer.evaluate()
    trainer.train()
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert trainer.evaluate() < before - 0.3, (before, losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses


def test_bf16_reward_model_learns(tmp_path):
    trainer = toy.make_trainer("rm", tmp_path, dtype="bfloat16", save_every=0, epochs=3)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval/accuracy"] >= 0.9, after
    assert after["eval/loss"] < before["eval/loss"] - 0.1, (before, after)


def test_bf16_ppo_raises_the_toy_reward_with_frozen_models_in_bf16(tmp_path):
    trainer = toy.make_trainer(
        "ppo",
        tmp_path,
        dtype="bfloat16",
        max_iterations=16,
        batch_size=16,
        learning_rate=3e-3,
        max_new_tokens=8,
        kl_coef=0.05,
        save_every=0,
    )
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.ref_policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.reward_model.backbone.parameters()} == {torch.bfloat16}
    trainer.train()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    scores = [r["objective/scores"] for r in records]
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.75, scores
    assert all(r["train/skipped"] == 0 for r in records)


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_ppo_trains_adapters_and_heads_and_its_reference_is_the_base(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = toy.policy()
    trainer = toy.make_trainer(
        "ppo", tmp_path, lora=LoRAConfig(r=4, alpha=8), max_iterations=3, learning_rate=1e-2, save_every=0
    )
    trained = [name for name, p in trainer.trained.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name or name.startswith("value.value_model.head.") for name in trained)
    assert any(name.startswith("value.") and "lora_" in name for name in trained)
    assert trainer.ref_policy is trainer.policy  # no second copy of the weights
    assert trainer.value_model.backbone is trainer.reward_model.backbone  # the value head rides the RM's base
    ids = trainer.prompt_batch(0)["prompt_ids"]
    mask = trainer.prompt_batch(0)["prompt_mask"]
    ended = torch.ones(len(ids), dtype=torch.bool)  # the prompts read as they are
    reward_before = trainer.score(ids, mask, ended)
    trainer.train()

    # Predictions from real tokens only: the base may run the functional forward (rlhf_fast.models.functional),
    # the adapted policy transformers' modules; the two agree at real tokens.
    real = (mask[:, :-1] & mask[:, 1:]).bool()
    with torch.no_grad():
        expected = PolicyLogprobs(base)(ids, mask, ids[:, 1:], mask=real).logprobs
        reference = trainer.ref_module(ids, mask, ids[:, 1:], mask=real).logprobs
        adapted = trainer.policy_module(ids, mask, ids[:, 1:], mask=real).logprobs
        torch.testing.assert_close(reference, expected, rtol=0, atol=0)
        assert not torch.allclose(adapted, expected, atol=1e-4)  # the adapters learned something
        torch.testing.assert_close(trainer.score(ids, mask, ended), reward_before, rtol=0, atol=0)

    # Export: the merged model in the original architecture, and the adapter alone (peft's layout).
    final = tmp_path / "final"
    with torch.no_grad():
        logits = trainer.policy.hf_model(ids, attention_mask=mask).logits
        merged = AutoModelForCausalLM.from_pretrained(final).eval()
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids, attention_mask=mask).logits, logits, rtol=1e-4, atol=1e-4)
        with_adapter = peft.PeftModel.from_pretrained(toy.policy().hf_model, final / "adapter").eval()
        torch.testing.assert_close(
            with_adapter(ids, attention_mask=mask).logits, logits, rtol=1e-4, atol=1e-4
        )


# ---------------------------------------------------------------------------------- cross-tokenizer RM


def test_a_reward_model_with_its_own_tokenizer_scores_the_re_encoded_text(tmp_path):
    policy_tokenizer = toy.tokenizer()
    # The same words in another order, plus words the policy never says: every id differs.
    reward_tokenizer = build_word_tokenizer([f"extra{i}" for i in range(5)] + list(reversed(toy.WORDS)))
    assert reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab()
    torch.manual_seed(0)
    reward_model = RewardModel.from_policy(
        PolicyModel(tiny_causal_lm("tiny", len(reward_tokenizer), max_positions=64, seed=3)),
        head_init_std=0.5,
    )
    new_tokens = 24  # long enough for some responses to end and others to be cut
    config = PPOConfig(
        batch_size=8, num_minibatches=2, max_iterations=1, max_new_tokens=new_tokens, output_dir=str(tmp_path)
    )
    trainer = PPOTrainer(
        config,
        toy.policy(),
        reward_model,
        toy.prompts(16),
        tokenizer=policy_tokenizer,
        reward_tokenizer=reward_tokenizer,
    )
    from rlhf_fast.rollout import sample

    batch = trainer.prompt_batch(0)
    generator = torch.Generator().manual_seed(1)
    out = sample(
        trainer.policy,
        batch["prompt_ids"],
        batch["prompt_mask"],
        new_tokens,
        eos_token_id=trainer.eos_token_id,
        pad_token_id=trainer.pad_token_id,
        generator=generator,
    )
    sequences = out.sequences
    mask = torch.cat([batch["prompt_mask"].bool(), out.response_mask], dim=1)
    ended = ((out.response_ids == policy_tokenizer.eos_token_id) & out.response_mask).any(dim=1)
    scores = trainer.score(sequences, mask, ended)

    assert ended.any() and not ended.all()  # both kinds of row: the eos the response holds, one appended
    expected = []
    for prompt, prompt_mask, response, response_mask in zip(
        batch["prompt_ids"], batch["prompt_mask"], out.response_ids, out.response_mask
    ):
        response = response[response_mask.bool()].tolist()
        prompt_text = policy_tokenizer.decode(prompt[prompt_mask.bool()].tolist(), skip_special_tokens=True)
        response_text = policy_tokenizer.decode(response, skip_special_tokens=True)
        ids = (
            reward_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            + reward_tokenizer(response_text, add_special_tokens=False)["input_ids"]
            + [reward_tokenizer.eos_token_id]
        )
        row = torch.tensor([ids])
        with torch.no_grad():
            expected.append(reward_model(row, torch.ones_like(row, dtype=torch.bool)))
    torch.testing.assert_close(scores, torch.cat(expected), rtol=1e-5, atol=1e-5)
    # Scoring the policy's ids as if they were the reward model's would give other scores.
    with torch.no_grad():
        assert not torch.allclose(reward_model(sequences, mask), scores, atol=1e-3)


# ----------------------------------------------------------------------------------------- memory plan

# Small GPT-2s trained for two optimizer steps on the CPU: a weight-heavy one (checkpointed, fp32; bf16 RM)
# and an activation-heavy one.
PEAK_SPECS = {
    "sft-fp32-checkpointed": dict(
        kind="sft", vocab=8192, hidden=384, layers=4, heads=6, rows=4, length=96, checkpointing=True
    ),
    "rm-bf16": dict(
        kind="rm", vocab=8192, hidden=384, layers=4, heads=6, rows=4, length=96, dtype="bfloat16"
    ),
    "sft-fp32-activations": dict(kind="sft", vocab=2048, hidden=192, layers=4, heads=4, rows=16, length=96),
}


def measured_peak(spec: dict, tmp_path) -> dict:
    """Peak RSS above the baseline of `spec`'s training steps, in a fresh process. Large allocations are
    mmapped (a fixed glibc threshold), so freed memory leaves the RSS and the peak is the live peak."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), env.get("PYTHONPATH", "")])
    spec = {**spec, "out": str(tmp_path / "run")}
    done = subprocess.run(
        [sys.executable, str(HERE / "measure_peak.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def planned_peak(spec: dict, config: dict) -> int:
    from transformers import GPT2Config

    dtype = torch.bfloat16 if spec.get("dtype") == "bfloat16" else torch.float32
    setting = Setting(dtype, "cpu", gradient_checkpointing=spec.get("checkpointing", False))
    head = "lm" if spec["kind"] == "sft" else "scalar"
    return plan_epoch_step(GPT2Config(**config), spec["rows"], spec["length"], setting, head=head).peak_bytes


@pytest.mark.parametrize("name", ["sft-fp32-checkpointed", "rm-bf16"])
def test_memory_plan_is_within_a_quarter_of_the_measured_peak(name, tmp_path):
    spec = PEAK_SPECS[name]
    measured = measured_peak(spec, tmp_path)
    ratio = planned_peak(spec, measured["config"]) / measured["peak"]
    assert 0.75 <= ratio <= 1.25, (name, ratio, measured["peak"])


@pytest.mark.slow
def test_activation_heavy_plan_and_checkpointing_lower_the_measured_peak(tmp_path):
    spec = PEAK_SPECS["sft-fp32-activations"]
    plain = measured_peak(spec, tmp_path)
    ratio = planned_peak(spec, plain["config"]) / plain["peak"]
    assert 0.75 <= ratio <= 1.25, ratio
    checkpointed = measured_peak({**spec, "checkpointing": True}, tmp_path)
    assert checkpointed["peak"] < 0.85 * plain["peak"], (checkpointed["peak"], plain["peak"])


def test_plan_scales_as_the_arithmetic_says():
    config = llama_7b_config()
    full = Setting(torch.bfloat16, "cuda")
    plan = plan_epoch_step(config, 1, 1024, full)
    params = 6_738_415_616
    resident = dict(plan.resident)
    assert resident["model weights (fp32 master)"] == 4 * params
    assert resident["model AdamW state (fp32)"] == 8 * params
    sharded = plan_epoch_step(config, 1, 1024, Setting(torch.bfloat16, "cuda", world_size=8, fsdp=True))
    assert dict(sharded.resident)["model AdamW state (fp32)"] == 8 * params // 8

    # Activations grow with the rows; checkpointing keeps far fewer of them.
    def activations(p):
        return dict(p.phases)["forward/backward"][0][1]

    assert activations(plan_epoch_step(config, 8, 1024, full)) == 8 * activations(plan)
    wide = plan_epoch_step(config, 8, 1024, full)
    checkpointed = plan_epoch_step(
        config, 8, 1024, Setting(torch.bfloat16, "cuda", gradient_checkpointing=True)
    )
    assert activations(checkpointed) < activations(wide) / 4
    assert checkpointed.peak_bytes < wide.peak_bytes


def test_lora_ppo_of_a_7b_model_fits_one_141_gb_gpu_and_the_largest_batch_is_found():
    config = llama_7b_config()
    ppo = PPOConfig(batch_size=64, num_minibatches=8, max_new_tokens=512)
    lora = Setting(torch.bfloat16, "cuda", gradient_checkpointing=True, lora=LoRAConfig(r=16, alpha=32))
    plan = plan_ppo(config, config, ppo, 512, lora)
    device = 139 * 1024**3
    assert plan.peak_bytes < device
    full = plan_ppo(config, config, ppo, 512, Setting(torch.bfloat16, "cuda", gradient_checkpointing=True))
    assert full.peak_bytes > device  # a full fine-tune of four 7B models does not fit one GPU

    def make(batch):
        return plan_ppo(config, config, dataclasses.replace(ppo, batch_size=batch), 512, lora)

    largest = largest_fitting(make, device, step=8, limit=4096)
    assert largest % 8 == 0 and largest >= 64
    assert make(largest).peak_bytes <= device < make(largest + 8).peak_bytes


def test_dry_run_prints_the_plan_and_the_largest_batch_without_loading_weights(tmp_path, capsys, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_fast.cli.app import main
    from rlhf_fast.trainers.memory import gib
    from tests.cli.conftest import build_causal_lm_dir, prompts, write_lines

    model_dir = build_causal_lm_dir(tmp_path / "lm")
    reward_dir = tmp_path / "rm"
    RewardModel.from_policy(str(model_dir)).save_pretrained(
        reward_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir)
    )
    data = write_lines(tmp_path / "prompts.jsonl", prompts(16))

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    for name in ("from_pretrained", "from_policy", "from_causal_lm"):
        monkeypatch.setattr(RewardModel, name, refuse)
    monkeypatch.setattr(PolicyModel, "from_pretrained", refuse)
    code = main(
        [
            "ppo",
            "--policy",
            str(model_dir),
            "--reward",
            str(reward_dir),
            "--prompts",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--dry-run",
            "--device-memory",
            "0.02",
            "--set",
            "batch_size=8",
            "--set",
            "num_minibatches=2",
            "--set",
            "max_new_tokens=8",
            "--set",
            "dtype=bfloat16",
            "--set",
            "gradient_checkpointing=true",
            "--set",
            "lora.r=4",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    config = AutoConfig.from_pretrained(model_dir)
    ppo = PPOConfig(batch_size=8, num_minibatches=2, max_new_tokens=8)
    setting = Setting(torch.bfloat16, "cpu", gradient_checkpointing=True, lora=LoRAConfig(r=4))
    prompt_limit = config.n_positions - 8
    plan = plan_ppo(config, config, ppo, prompt_limit, setting)
    assert "memory plan: ppo" in out and "LoRA r=4" in out
    assert (
        f"peak per device {'':<42}{gib(plan.peak_bytes):>10}".split()
        == [line for line in out.splitlines() if "peak per device" in line][0].split()
    )
    largest = largest_fitting(
        lambda batch: plan_ppo(
            config, config, dataclasses.replace(ppo, batch_size=batch), prompt_limit, setting
        ),
        0.02 * 1024**3,
        step=2,
    )
    assert f"largest batch_size (prompts per iteration) that fits: {largest}" in out


def test_lora_reward_model_learns_and_exports_merged_with_its_offset(tmp_path):
    pytest.importorskip("peft")
    trainer = toy.make_trainer(
        "rm", tmp_path, lora=LoRAConfig(r=4, alpha=8), learning_rate=1e-2, save_every=0
    )
    trained = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name or name.startswith("head.") for name in trained)
    before = trainer.evaluate()
    trainer.train()
    assert trainer.evaluate()["eval/loss"] < before["eval/loss"] - 0.1
    saved = RewardModel.from_pretrained(tmp_path / "final").eval()
    assert saved.normalization_bias == pytest.approx(trainer.model.normalization_bias)
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 6, 7, 2], [0, 8, 9, 2]])
    mask = ids != 0
    with torch.no_grad():
        torch.testing.assert_close(saved(ids, mask), trainer.model(ids, mask), rtol=1e-5, atol=1e-5)


def test_export_loads_strictly_a_missing_key_is_an_error():
    from rlhf_fast.trainers.export import load_strictly

    model = toy.policy()
    state = dict(model.state_dict())
    load_strictly(copy_of(model), state, what="state")  # a tied weight under one name is enough
    state.pop("hf_model.lm_head.weight")
    load_strictly(copy_of(model), state, what="state")
    state.pop("hf_model.transformer.h.0.mlp.c_fc.weight")
    with pytest.raises(ValueError, match=r"missing \['hf_model.transformer.h.0.mlp.c_fc.weight'\]"):
        load_strictly(copy_of(model), state, what="state")


def copy_of(model):
    import copy

    return copy.deepcopy(model)
