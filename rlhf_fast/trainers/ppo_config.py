"""`PPOConfig`: the PPO / PPO-ptx hyperparameters and their checks."""

from __future__ import annotations

import dataclasses

from rlhf_fast.trainers.run_config import RunConfig


@dataclasses.dataclass
class PPOConfig(RunConfig):
    """PPO / PPO-ptx hyperparameters, named as in InstructGPT and CleanRL.

    PPO-ptx is on when the trainer is given pretraining data. `ptx_coef` multiplies the per-token mean NLL
    of `ptx_batch_size` pretraining rows (every token of each block), added to the PPO loss of each optimizer
    step, whose policy term is itself a per-token mean. The paper's γ = 27.8 multiplies the log-likelihood of
    its pretraining batch in an objective whose RL term is per episode, so the two numbers have different units:
    27.8 is the default for fidelity, not a value known to transfer; tune it against the alignment tax.
    """

    learning_rate: float = 9.65e-6
    value_learning_rate: float | None = None  # None: learning_rate
    # The learning rate of the policy's output-norm gain (`PolicyModel.output_norm`), which sets how sharp its
    # next-token distributions are, as a sampling temperature does. Adam moves each parameter by at most about
    # its learning rate per step, whatever the parameter's size, so at a fine-tuning rate a gain near 1 barely
    # moves in a run (the demo: 0.5% in 360 steps at 1e-4) and PPO cannot make the policy surer of what the
    # reward model pays for. None: learning_rate. Not with LoRA, which freezes the gain.
    output_norm_learning_rate: float | None = None
    batch_size: int = 512  # prompts (episodes) per iteration, over all processes
    num_minibatches: int = 8
    ppo_epochs: int = 4
    epochs: int = 1  # passes over the prompt set (ignored when max_iterations is set)
    max_iterations: int | None = None
    warmup: int = 10  # iterations of linear LR warmup
    lr_schedule: str = "constant"
    max_new_tokens: int = 64
    # Left-pad prompts to this width. None: on CUDA the longest prompt of the set (static shapes, so the sampler's
    # CUDA graph is captured once), on a CPU the longest of each batch.
    max_prompt_length: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Replay the sampler's decode step as a CUDA graph (None: on CUDA). The graph is captured (a device sync) at
    # the first iteration with a new prompt width and reused after.
    sample_cuda_graph: bool | None = None
    kl_coef: float = 0.02  # β
    target_kl: float | None = (
        None  # set: adaptive KL controller (Ziegler et al.) towards this KL per sequence
    )
    horizon: int = 10000  # the adaptive controller's horizon, in episodes
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ptx_coef: float = 27.8  # γ of PPO-ptx: × per-token mean NLL over ptx_batch_size rows (see above)
    ptx_batch_size: int | None = (
        None  # pretraining rows per optimizer step, all processes; None: minibatch size
    )
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    # Subtracted from the score of a response cut at max_new_tokens (no EOS); the reward model reads such a
    # response at an EOS appended to it either way (`PPOTrainer.score`)
    missing_eos_penalty: float | None = None
    # CLI: a reward model whose tokenizer differs from the policy's scores decoded and re-encoded text
    # (the trainer does so whenever it is given a differing `reward_tokenizer`)
    reencode_for_reward: bool = False
    # Use the sampler's log-probs (and entropy) as the old log-probs instead of a policy forward over the
    # rollout. None (default): on when the models compute in float32, where the sampler's decode steps agree
    # with the batched forward to rounding (mean |sampler − recomputed| ≈ 2e-7, `rollout/logprob_mismatch`,
    # logged every iteration) and skipping the forward saves about a tenth of an iteration (bench/RESULTS.md);
    # off in bfloat16 / float16, whose decode steps round differently from the batched forward. False keeps
    # the recomputed log-probs: then the first ratio is exactly 1 and the KL of a policy equal to its
    # reference exactly 0.
    rollout_logprobs: bool | None = None
    # The sampler reads back whether every row has ended every this many decode steps and stops early
    # (one host synchronization each time). None: 8 on a CPU (a read costs nothing there), 0 on a GPU
    # (0 = never: the decode loop stays free of host synchronization).
    sample_stop_check_every: int | None = None
    output_dir: str = "runs/ppo"

    def check(self) -> None:
        super().check()
        for name in ("batch_size", "num_minibatches", "ppo_epochs", "epochs", "max_new_tokens", "horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of num_minibatches {self.num_minibatches}"
            )
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"gamma and gae_lambda must be in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.output_norm_learning_rate is not None and not self.output_norm_learning_rate > 0:
            raise ValueError(
                f"output_norm_learning_rate must be > 0 or None, got {self.output_norm_learning_rate}"
            )
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"target_kl must be > 0 or None, got {self.target_kl}")
        if self.sample_stop_check_every is not None and self.sample_stop_check_every < 0:
            raise ValueError(
                f"sample_stop_check_every must be >= 0 or None, got {self.sample_stop_check_every}"
            )
