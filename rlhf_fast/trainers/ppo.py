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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_fast.models import ended_with_eos, last_token_index
from rlhf_fast.models.loading import (
    Precision,
    adapters_disabled,
    reencode_for_reward,
    resolve_eos_token_id,
    resolve_pad_token_id,
    same_vocabulary,
)
from rlhf_fast.ops import gae, ppo_losses, value_checks
from rlhf_fast.rollout import sample
from rlhf_fast.trainers._common import (
    BadStepCounter,
    RunLoop,
    epoch_order,
    gradient_sync,
    guarded_step,
    make_optimizer,
    make_scheduler,
    rank_share,
    trainable_parameters,
)
from rlhf_fast.trainers.checkpoint import CheckpointManager
from rlhf_fast.trainers.distributed import (
    init_distributed,
    seed_everything,
    unsharded,
)
from rlhf_fast.trainers.export import export_pretrained, meta_skeleton
from rlhf_fast.trainers.kl_control import AdaptiveKLController, FixedKLController
from rlhf_fast.trainers.phases import phase
from rlhf_fast.trainers.ppo_batch import (
    UPDATE_METRICS,
    PretrainRows,
    Rollout,
    clip_gradients,
    logprob_mismatch,
    masked_mean,
    masked_var,
    minibatches,
    token_ids,
    whiten,
)
from rlhf_fast.trainers.ppo_config import PPOConfig
from rlhf_fast.trainers.ppo_models import build_ppo_models, iteration_modules, reshard_frozen_after_forward


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

        config.check()
        self.config = config
        self.ctx = ctx = init_distributed(config.device)
        seed_everything(config.seed + ctx.rank)
        if config.batch_size % (config.num_minibatches * ctx.world_size):
            raise ValueError(
                f"batch_size {config.batch_size} must be a multiple of num_minibatches × processes "
                f"= {config.num_minibatches * ctx.world_size}"
            )
        self.prompts = [token_ids(prompt) for prompt in prompts]
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
        models = build_ppo_models(policy, reward_model, ref_policy, value_model, precision, device)
        self.policy, self.ref_policy = models.policy, models.ref_policy
        self.reward_model, self.value_model = models.reward_model, models.value_model
        self.shares_reference = models.shares_reference
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
        self.pretrain_rows = PretrainRows(config.seed + 1)

        # Models as the iteration calls them: trained ones wrapped for DDP / FSDP2.
        self._skeleton = meta_skeleton(self.policy) if config.fsdp and ctx.is_distributed else None
        modules = iteration_modules(models, precision, ctx, config.fsdp)
        self.policy_module, self.value_module = modules.policy, modules.value
        self.ref_module, self.reward_module = modules.reference, modules.reward
        self.policy_train, self.value_train = modules.policy_train, modules.value_train
        self.trained = nn.ModuleDict({"policy": self.policy_module, "value": self.value_module})
        if config.fsdp and ctx.is_distributed:
            self._initialize_fsdp_roots()
            reshard_frozen_after_forward(modules)

        self.policy_parameters = trainable_parameters(self.policy_module)
        self.value_parameters = trainable_parameters(self.value_module)
        self.parameters = self.policy_parameters + self.value_parameters
        self.optimizer = make_optimizer(self._parameter_groups(), config, device)
        self.iterations_per_epoch = len(self.prompts) // config.batch_size
        self.total_iterations = config.max_iterations or config.epochs * self.iterations_per_epoch
        self.scheduler = make_scheduler(self.optimizer, config, self.total_iterations)
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

    # ------------------------------------------------------------------------------------- data on the host
    def prompt_batch(self, iteration: int) -> dict[str, torch.Tensor]:
        """This rank's prompts of `iteration`, left-padded to a width shared by all ranks, on the device."""
        from rlhf_fast.data import pad_rows

        cfg = self.config
        epoch, position = divmod(iteration, self.iterations_per_epoch)
        order = epoch_order(len(self.prompts), cfg.seed, epoch)
        global_rows = order[position * cfg.batch_size : (position + 1) * cfg.batch_size]
        longest = max(len(self.prompts[i]) for i in global_rows)
        width = cfg.max_prompt_length or self.static_prompt_width or longest
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
        rows = config.ptx_batch_size or config.batch_size // config.num_minibatches
        steps = config.ppo_epochs * config.num_minibatches
        blocks = self.pretrain_rows.take(self.pretrain_data, steps, rows, self.ctx)
        return self._to_device(blocks)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.ctx.device.type == "cuda":
            return tensor.pin_memory().to(self.ctx.device, non_blocking=True)
        return tensor.to(self.ctx.device)

    # -------------------------------------------------------------------------------------------- models
    @torch.no_grad()
    def score(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, ended: torch.Tensor
    ) -> torch.Tensor:
        """The reward model's scores [B] float32 of the full sequences [B, P+T] (prompt left-padded, response
        up to EOS, then padding), with the value adapters off when the value model shares the RM's base.

        Every row is read at an eos, as the RM's training rows are: a response that did not end (`ended` [B]
        bool false: cut at max_new_tokens) gets one appended (`ended_with_eos`), so the RM judges the text it
        holds rather than a position it never learned to score. With a reward tokenizer of its own, the rows
        are decoded with the policy's tokenizer and re-encoded with the RM's (on the host, one batched call
        each way per iteration) exactly as the RM's training data was encoded: prompt ids + response ids +
        the RM's eos."""
        if self.reencode_for_reward:
            sequences, attention_mask = self._reencode_for_reward(sequences, attention_mask)
        else:
            sequences, attention_mask = ended_with_eos(sequences, attention_mask, ended, self.eos_token_id)
        model = self.reward_model if isinstance(self.reward_model, nn.Module) else None
        with adapters_disabled(model) if model is not None else contextlib.nullcontext():
            return self.reward_module(sequences, attention_mask).float()

    def _reencode_for_reward(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P+T] policy tokens -> [B, L'] reward-model tokens (right-padded) and their mask, on the device."""
        on_host = (sequences.cpu(), attention_mask.cpu())
        tokenizers = (self.tokenizer, self.reward_tokenizer)
        ids, mask = reencode_for_reward(*on_host, self.config.max_new_tokens, self.eos_token_id, *tokenizers)
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

    # -------------------------------------------------------------------------------------- one iteration
    @property
    def rollout_logprobs(self) -> bool:
        """Whether the sampler's log-probs serve as the old log-probs (`PPOConfig.rollout_logprobs`; None: when
        the models compute in float32)."""
        if self.config.rollout_logprobs is not None:
            return self.config.rollout_logprobs
        return self.precision.dtype == torch.float32

    @property
    def sample_stop_check_every(self) -> int:
        every = self.config.sample_stop_check_every
        return every if every is not None else (8 if self.ctx.device.type == "cpu" else 0)

    @property
    def _distribution(self) -> dict[str, Any]:
        """The sampling distribution the policy's log-probs are taken under (temperature, top-k, top-p)."""
        cfg = self.config
        return {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}

    @property
    def _sample_options(self) -> dict[str, Any]:
        """The sampler's options: the distribution, the special tokens, what it returns and how it runs."""
        return {
            **self._distribution,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "generator": self.sample_generator,
            "return_logprobs": True,
            "return_entropy": self.rollout_logprobs,
            "filtered_logprobs": True,
            "stop_check_every": self.sample_stop_check_every,
            "use_cuda_graph": self.config.sample_cuda_graph,
        }

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
            with phase("rollout"), unsharded(self.policy_module):
                out = sample(self.policy, prompt_ids, prompt_mask, cfg.max_new_tokens, **self._sample_options)
            sequences, response_ids, response_mask = out.sequences, out.response_ids, out.response_mask
            attention_mask = torch.cat([prompt_mask.bool(), response_mask], dim=1)
            steps = response_ids.shape[1]
            scored = (sequences, attention_mask, response_ids)  # what the models score, and at which tokens

            # 2. Score: reference, policy (old log-probs, entropy, k1 KL), values and reward, no gradients.
            #    With `rollout_logprobs` the sampler's log-probs are the old log-probs: no policy forward.
            with torch.no_grad(), phase("score"):
                with phase("score/reference"):
                    # The reference's own (unfiltered) distribution: KL(sampling policy ‖ reference).
                    ref_logprobs = self.ref_module(
                        *scored, mask=response_mask, temperature=cfg.temperature
                    ).logprobs
                if self.rollout_logprobs:
                    logprobs, entropy, kl = out.logprobs, out.entropy, out.logprobs - ref_logprobs
                    mismatch = None  # measured at the first minibatch, whose forward sees the same weights
                else:
                    with phase("score/policy"):
                        options = {"ref_logprobs": ref_logprobs, "return_entropy": True, **self._distribution}
                        logprobs, entropy, kl = self.policy_module(*scored, mask=response_mask, **options)
                    mismatch = logprob_mismatch(out.logprobs, logprobs, response_mask)
                with phase("score/value"):
                    values = self.value_module(sequences, attention_mask, steps)
                has_eos = ((response_ids == self.eos_token_id) & response_mask).any(dim=1)
                with phase("score/reward"):
                    scores = self.score(sequences, attention_mask, has_eos)

            # 3. Rewards: −β·KL at every response token, the (penalized) RM score added at the last one.
            with phase("rewards_gae"):
                if cfg.missing_eos_penalty is not None:
                    scores = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
                kl = torch.where(response_mask, kl, 0)
                last = last_token_index(response_mask)
                rewards = (-self.kl_controller.value * kl).scatter_add(1, last[:, None], scores[:, None])
                # From here on every rank holds the whole batch: GAE, whitening and minibatches are global.
                per_token = (logprobs, values, rewards, kl, entropy)
                data = Rollout(*scored, response_mask, *per_token, scores, has_eos).gathered(ctx)
                rewards_finite = torch.isfinite(data.rewards).all()
                if cfg.whiten_rewards:
                    data.rewards = whiten(data.rewards, data.response_mask, shift_mean=False)

                # 4. GAE, advantages whitened over the valid tokens of the batch.
                gae_options = {"gamma": cfg.gamma, "lam": cfg.gae_lambda, "whiten": cfg.whiten_advantages}
                advantages, returns = gae(data.rewards, data.values, data.response_mask, **gae_options)

            # 5. Minibatch epochs: one optimizer step per minibatch (policy + value + ptx).
            with phase("update"):
                sums, updates, first_mismatch = self._update(
                    data, advantages, returns, rewards_finite, pretrain_blocks
                )
            if mismatch is None:
                mismatch = first_mismatch

            # 6. Metrics, all on the device (one collective for the update metrics); the KL controller adapts.
            totals = dict(zip(sums, ctx.all_reduce_sum(torch.stack(list(sums.values()))).unbind()))
            metrics = {
                key: total if key == "train/skipped" else total / updates for key, total in totals.items()
            }
            valid = data.response_mask
            kl_per_sequence = data.kl.sum(dim=1).mean()
            returns_variance = masked_var(returns, valid)
            explained = 1 - masked_var(returns - data.values, valid) / returns_variance.clamp(min=1e-12)
            # Undefined when the returns are constant (e.g. every score equal and no KL yet): logged as 0.
            explained = torch.where(returns_variance > 0, explained, 0.0)
            rlhf_reward = (data.scores - self.kl_controller.value * data.kl.sum(dim=1)).mean()
            metrics |= {
                "objective/scores": data.scores.mean(),
                "objective/kl": kl_per_sequence,
                "objective/kl_coef": self.kl_controller.value.clone(),
                "objective/rlhf_reward": rlhf_reward,
                "policy/entropy": masked_mean(data.entropy, valid),
                "val/explained_variance": explained,
                "val/mean": masked_mean(data.values, valid),
                "episode/length": valid.sum(dim=1).float().mean(),
                "episode/eos_fraction": data.has_eos.float().mean(),
                "rollout/logprob_mismatch": mismatch[0],
                "rollout/logprob_mismatch_max": mismatch[1],
                "train/nonfinite_rewards": (~rewards_finite).float(),
                "train/response_tokens": valid.sum().float(),
            }
            self.kl_controller.update(kl_per_sequence, n_steps=len(data.scores))
            return metrics

    def _update(
        self,
        data: Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        rewards_finite: torch.Tensor,
        pretrain_blocks: torch.Tensor | None,
    ):
        """The minibatch epochs. Returns (summed update metrics, optimizer steps, the log-prob mismatch (mean,
        max) between the rollout and the first minibatch's forward, which runs on the sampling weights)."""
        cfg, ctx = self.config, self.ctx
        sums = {key: torch.zeros((), device=ctx.device) for key in UPDATE_METRICS}
        updates = 0
        mismatch = None
        steps = data.response_ids.shape[1]
        batches = minibatches(
            len(data.scores), cfg.num_minibatches, cfg.ppo_epochs, self.shuffle_generator, ctx
        )
        for rows, mine in batches:
            mb = data.rows(mine)
            # Masked means over this rank's tokens, rescaled to the mean over the minibatch's tokens.
            minibatch_tokens = data.response_mask.index_select(0, rows).sum().clamp(min=1)
            token_share = mb.response_mask.sum() * ctx.world_size / minibatch_tokens

            ptx_loss = torch.zeros((), device=ctx.device)
            if pretrain_blocks is not None:
                ptx_loss = self._ptx_backward(pretrain_blocks[updates])

            new = self.policy_train(
                mb.sequences, mb.attention_mask, mb.response_ids, mask=mb.response_mask, **self._distribution
            )
            if updates == 0:
                mismatch = logprob_mismatch(mb.logprobs, new.logprobs.detach(), mb.response_mask)
            new_values = self.value_train(mb.sequences, mb.attention_mask, steps)
            policy_terms = (new.logprobs, mb.logprobs, advantages.index_select(0, mine), mb.response_mask)
            value_terms = (new_values, mb.values, returns.index_select(0, mine))
            clips = {"clip_coef": cfg.clip_coef, "value_clip": cfg.value_clip}
            losses = ppo_losses(*policy_terms, *value_terms, **clips)
            loss = (losses["policy_loss"] + cfg.vf_coef * losses["value_loss"]) * token_share
            loss.backward()
            total = loss + cfg.ptx_coef * ptx_loss  # checked for finiteness with the gradients
            # Each model clipped on its own (InstructGPT trains the value function apart): a value-loss spike
            # cannot shrink the policy step. The step is skipped when either norm is not finite.
            policy_norm = clip_gradients(self.policy_parameters, cfg.max_grad_norm)
            value_norm = clip_gradients(self.value_parameters, cfg.max_grad_norm)
            grad_norm = torch.hypot(policy_norm, value_norm)  # of both models' gradients together
            guards = {"max_grad_norm": None, "extra_bad": ~rewards_finite, "grad_norm": grad_norm}
            _, skipped = guarded_step(self.optimizer, self.parameters, total, ctx, **guards)

            weight = token_share / ctx.world_size  # summed over ranks: the minibatch's token mean
            for key, name in UPDATE_METRICS.items():
                if name is not None:
                    sums[key] += losses[name].detach() * weight
            sums["loss/ptx"] += ptx_loss / ctx.world_size
            sums["train/grad_norm"] += grad_norm / ctx.world_size
            sums["train/policy_grad_norm"] += policy_norm / ctx.world_size
            sums["train/value_grad_norm"] += value_norm / ctx.world_size
            sums["train/skipped"] += skipped / ctx.world_size
            updates += 1
        return sums, updates, mismatch

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
    def ptx_position(self) -> int:
        """Pretraining rows taken so far (PPO-ptx's cursor)."""
        return self.pretrain_rows.position

    @property
    def total_steps(self) -> int:
        return self.total_iterations

    def _checkpoint_models(self) -> dict[str, nn.Module]:
        return {"policy": self.policy_module, "value": self.value_module}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The policy's weights, the value model's, and with `output_norm_learning_rate` the policy's output-norm
        gain, each at its learning rate."""
        config = self.config
        policy, gains = self.policy_parameters, []
        if config.output_norm_learning_rate is not None:
            gain = self.policy.output_norm.weight
            if not any(parameter is gain for parameter in policy):
                raise ValueError(
                    "output_norm_learning_rate: the policy's output-norm gain is not trained (LoRA freezes it)"
                )
            policy, gains = [p for p in policy if p is not gain], [gain]
        groups = [
            {"params": policy, "lr": config.learning_rate},
            {"params": self.value_parameters, "lr": config.value_learning_rate or config.learning_rate},
        ]
        if gains:
            groups.append({"params": gains, "lr": config.output_norm_learning_rate})
        return groups

    def _optimizer_model(self) -> nn.Module:
        return self.trained

    def _generators(self) -> dict[str, torch.Generator]:
        return {"sample": self.sample_generator, "shuffle": self.shuffle_generator}

    def _run_state(self) -> dict:
        return {"ptx_position": self.ptx_position, "kl_controller": self.kl_controller.state_dict()}

    def _load_run_state(self, state: dict) -> None:
        self.pretrain_rows.position = state["ptx_position"]
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
        final = Path(self.config.output_dir) / "final"
        options = {"tokenizer": self.tokenizer, "skeleton": self._skeleton, "prefix": "policy."}
        export_pretrained(self.policy, final, self.ctx, state_source=self.policy_module, **options)


__all__ = ["AdaptiveKLController", "FixedKLController", "PPOConfig", "PPOTrainer"]
