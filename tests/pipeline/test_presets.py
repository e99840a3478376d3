"""Presets: per-size fields resolve per model size; SFT mixes in the pretraining blocks a preset asks for."""

import pytest

import rlhf_fast.trainers
from rlhf_fast.pipeline import get_preset
from rlhf_fast.pipeline.demo import finetune_sft_model, make_world
from rlhf_fast.pipeline.stages import Stages, stage_keys


def test_per_size_fields_take_one_value_or_one_per_size():
    preset = get_preset("smoke").replace(
        model_sizes=("tiny", "small"), pretrain_steps={"tiny": 7, "small": 9}, pretrain_learning_rate=1e-3
    )
    assert [preset.per_size("pretrain_steps", size) for size in ("tiny", "small")] == [7, 9]
    assert [preset.per_size("pretrain_learning_rate", size) for size in ("tiny", "small")] == [1e-3, 1e-3]
    with pytest.raises(ValueError, match="pretrain_steps has no value for size 'small'"):
        preset.replace(pretrain_steps={"tiny": 8}).per_size("pretrain_steps", "small")


def test_sft_mixes_in_the_share_of_pretraining_blocks_the_preset_asks_for(tmp_path, monkeypatch):
    seen = {}

    class RecordingTrainer:
        def __init__(self, config, policy, train_data, **kwargs):
            seen[config.output_dir] = list(train_data)

        def train(self):
            return {}

    monkeypatch.setattr(rlhf_fast.trainers, "SFTTrainer", RecordingTrainer)
    preset = get_preset("smoke").replace(model_sizes=("tiny", "small"), sft_pretrain_mix=0.5)
    run = make_world(preset, 0, tmp_path, Stages(lambda line: None, fresh=True))
    for size in preset.model_sizes:
        finetune_sft_model(run, size)
    demonstrations = [(e.input_ids, e.prompt_length) for e in run.demonstrations.examples]
    blocks = {tuple(block.tolist()) for block in run.pretrain.blocks}
    for size in ("tiny", "small"):
        data = [(e.input_ids, e.prompt_length) for e in seen[str(tmp_path / f"sft-{size}")]]
        assert data[: len(demonstrations)] == demonstrations
        mixed = data[len(demonstrations) :]
        assert len(mixed) == round(0.5 * len(demonstrations)) == len({tuple(ids) for ids, _ in mixed})
        assert all(tuple(ids) in blocks and prompt_length == 1 for ids, prompt_length in mixed)
    assert seen[str(tmp_path / "sft-tiny")] == seen[str(tmp_path / "sft-small")]  # one draw for every size
    assert stage_keys(preset, 0, run.paths, run.world.vocabulary())["sft-tiny"]["pretrain_mix"] == 0.5
