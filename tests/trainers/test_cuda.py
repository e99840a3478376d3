"""On a GPU one PPO iteration makes no host synchronization: its metrics stay on the device and are read once,
outside the checked region. Run with `pytest -m cuda` on the GPU machine."""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainers import toy


@pytest.mark.cuda
@pytest.mark.parametrize("ptx", [False, True])
def test_ppo_iteration_makes_no_host_sync(tmp_path, ptx):
    # The sampler captures a fresh CUDA graph per call and graph capture synchronizes the device, so this
    # checks the iteration with the sampler's eager (also sync-free) decode loop.
    trainer = toy.make_trainer("ppo", tmp_path, device="cuda", sample_cuda_graph=False, target_kl=1.0)
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
    metrics = run_iteration(1)  # warmed up: lazy initialization and autotuning are done
    values = torch.stack(list(metrics.values())).tolist()  # the one read
    named = dict(zip(metrics, values))
    assert all(math.isfinite(v) for v in values), named
    assert named["train/skipped"] == 0.0
    assert (named["loss/ptx"] > 0) == ptx
