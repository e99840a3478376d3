"""PPO and PPO-ptx (InstructGPT §3.5, "RL"), one iteration as one function, top to bottom.

    rollout  sample responses to a batch of prompts with the current policy (with their log-probs and, with
             `rollout_logprobs`, entropy: then the policy's scoring pass below is skipped)
    score    one pass of the reference, policy, value and reward models over the [B, P+T] sequences
    rewards  −kl_coef·KL(π‖π_ref) at every response token (k1 on the sampled tokens) + the RM score at the last
    GAE      advantages and returns in one op (γ = 1, λ = 0.95 by default), advantages whitened
    update   `ppo_epochs` passes over `num_minibatches` minibatches: clipped policy and value losses (fused),
             plus for PPO-ptx `ptx_coef` × the pretraining NLL, all in one optimizer step
    metrics  device tensors, read back to the host once per iteration

The sampler is sync-free (unless `sample_stop_check_every` asks it to stop early), the ops run with value
checks off, a non-finite step is skipped on the device (fused AdamW's `found_inf`), the adaptive KL coefficient
lives on the device, and minibatch permutations come from a device generator. The models take the [B, L]
padding mask (on a GPU transformers reads the padding once per forward to pick its attention kernel).
With top-k / top-p the ratio, the KL and the entropy are those of the filtered distribution tokens are drawn
from. Each model's gradients are clipped on their own (`max_grad_norm`), both norms logged.

Distributed: each rank samples and scores its share of the prompts; the per-token results are then gathered
so that every rank holds the whole batch, GAE and whitening are global, and minibatch m is the same set of
rows as on one process, split across ranks. Losses are rescaled to the global token means, so N processes
follow the trajectory of one (exactly, when the sampling itself is deterministic, e.g. top_k=1).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_fast.models.loading import (
    Precision,
    WithoutAdapters,
    adapters_disabled,
    autocast_forward,
    load_policy,
    prepare_trained,
    reencode_for_reward,
    resolve_eos_token_id,
    resolve_pad_token_id,
    same_vocabulary,
    shared_base_value_model,
    store_frozen,
)
from rlhf_fast.models import last_token_index
from rlhf_fast.ops import gae, ppo_losses, value_checks
from rlhf_fast.rollout import sample
from rlhf_fast.trainers._common import (
    BadStepCounter,
    RunConfig,
    RunLoop,
    epoch_order,
    gradient_sync,
    guarded_step,
    make_optimizer,
    make_scheduler,
    rank_share,
    trainable_parameters,
)
from rlhf_fast.trainers._modules import PolicyLogprobs, ValueScores
from rlhf_fast.trainers.checkpoint import CheckpointManager, export_pretrained, meta_skeleton
from rlhf_fast.trainers.distributed import (
    init_distributed,
    is_fsdp,
    local_tensor,
    seed_everything,
    wrap_model,
)
from rlhf_fast.trainers.phases import phase


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
    missing_eos_penalty: float | None = None  # subtracted from the score of a response without EOS
    # CLI: a reward model whose tokenizer differs from the policy's scores decoded and re-encoded text
    # (the trainer does so whenever it is given a differing `reward_tokenizer`)
    reencode_for_reward: bool = False
    # Use the sampler's log-probs (and entropy) as the old log-probs instead of a policy forward over the
    # rollout. Off by default: the recomputed log-probs make the first ratio exactly 1 and the KL of a policy
    # equal to its reference exactly 0. Measured on a float32 CPU run (bench/RESULTS.md): mean |sampler −
    # recomputed| ≈ 2e-7 (`rollout/logprob_mismatch`, logged every iteration), and skipping the forward saves
    # about 5% of an iteration. bf16 / fp16 decode steps round differently from the batched forward.
    rollout_logprobs: bool = False
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
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"target_kl must be > 0 or None, got {self.target_kl}")
        if self.sample_stop_check_every is not None and self.sample_stop_check_every < 0:
            raise ValueError(f"sample_stop_check_every must be >= 0 or None, got {self.sample_stop_check_every}")


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float, device: torch.device):
        self.value = torch.tensor(float(kl_coef), device=device)

    def update(self, current_kl: torch.Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value.fill_(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon), on the device."""

    def __init__(self, kl_coef: float, target: float, horizon: int, device: torch.device):
        super().__init__(kl_coef, device)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: torch.Tensor, n_steps: int) -> None:
        proportional_error = torch.clamp(current_kl / self.target - 1.0, -0.2, 0.2)
        self.value.mul_(1.0 + proportional_error * (n_steps / self.horizon))


# Update metrics averaged over the optimizer steps of an iteration: key -> `ppo_losses` output (None: other).
UPDATE_METRICS = {
    "loss/policy": "policy_loss",
    "loss/value": "value_loss",
    "policy/approx_kl": "approx_kl",
    "policy/clipfrac": "clipfrac",
    "policy/ratio": "ratio_mean",
    "val/clipfrac": "value_clipfrac",
    "loss/ptx": None,
    "train/grad_norm": None,  # of policy and value together, before clipping
    "train/policy_grad_norm": None,
    "train/value_grad_norm": None,
    "train/skipped": None,
}


@dataclasses.dataclass
class Rollout:
    """One rollout batch, every field [B, ...]."""

    sequences: torch.Tensor  # [B, P+T] int64: prompt (left-padded) + response
    attention_mask: torch.Tensor  # [B, P+T] bool
    response_ids: torch.Tensor  # [B, T] int64
    response_mask: torch.Tensor  # [B, T] bool, True up to and including EOS
    logprobs: torch.Tensor  # [B, T] float32, the sampling policy's log-probs (at the sampling temperature)
    values: torch.Tensor  # [B, T] float32, the value of the state before each response token
    rewards: torch.Tensor  # [B, T] float32
    kl: torch.Tensor  # [B, T] float32, k1 estimate of KL(policy || reference) per token
    entropy: torch.Tensor  # [B, T] float32
    scores: torch.Tensor  # [B] float32, reward-model score (after the missing-EOS penalty)
    has_eos: torch.Tensor  # [B] bool

    def gathered(self, ctx) -> Rollout:
        """Every rank's rows, in rank order (all ranks must hold the same shapes)."""
        return Rollout(
            **{f.name: ctx.all_gather_rows(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def rows(self, index: torch.Tensor) -> Rollout:
        return Rollout(
            **{f.name: getattr(self, f.name).index_select(0, index) for f in dataclasses.fields(self)}
        )


def _whiten(x: torch.Tensor, valid: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    from rlhf_fast.ops.gae import whiten_masked

    whitened = whiten_masked(x, valid)
    if not shift_mean:
        mean = torch.where(valid, x, 0).sum() / valid.sum().clamp(min=1)
        whitened = torch.where(valid, whitened + mean, 0)
    return whitened


def _token_ids(prompt: Any) -> list[int]:
    """A prompt's ids: an `EncodedPrompt`, a mapping with `input_ids`, or an id sequence / 1-D tensor."""
    if isinstance(prompt, dict):
        prompt = prompt["input_ids"]
    prompt = getattr(prompt, "input_ids", prompt)
    return prompt.tolist() if isinstance(prompt, torch.Tensor) else [int(token) for token in prompt]


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0).sum() / valid.sum().clamp(min=1)


def _masked_var(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    mean = _masked_mean(x, valid)
    return _masked_mean((x - mean) ** 2, valid)


def _logprob_mismatch(
    sampled: torch.Tensor, recomputed: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) over valid tokens of |sampler log-prob − log-prob recomputed by the training forward|, 0-dim."""
    gap = torch.where(valid, (sampled - recomputed).abs(), 0.0)
    return _masked_mean(gap, valid), gap.max()


def _clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clips the gradients of one model to `max_norm` (None or <= 0: no clipping); returns the norm before."""
    limit = float("inf") if max_norm is None or max_norm <= 0 else float(max_norm)
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return torch.zeros((), device=parameters[0].device if parameters else None)
    return local_tensor(torch.nn.utils.clip_grad_norm_(with_grad, limit)).detach()


class PPOTrainer(RunLoop):
    """RLHF with PPO (and PPO-ptx) against a reward model.

    Args:
        config: `PPOConfig`.
        policy: the SFT model (`PolicyModel`, transformers causal LM, or directory); trained in place.
        reward_model: a `RewardModel` (frozen), or any module / callable `(input_ids [B, L], attention_mask
            [B, L]) -> scores [B]`.
        prompts: encoded prompts (`encode_prompts(...)` items, or token id sequences).
        ref_policy: the frozen reference; default: a copy of `policy` as given.
        value_model: default `ValueModel.from_reward_model(reward_model)` (InstructGPT), or from the policy
            when the reward model is not a `RewardModel`.
        pretrain_data: [N, L] pretraining blocks (`encode_pretrain(...).blocks`): turns on PPO-ptx.
        tokenizer: provides eos / pad ids unless given, and is saved with the final policy.
        reward_tokenizer: the reward model's tokenizer, when it differs from the policy's: each iteration's
            prompts and responses are decoded with `tokenizer` and re-encoded with it for scoring.

    Logged per iteration (metrics.jsonl, TensorBoard when importable): objective/{scores, kl (per sequence),
    kl_coef, rlhf_reward}, policy/{approx_kl, clipfrac, entropy, ratio}, loss/{policy, value, ptx},
    val/{explained_variance, clipfrac, mean}, episode/{length, eos_fraction}, train/{lr, grad_norm, skipped,
    nonfinite_rewards, response_tokens}, time/{seconds, tokens_per_second (generated tokens)}.
    """

    _progress_desc = "ppo"
    _progress_keys = ("objective/scores", "objective/kl", "policy/approx_kl", "loss/value")
    _step_name = "iteration"

    def __init__(
        self,
        config: PPOConfig,
        policy,
        reward_model,
        prompts: Sequence[Any],
        *,
        ref_policy=None,
        value_model=None,
        pretrain_data: torch.Tensor | None = None,
        tokenizer=None,
        reward_tokenizer=None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ):
        from rlhf_fast.models import RewardModel, ValueModel

        config.check()
        self.config = config
        self.ctx = ctx = init_distributed(config.device)
        seed_everything(config.seed + ctx.rank)
        if config.batch_size % (config.num_minibatches * ctx.world_size):
            raise ValueError(
                f"batch_size {config.batch_size} must be a multiple of num_minibatches × processes "
                f"= {config.num_minibatches * ctx.world_size}"
            )
        self.prompts = [_token_ids(prompt) for prompt in prompts]
        longest_prompt = max((len(p) for p in self.prompts), default=0)
        if any(not prompt for prompt in self.prompts):
            raise ValueError("prompts holds an empty prompt: every prompt needs at least one token")
        if len(self.prompts) < config.batch_size:
            raise ValueError(f"{len(self.prompts)} prompts are fewer than one batch of {config.batch_size}")
        self.tokenizer = tokenizer
        device = ctx.device
        self.static_prompt_width = longest_prompt if device.type == "cuda" else None

        # Models: the trained ones in float32 under autocast (or LoRA adapters on a frozen base), the frozen
        # ones in the compute dtype; under LoRA the reference is the policy's own base, adapters off.
        self.precision = precision = Precision.from_config(config, device)
        if precision.lora is not None and config.fsdp and ctx.is_distributed:
            raise ValueError("lora with fsdp is not supported: LoRA trains on one device or under DDP")
        self.policy = prepare_trained(load_policy(policy), precision)
        self.shares_reference = precision.lora is not None and ref_policy is None
        if self.shares_reference:
            self.ref_policy = self.policy
        else:
            self.ref_policy = load_policy(ref_policy) if ref_policy is not None else copy.deepcopy(self.policy)
            store_frozen(self.ref_policy.to(device), precision.dtype)
        self.reward_model = reward_model.to(device) if isinstance(reward_model, nn.Module) else reward_model
        if isinstance(self.reward_model, nn.Module):
            self.reward_model.requires_grad_(False).eval()
        if value_model is None and precision.lora is not None and isinstance(reward_model, RewardModel):
            store_frozen(self.reward_model, precision.dtype)
            value_model = shared_base_value_model(self.reward_model, precision)  # a LoRA head on the RM's base
        else:
            if value_model is None:  # copied before the reward model is stored in the compute dtype
                value_model = (
                    ValueModel.from_reward_model(reward_model)
                    if isinstance(reward_model, RewardModel)
                    else ValueModel.from_policy(self.policy)
                )
                value_model.requires_grad_(True)  # the copy of a frozen reward model must still train
            value_model = prepare_trained(value_model, precision)
            if isinstance(self.reward_model, RewardModel):
                store_frozen(self.reward_model, precision.dtype)
        self.value_model = value_model
        for model in (self.policy, self.ref_policy, self.value_model):
            model.eval()  # no dropout anywhere in PPO: the ratio and the KL need a deterministic forward
        self.pad_token_id = resolve_pad_token_id(pad_token_id, tokenizer, self.policy.config)
        self.eos_token_id = resolve_eos_token_id(eos_token_id, tokenizer, self.policy.config)
        # A reward model with its own tokenizer scores re-encoded text (see `score`).
        self.reward_tokenizer = reward_tokenizer
        self.reencode_for_reward = reward_tokenizer is not None and not same_vocabulary(
            reward_tokenizer, tokenizer
        )
        if self.reencode_for_reward and tokenizer is None:
            raise ValueError("reward_tokenizer differs from the policy's: pass the policy's tokenizer= too")
        self.pretrain_data = (
            None if pretrain_data is None else torch.as_tensor(pretrain_data, dtype=torch.long)
        )

        # Models as the iteration calls them: trained ones wrapped for DDP / FSDP2.
        self._skeleton = meta_skeleton(self.policy) if config.fsdp and ctx.is_distributed else None
        self.policy_module = PolicyLogprobs(self.policy)
        self.value_module = ValueScores(self.value_model)
        self.ref_module = (
            WithoutAdapters(PolicyLogprobs(self.policy), self.policy)
            if self.shares_reference
            else PolicyLogprobs(self.ref_policy)
        )
        for module in (self.policy_module, self.value_module, self.ref_module):
            autocast_forward(module, device.type, precision.dtype)
        self.reward_module = self.reward_model  # a RewardModel or any (input_ids, attention_mask) -> [B] callable
        if isinstance(self.reward_module, nn.Module):
            autocast_forward(self.reward_module, device.type, precision.dtype)
        self.policy_train = wrap_model(self.policy_module, ctx, fsdp=config.fsdp)
        self.value_train = wrap_model(self.value_module, ctx, fsdp=config.fsdp)
        if config.fsdp and ctx.is_distributed:
            wrap_model(self.ref_module, ctx, fsdp=True)
            if isinstance(self.reward_module, nn.Module):
                wrap_model(self.reward_module, ctx, fsdp=True)
        self.trained = nn.ModuleDict({"policy": self.policy_module, "value": self.value_module})
        if config.fsdp and ctx.is_distributed:
            self._initialize_fsdp_roots()
            for frozen in (self.ref_module, self.reward_module):
                if is_fsdp(frozen):  # never backpropagated: free the root's gathered weights after forward
                    frozen.set_reshard_after_forward(True, recurse=False)

        self.policy_parameters = trainable_parameters(self.policy_module)
        self.value_parameters = trainable_parameters(self.value_module)
        self.parameters = self.policy_parameters + self.value_parameters
        self.optimizer = make_optimizer(
            [
                {"params": self.policy_parameters, "lr": config.learning_rate},
                {"params": self.value_parameters, "lr": config.value_learning_rate or config.learning_rate},
            ],
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=config.adam_betas,
            eps=config.adam_eps,
            device=device,
        )
        self.iterations_per_epoch = len(self.prompts) // config.batch_size
        self.total_iterations = config.max_iterations or config.epochs * self.iterations_per_epoch
        self.scheduler = make_scheduler(
            self.optimizer,
            schedule=config.lr_schedule,
            warmup_steps=config.warmup,
            total_steps=self.total_iterations,
        )
        self.kl_controller = (
            AdaptiveKLController(config.kl_coef, config.target_kl, config.horizon, device)
            if config.target_kl is not None
            else FixedKLController(config.kl_coef, device)
        )
        # Sampling noise differs per rank; the minibatch permutation must be the same on every rank.
        self.sample_generator = torch.Generator(device=device).manual_seed(config.seed * 7919 + 17 + ctx.rank)
        self.shuffle_generator = torch.Generator(device=device).manual_seed(config.seed * 7919 + 3)
        self.checkpoints = CheckpointManager(config.output_dir, ctx)
        self.bad_steps = BadStepCounter(config.max_bad_steps, what="iteration")
        self.iteration_index = 0
        self.ptx_position = 0

    # ------------------------------------------------------------------------------------- data on the host
    def prompt_batch(self, iteration: int) -> dict[str, torch.Tensor]:
        """This rank's prompts of `iteration`, left-padded to a width shared by all ranks, on the device."""
        from rlhf_fast.data import pad_rows

        epoch, position = divmod(iteration, self.iterations_per_epoch)
        order = epoch_order(len(self.prompts), self.config.seed, epoch)
        global_rows = order[position * self.config.batch_size : (position + 1) * self.config.batch_size]
        width = self.config.max_prompt_length or self.static_prompt_width or max(
            len(self.prompts[i]) for i in global_rows)
        mine = [self.prompts[i] for i in rank_share(global_rows, self.ctx)]
        if max(len(p) for p in mine) > width:
            raise ValueError(f"a prompt is longer than max_prompt_length={width}")
        input_ids, attention_mask = pad_rows(mine, self.pad_token_id, "left", length=width)
        return {"prompt_ids": self._to_device(input_ids), "prompt_mask": self._to_device(attention_mask)}

    def pretrain_batches(self) -> torch.Tensor | None:
        """This rank's pretraining rows for every optimizer step of one iteration: [steps, rows, L] on the
        device, or None without pretraining data. Advances the pretraining cursor."""
        if self.pretrain_data is None:
            return None
        config = self.config
        steps = config.ppo_epochs * config.num_minibatches
        rows = config.ptx_batch_size or config.batch_size // config.num_minibatches
        if rows % self.ctx.world_size:
            raise ValueError(
                f"ptx_batch_size {rows} must be a multiple of the {self.ctx.world_size} processes"
            )
        total = len(self.pretrain_data)
        indices = []
        for _ in range(steps * rows):
            epoch, position = divmod(self.ptx_position, total)
            if position == 0 or not hasattr(self, "_ptx_order") or self._ptx_order[0] != epoch:
                self._ptx_order = (epoch, epoch_order(total, config.seed + 1, epoch))
            indices.append(self._ptx_order[1][position])
            self.ptx_position += 1
        blocks = self.pretrain_data[torch.tensor(indices)].view(steps, rows, -1)
        share = rows // self.ctx.world_size
        mine = blocks[:, self.ctx.rank * share : (self.ctx.rank + 1) * share]
        return self._to_device(mine.contiguous())

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.ctx.device.type == "cuda":
            return tensor.pin_memory().to(self.ctx.device, non_blocking=True)
        return tensor.to(self.ctx.device)

    # -------------------------------------------------------------------------------------------- models
    @torch.no_grad()
    def score(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward model's scores [B] float32 of the full sequences [B, P+T] (prompt left-padded, response
        up to EOS, then padding), with the value adapters off when the value model shares the RM's base.

        With a reward tokenizer of its own, the rows are decoded with the policy's tokenizer and re-encoded
        with the RM's (on the host, one batched call each way per iteration) exactly as the RM's training data
        was encoded: prompt ids + response ids (+ the RM's eos when the response ended with eos)."""
        if self.reencode_for_reward:
            sequences, attention_mask = self._reencode_for_reward(sequences, attention_mask)
        model = self.reward_model if isinstance(self.reward_model, nn.Module) else None
        with adapters_disabled(model) if model is not None else contextlib.nullcontext():
            return self.reward_module(sequences, attention_mask).float()

    def _reencode_for_reward(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P+T] policy tokens -> [B, L'] reward-model tokens (right-padded) and their mask, on the device."""
        ids, mask = reencode_for_reward(
            sequences.cpu(), attention_mask.cpu(), self.config.max_new_tokens, self.eos_token_id,
            self.tokenizer, self.reward_tokenizer,
        )  # fmt: skip
        return self._to_device(ids), self._to_device(mask)

    @torch.no_grad()
    def _initialize_fsdp_roots(self) -> None:
        """FSDP2 sets up a sharded model at the first forward through its root; the sampler calls the policy's
        blocks directly, so one tiny forward through each root comes first."""
        ids = torch.full((1, 2), self.pad_token_id, dtype=torch.long, device=self.ctx.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        for root, call in (
            (self.policy_module, lambda m: m(ids, mask, ids[:, 1:])),
            (self.ref_module, lambda m: m(ids, mask, ids[:, 1:])),
            (self.value_module, lambda m: m(ids, mask, 1)),
        ):
            call(root)
            root.reshard()  # a root keeps its weights gathered after forward; the optimizer needs the shards

    @contextlib.contextmanager
    def _sampling(self):
        """Under FSDP2 the sampler reads the policy's weights directly, outside the modules' forward hooks:
        gather every shard group around it (the whole policy is unsharded while it generates)."""
        groups = [module for module in self.policy_module.modules() if is_fsdp(module)]
        blocks = [module for module in groups if module is not self.policy_module]
        for module in blocks:  # the prefill runs the blocks' forward: keep them gathered afterwards
            module.set_reshard_after_forward(False, recurse=False)
        for module in groups:
            module.unshard()
        try:
            yield
        finally:
            for module in blocks:
                module.set_reshard_after_forward(True, recurse=False)
            for module in groups:
                module.reshard()

    # -------------------------------------------------------------------------------------- one iteration
    @property
    def rollout_logprobs(self) -> bool:
        """Whether the sampler's log-probs serve as the old log-probs (`PPOConfig.rollout_logprobs`)."""
        return self.config.rollout_logprobs

    @property
    def sample_stop_check_every(self) -> int:
        every = self.config.sample_stop_check_every
        return every if every is not None else (8 if self.ctx.device.type == "cpu" else 0)

    @property
    def _distribution(self) -> dict[str, Any]:
        """The sampling distribution the policy's log-probs are taken under (temperature, top-k, top-p)."""
        return {"temperature": self.config.temperature, "top_k": self.config.top_k, "top_p": self.config.top_p}

    def iteration(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pretrain_blocks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One PPO iteration on this rank's prompts [B_local, P]; returns metrics as 0-dim device tensors.

        `pretrain_blocks` [steps, rows, L] (PPO-ptx) holds this rank's pretraining rows for each optimizer step.
        """
        cfg, ctx = self.config, self.ctx
        with value_checks(False):  # no host sync inside the iteration
            # 1. Rollout: sample responses with the current policy (log-probs and entropy of the distribution
            #    sampled from, top-k / top-p included, computed from the logits each step already has).
            with phase("rollout"), self._sampling():
                out = sample(self.policy, prompt_ids, prompt_mask, cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                             generator=self.sample_generator, return_logprobs=True,
                             return_entropy=self.rollout_logprobs, filtered_logprobs=True,
                             stop_check_every=self.sample_stop_check_every,
                             use_cuda_graph=cfg.sample_cuda_graph)  # fmt: skip
            sequences, response_ids, response_mask = out.sequences, out.response_ids, out.response_mask
            attention_mask = torch.cat([prompt_mask.bool(), response_mask], dim=1)
            steps = response_ids.shape[1]

            # 2. Score: reference, policy (old log-probs, entropy, k1 KL), values and reward, no gradients.
            #    With `rollout_logprobs` the sampler's log-probs are the old log-probs: no policy forward.
            with torch.no_grad(), phase("score"):
                with phase("score/reference"):
                    # The reference's own (unfiltered) distribution: KL(sampling policy ‖ reference).
                    ref_logprobs = self.ref_module(sequences, attention_mask, response_ids, mask=response_mask,
                                                   temperature=cfg.temperature).logprobs  # fmt: skip
                if self.rollout_logprobs:
                    logprobs, entropy, kl = out.logprobs, out.entropy, out.logprobs - ref_logprobs
                    mismatch = None  # measured at the first minibatch, whose forward sees the same weights
                else:
                    with phase("score/policy"):
                        logprobs, entropy, kl = self.policy_module(
                            sequences, attention_mask, response_ids, mask=response_mask,
                            ref_logprobs=ref_logprobs, return_entropy=True, **self._distribution,
                        )  # fmt: skip
                    mismatch = _logprob_mismatch(out.logprobs, logprobs, response_mask)
                with phase("score/value"):
                    values = self.value_module(sequences, attention_mask, steps)
                with phase("score/reward"):
                    scores = self.score(sequences, attention_mask)

            # 3. Rewards: −β·KL at every response token, the (penalized) RM score added at the last one.
            with phase("rewards_gae"):
                has_eos = ((response_ids == self.eos_token_id) & response_mask).any(dim=1)
                if cfg.missing_eos_penalty is not None:
                    scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
                kl = torch.where(response_mask, kl, 0)
                last = last_token_index(response_mask)
                rewards = (-self.kl_controller.value * kl).scatter_add(1, last[:, None], scores[:, None])
                # From here on every rank holds the whole batch: GAE, whitening and minibatches are global.
                data = Rollout(sequences, attention_mask, response_ids, response_mask, logprobs, values, rewards,
                               kl, entropy, scores, has_eos).gathered(ctx)  # fmt: skip
                rewards_finite = torch.isfinite(data.rewards).all()
                if cfg.whiten_rewards:
                    data.rewards = _whiten(data.rewards, data.response_mask, shift_mean=False)

                # 4. GAE, advantages whitened over the valid tokens of the batch.
                advantages, returns = gae(data.rewards, data.values, data.response_mask, gamma=cfg.gamma,
                                          lam=cfg.gae_lambda, whiten=cfg.whiten_advantages)  # fmt: skip

            # 5. Minibatch epochs: one optimizer step per minibatch (policy + value + ptx).
            with phase("update"):
                sums, updates, first_mismatch = self._update(data, advantages, returns, rewards_finite,
                                                             pretrain_blocks)  # fmt: skip
            if mismatch is None:
                mismatch = first_mismatch

            # 6. Metrics, all on the device (one collective for the update metrics); the KL controller adapts.
            totals = dict(zip(sums, ctx.all_reduce_sum(torch.stack(list(sums.values()))).unbind()))
            metrics = {
                key: total if key == "train/skipped" else total / updates for key, total in totals.items()
            }
            valid = data.response_mask
            kl_per_sequence = data.kl.sum(dim=1).mean()
            returns_variance = _masked_var(returns, valid)
            explained = 1 - _masked_var(returns - data.values, valid) / returns_variance.clamp(min=1e-12)
            metrics.update({
                "objective/scores": data.scores.mean(),
                "objective/kl": kl_per_sequence,
                "objective/kl_coef": self.kl_controller.value.clone(),
                "objective/rlhf_reward": (data.scores - self.kl_controller.value * data.kl.sum(dim=1)).mean(),
                "policy/entropy": _masked_mean(data.entropy, valid),
                # Undefined when the returns are constant (e.g. every score equal and no KL yet): logged as 0.
                "val/explained_variance": torch.where(returns_variance > 0, explained, 0.0),
                "val/mean": _masked_mean(data.values, valid),
                "episode/length": valid.sum(dim=1).float().mean(),
                "episode/eos_fraction": data.has_eos.float().mean(),
                "rollout/logprob_mismatch": mismatch[0],
                "rollout/logprob_mismatch_max": mismatch[1],
                "train/nonfinite_rewards": (~rewards_finite).float(),
                "train/response_tokens": valid.sum().float(),
            })  # fmt: skip
            self.kl_controller.update(kl_per_sequence, n_steps=len(data.scores))
            return metrics

    def _update(self, data: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
                rewards_finite: torch.Tensor, pretrain_blocks: torch.Tensor | None):  # fmt: skip
        """The minibatch epochs. Returns (summed update metrics, optimizer steps, the log-prob mismatch (mean,
        max) between the rollout and the first minibatch's forward, which runs on the sampling weights)."""
        cfg, ctx = self.config, self.ctx
        sums = {key: torch.zeros((), device=ctx.device) for key in UPDATE_METRICS}
        updates = 0
        mismatch = None
        steps = data.response_ids.shape[1]
        for rows, mine in self._minibatches(len(data.scores)):
            mb = data.rows(mine)
            # Masked means over this rank's tokens, rescaled to the mean over the minibatch's tokens.
            minibatch_tokens = data.response_mask.index_select(0, rows).sum().clamp(min=1)
            token_share = mb.response_mask.sum() * ctx.world_size / minibatch_tokens

            ptx_loss = torch.zeros((), device=ctx.device)
            if pretrain_blocks is not None:
                ptx_loss = self._ptx_backward(pretrain_blocks[updates])

            new = self.policy_train(mb.sequences, mb.attention_mask, mb.response_ids, mask=mb.response_mask,
                                    **self._distribution)  # fmt: skip
            if updates == 0:
                mismatch = _logprob_mismatch(mb.logprobs, new.logprobs.detach(), mb.response_mask)
            new_values = self.value_train(mb.sequences, mb.attention_mask, steps)
            losses = ppo_losses(new.logprobs, mb.logprobs, advantages.index_select(0, mine),
                                mb.response_mask, new_values, mb.values, returns.index_select(0, mine),
                                clip_coef=cfg.clip_coef, value_clip=cfg.value_clip)  # fmt: skip
            loss = (losses["policy_loss"] + cfg.vf_coef * losses["value_loss"]) * token_share
            loss.backward()
            total = loss + cfg.ptx_coef * ptx_loss  # checked for finiteness with the gradients
            # Each model clipped on its own (InstructGPT trains the value function apart): a value-loss spike
            # cannot shrink the policy step. The step is skipped when either norm is not finite.
            policy_norm = _clip_gradients(self.policy_parameters, cfg.max_grad_norm)
            value_norm = _clip_gradients(self.value_parameters, cfg.max_grad_norm)
            norms_finite = torch.isfinite(policy_norm) & torch.isfinite(value_norm)
            _, skipped = guarded_step(
                self.optimizer, self.parameters, total, ctx, max_grad_norm=None,
                extra_bad=~(rewards_finite & norms_finite),
            )  # fmt: skip

            weight = token_share / ctx.world_size  # summed over ranks: the minibatch's token mean
            for key, name in UPDATE_METRICS.items():
                if name is not None:
                    sums[key] += losses[name].detach() * weight
            sums["loss/ptx"] += ptx_loss / ctx.world_size
            sums["train/grad_norm"] += torch.hypot(policy_norm, value_norm) / ctx.world_size
            sums["train/policy_grad_norm"] += policy_norm / ctx.world_size
            sums["train/value_grad_norm"] += value_norm / ctx.world_size
            sums["train/skipped"] += skipped / ctx.world_size
            updates += 1
        return sums, updates, mismatch

    def _minibatches(self, batch: int):
        """(rows of the minibatch, this rank's share of them) for every optimizer step of an iteration: the
        same permutation on every rank (a device generator, so no host round trip)."""
        minibatch = batch // self.config.num_minibatches
        share = minibatch // self.ctx.world_size
        for _ in range(self.config.ppo_epochs):
            order = torch.randperm(batch, generator=self.shuffle_generator, device=self.ctx.device)
            for start in range(0, batch, minibatch):
                rows = order[start : start + minibatch]
                yield rows, rows[self.ctx.rank * share : (self.ctx.rank + 1) * share]

    def _ptx_backward(self, blocks: torch.Tensor) -> torch.Tensor:
        """PPO-ptx: backpropagates ptx_coef × the pretraining NLL of `blocks` [rows, L] (gradients accumulate
        locally and are synced with the PPO loss's backward); returns the NLL, detached."""
        with gradient_sync(self.policy_train, enabled=False):
            out = self.policy_train(blocks, torch.ones_like(blocks, dtype=torch.bool), blocks[:, 1:])
            nll = -out.logprobs.mean()
            (self.config.ptx_coef * nll).backward()
        return nll.detach()

    # ---------------------------------------------------------------------------------- the run loop
    @property
    def iteration_index(self) -> int:
        """Iterations done (the run loop's step)."""
        return self.global_step

    @iteration_index.setter
    def iteration_index(self, value: int) -> None:
        self.global_step = value

    @property
    def total_steps(self) -> int:
        return self.total_iterations

    def _checkpoint_models(self) -> dict[str, nn.Module]:
        return {"policy": self.policy_module, "value": self.value_module}

    def _optimizer_model(self) -> nn.Module:
        return self.trained

    def _generators(self) -> dict[str, torch.Generator]:
        return {"sample": self.sample_generator, "shuffle": self.shuffle_generator}

    def _run_state(self) -> dict:
        return {"ptx_position": self.ptx_position, "kl_controller": self.kl_controller.state_dict()}

    def _load_run_state(self, state: dict) -> None:
        self.ptx_position = state["ptx_position"]
        self.kl_controller.load_state_dict(state["kl_controller"])

    def _run_step(self, index: int) -> dict[str, torch.Tensor]:
        prompts = self.prompt_batch(index)
        return self.iteration(prompts["prompt_ids"], prompts["prompt_mask"], self.pretrain_batches())

    def _step_problem(self, values: dict[str, float]) -> tuple[bool, str]:
        bad = values["train/nonfinite_rewards"] > 0 or values["train/skipped"] > 0
        return bad, f"{values['train/skipped']:.0f} optimizer steps skipped"

    def _step_record(self, values: dict[str, float], lr: float, seconds: float) -> dict[str, float]:
        tokens_per_second = values["train/response_tokens"] / max(seconds, 1e-9)
        return {
            **values,
            "train/lr": lr,
            "time/seconds": seconds,
            "time/tokens_per_second": tokens_per_second,
        }

    def _export(self) -> None:
        export_pretrained(
            self.policy,
            Path(self.config.output_dir) / "final",
            self.ctx,
            tokenizer=self.tokenizer,
            skeleton=self._skeleton,
            prefix="policy.",
            state_source=self.policy_module,
        )


__all__ = ["AdaptiveKLController", "FixedKLController", "PPOConfig", "PPOTrainer"]
