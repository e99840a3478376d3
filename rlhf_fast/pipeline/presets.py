"""Presets of the InstructGPT miniature: how big the world, the models and each training stage are.

`quick` fits a 2-core CPU in about nine minutes (the goal: ten); `paper` scales the same pipeline
up for a GPU; `smoke` is the smallest run that goes through every stage (tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class DemoPreset:
    """Every knob of `run_demo`. Per-size fields (`pretrain_steps`, `pretrain_learning_rate`) take one value
    for every size or a {size: value} mapping."""

    name: str
    model_sizes: tuple[str, ...]  # rlhf_fast.models.tiny.TINY_SIZES, smallest first
    world: dict[str, Any]  # rlhf_fast.world.WorldSizes fields
    corpus: dict[str, Any] = dataclasses.field(default_factory=dict)  # rlhf_fast.world.CorpusOptions fields
    max_positions: int = 96
    # pretraining: loss on every token of the generated corpus
    pretrain_block_size: int = 64
    pretrain_steps: int | Mapping[str, int] = 300
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float | Mapping[str, float] = 3e-3
    # SFT on demonstrations
    sft_epochs: int = 4
    sft_batch_size: int = 32
    sft_learning_rate: float = 1e-3
    # Pretraining blocks mixed into SFT's data, per demonstration (InstructGPT's SFT: none). The quick
    # preset's SFT forgets the corpus without them; docs/demo-seeds.md has what mixing them in does.
    sft_pretrain_mix: float = 0.0
    max_length: int = 64
    # the reward model: K samples per prompt from the SFT models, ranked by simulated training labelers
    rm_size: str | None = None  # the size of the RM's backbone; default: the largest size
    # The RM's backbone: the rm_size base model pretrained this many steps more (from its weights, on a
    # schedule of its own), then SFT as the policies; a model of its own, as InstructGPT's 6B RM served every
    # policy. 0: the RM starts from the rm_size policy's SFT model.
    rm_pretrain_steps: int = 0
    rm_sample_sizes: tuple[str, ...] | None = None  # SFT models whose samples are ranked; default: every size
    rm_min_k: int = 4
    rm_max_k: int = 9
    rm_epochs: int = 2
    rm_batch_size: int = 16
    rm_learning_rate: float = 5e-4
    rm_sample_temperature: float = 1.0
    # PPO and PPO-ptx
    ppo_iterations: int = 20
    ppo_batch_size: int = 32
    ppo_minibatches: int = 2
    ppo_epochs: int = 2
    ppo_learning_rate: float = 2e-4
    ppo_output_norm_learning_rate: float | None = None  # PPOConfig.output_norm_learning_rate
    kl_coef: float = 0.02
    ptx_coef: float = 1.0
    max_new_tokens: int = 12
    # PPO from the largest SFT model against the training labelers' own utility (`rlhf_fast.world.LabelerReward`)
    # instead of the RM, otherwise as PPO: what PPO makes of a perfect reward model in the same budget
    oracle_ppo: bool = True
    # evaluation: held-out customers' prompts, judged by held-out labelers
    eval_prompts: int = 200
    eval_temperature: float = 1.0  # labelers judge samples at this temperature; 0 = greedy
    eval_batch_size: int = 128
    # the largest SFT model's best of this many samples by the RM, judged beside the trained models (< 2: off)
    eval_best_of: int = 4
    rm_comparison_prompts: int = 200  # held-out prompts with 3 SFT samples each (3 pairs) for RM agreement
    device: str = "auto"

    def replace(self, **changes: Any) -> DemoPreset:
        return dataclasses.replace(self, **changes)

    def per_size(self, field: str, size: str) -> Any:
        """The value of a per-size field for `size`."""
        value = getattr(self, field)
        if isinstance(value, Mapping):
            if size not in value:
                raise ValueError(f"preset {self.name!r}: {field} has no value for size {size!r}")
            return value[size]
        return value


# The presets stay compact, a group of related settings per line, so each one reads in a few lines.
# fmt: off
PRESETS: dict[str, DemoPreset] = {
    "smoke": DemoPreset(
        name="smoke",
        model_sizes=("tiny",),
        world={"pretrain_documents": 300, "qa_benchmark": 40, "demonstrations": 96, "rm_prompts": 48,
               "ppo_prompts": 64, "heldout_prompts": 32, "probes": 16, "customers": 12, "labelers": 6,
               "heldout_labelers": 2},
        pretrain_steps=6, pretrain_batch_size=8, sft_epochs=1, sft_batch_size=16, rm_epochs=1, rm_batch_size=8,
        rm_max_k=5, rm_pretrain_steps=4, ppo_iterations=2, ppo_batch_size=16, ppo_minibatches=2, ppo_epochs=1,
        max_new_tokens=6,
        eval_prompts=32, eval_batch_size=32, rm_comparison_prompts=16,
    ),
    "quick": DemoPreset(
        name="quick",
        model_sizes=("tiny", "small"),
        world={"pretrain_documents": 6000, "qa_benchmark": 200, "demonstrations": 2500, "rm_prompts": 12000,
               "ppo_prompts": 1200, "heldout_prompts": 1000, "probes": 150},
        corpus={"transform_weight": 0.4, "scene_weight": 0.15, "qa_weight": 0.2, "fact_weight": 0.15,
                "social_weight": 0.1},
        # Short blocks: twice the optimizer steps for the same compute; copying (every task but "continue"
        # needs it) forms with steps, and a unit of the corpus fits in 32 tokens. The small model at 3,000
        # steps learns the tasks better (SFT task score 0.77-0.83 on seeds 0-2, here 0.55-0.73) and its reward
        # model closes 0.02-0.04 of the gap to the labelers, but PPO-ptx (small) then falls below SFT and the
        # demo takes longer; measured, not applied (docs/demo-seeds.md).
        pretrain_block_size=32, pretrain_steps={"tiny": 3000, "small": 1500}, sft_epochs=8,
        # The RM learns from 12,000 ranked prompts (the paper: 33,000): on seed 0 its held-out agreement was
        # 0.73 from 4,000 prompts (four passes), 0.77 from 8,000, 0.79 from 12,000 (three or four passes); a
        # learning rate of 2.5e-4 gives the same, 1e-3 0.73, dropout 0.1 0.70. It underfits (its training
        # rankings hardly better than held-out ones), and its backbone is the lever: an SFT model of its own,
        # from the small base model pretrained 1,500 steps more. Trained alone on the same rankings (seeds 0 /
        # 1 / 2), its gap to the labelers' agreement was -0.049 / -0.037 / -0.048 (validation accuracy 0.780 /
        # 0.754 / 0.754), from the small policy's SFT model -0.070 / -0.079 / -0.121 (0.748 / 0.738 / 0.710);
        # a small model pretrained 3,000 steps from scratch -0.073 (0.755) on seed 0. In the demo (three
        # passes): -0.056 / -0.031 / -0.038, 17 / 18 / 18 targets where the policy's SFT model gave 17 / 17 /
        # 17. The validation accuracy still rises with every pass; trained alone, four passes gave -0.047 /
        # -0.023 / -0.030 (0.788 / 0.775 / 0.775; in the demo every target on every seed), five -0.037 / -0.015
        # / -0.025 (0.795 / 0.786 / 0.790), six -0.034 / - / -0.018 on seeds 0 / 2: five, a pass costing about
        # 25 s; two lose 0.005-0.03 of accuracy (docs/demo-seeds.md).
        rm_pretrain_steps=1500,
        rm_epochs=5, rm_batch_size=8,
        # PPO's settings were measured with the RM of 4,000 prompts. Batches of 64 halve the gradient's
        # variance, whose noise let the policy drift (KL 3-4 nats without gain), and kl_coef 0.2 prices a word
        # off the SFT distribution above what the RM pays for it; measured, each alone helps less than both.
        # 90 iterations (3x the 30 this preset had while OpenMP waited passively, at the same wall time):
        # 14 / 13 / 12 targets on seeds 0-2 where 30 met 10 / 13 / 12, PPO (tiny)'s win rate up 0.01-0.05 on
        # every seed, the alignment tax on seeds 0 and 2, no degenerate samples. Against the labelers' own
        # utility (oracle_ppo) PPO won no more than against the RM: PPO, not the RM, held its win rate (until
        # the output-norm learning rate below; docs/demo-seeds.md).
        # ptx_coef 0.3. With 12 labelers (4 held out) 0.1 recovered at least half of PPO's QA regression on
        # seeds 0 and 1 and 0.3 cost PPO-ptx 0.05-0.1 of win rate. With 40 labelers (10 held out) PPO ends
        # most answers with a polite closing, the QA benchmark's answers too ("brown thanks"), and its exact
        # match falls to 0.00-0.08; at 0.1 PPO-ptx recovered 2% / 39% / 74% of it on seeds 0-2, at 0.3 90% /
        # 99% / 92%, winning 0.59 / 0.52 / 0.57 against SFT (PPO 0.66 / 0.61 / 0.59; at 0.1 0.61 / 0.57 / 0.54).
        # The demo then met 17 / 16 / 16 targets on seeds 0-2, 17 / 15 / 16 once the reward model's trainer
        # rounded differently (the same math; PPO (small)'s win rate moves by up to 0.04 with such noise) and
        # 17 / 17 / 17 with the stages side by side on one thread each (another rounding; docs/demo-seeds.md).
        # The policy's output-norm gain learns at 300x PPO's rate. At 1e-4 Adam moves it at most 0.036 in
        # the 360 steps (it moved 0.006, from 1.29): the policy could not sharpen towards what the RM pays
        # for. PPO (small) against SFT on seeds 0-2 (three draws of 300 held-out prompts): 0.566 / 0.533 /
        # 0.544 with the gain at 1e-4, 0.559 / 0.541 / 0.566 at 3e-3, 0.614 / 0.541 / 0.582 at 1e-2, 0.678 /
        # 0.566 / 0.600 at 3e-2 (the gain 1.3 -> 1.9-2.0, the task score +0.05 to +0.09, the KL to SFT the
        # same), 0.673 / 0.575 / 0.611 at 1e-1 (some gains flip sign); every norm's gain at 1e-2: 0.580 /
        # 0.527 / 0.568. In the demo 3e-2 meets 17 / 15 / 16 targets (13 / 12 / 14). With it, KL 0.1 gives
        # 0.704 / 0.584 / 0.604 but no alignment tax on seed 1; 135 iterations 0.560 on seed 1. PPO-ptx
        # (small) then wins 0.03-0.12 less than PPO: its pretraining term holds the gain at 1.4-1.6 (PPO 1.9-2.1).
        # With 40 labelers KL 0.1 lets PPO hack the RM on seed 2 (KL 24-32 nats, PPO (small) wins 0.23).
        ppo_output_norm_learning_rate=3e-2,
        ppo_iterations=90, ppo_batch_size=64, ppo_learning_rate=1e-4, kl_coef=0.2, ptx_coef=0.3,
        # 1,000 held-out prompts: the closed-domain ones (hallucination) number about 200, not 65. The RM's
        # agreement is measured on pairs of samples for 1,000 of them: from 200, the standard error of its gap
        # to the labelers was 0.016-0.019, and two RMs of the same validation accuracy were 0.036 apart.
        eval_prompts=1000, rm_comparison_prompts=1000,
    ),
    "paper": DemoPreset(
        name="paper",
        model_sizes=("tiny", "small", "base"),
        world={"pretrain_documents": 60000, "qa_benchmark": 500, "demonstrations": 8000, "rm_prompts": 4000,
               "ppo_prompts": 8000, "heldout_prompts": 1000, "probes": 300},
        max_positions=128,
        pretrain_steps=3000, pretrain_batch_size=64, sft_epochs=8, rm_epochs=1, rm_batch_size=32,
        ppo_iterations=200, ppo_batch_size=128, ppo_minibatches=4, ppo_epochs=4, max_new_tokens=16,
        eval_prompts=1000, rm_comparison_prompts=1000,
    ),
}
# fmt: on


def get_preset(name: str) -> DemoPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}") from None
