"""On a GPU one PPO iteration makes no host synchronization: its metrics stay on the device and are read once,
outside the checked region. Run with `pytest -m cuda` on the GPU machine."""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainers import toy


@pytest.mark.cuda
@pytest.mark.parametrize("ptx", [False, True])
def test_ppo_iteration_makes_no_host_sync(tmp_path, ptx, monkeypatch):
    # The sampler's decode step is a CUDA graph (the default on CUDA), captured once per prompt width: with a fixed
    # max_prompt_length the first iteration captures it (capture synchronizes) and the second only replays it.
    from rlhf_fast.rollout import clear_graphs, sampler

    captures = []
    capture = sampler._capture_decode_step
    monkeypatch.setattr(sampler, "_capture_decode_step", lambda *args: captures.append(1) or capture(*args))
    trainer = toy.make_trainer("ppo", tmp_path, device="cuda", max_prompt_length=8, target_kl=1.0)
    clear_graphs()
    if not ptx:
        trainer.pretrain_data = None

    def run_iteration(index):
        prompts = trainer.prompt_batch(index)
        pretrain = trainer.pretrain_batches()
        torch.cuda.synchronize()  # the inputs are on the device before the checked region starts
        torch.cuda.set_sync_debug_mode("error")
        try:
            return trainer.iteration(prompts["prompt_ids"], prompts["prompt_mask"], pretrain)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    trainer.iteration(
        **{k: v for k, v in trainer.prompt_batch(0).items()}, pretrain_blocks=trainer.pretrain_batches()
    )
    metrics = run_iteration(1)  # warmed up: lazy initialization, autotuning and graph capture are done
    assert len(captures) == 1, "the second iteration replays the graph the first one captured"
    clear_graphs()
    values = torch.stack(list(metrics.values())).tolist()  # the one read
    named = dict(zip(metrics, values))
    assert all(math.isfinite(v) for v in values), named
    assert named["train/skipped"] == 0.0
    assert (named["loss/ptx"] > 0) == ptx
