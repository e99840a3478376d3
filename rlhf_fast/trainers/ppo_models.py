"""PPO's four models, built once: the trained policy and value model, the frozen reference and reward model.

Trained models keep float32 weights under autocast (or LoRA adapters on a frozen base); frozen ones are stored
in the compute dtype. Under LoRA the reference is the policy's own base with its adapters off, and the value
model is a LoRA head on the reward model's base: neither is a second copy of the weights. No model runs
dropout: the PPO ratio and the KL need a deterministic forward.

`IterationModules` are the same models as one PPO iteration calls them: the policy as per-token log-probs,
the value model as per-token values, the trained ones wrapped for DDP / FSDP2.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhf_fast.models.loading import (
    Precision,
    WithoutAdapters,
    autocast_forward,
    load_policy,
    prepare_trained,
    shared_base_value_model,
    store_frozen,
)
from rlhf_fast.trainers._modules import PolicyLogprobs, ValueScores
from rlhf_fast.trainers.distributed import DistributedContext, is_fsdp, wrap_model

__all__ = [
    "IterationModules",
    "PPOModels",
    "build_ppo_models",
    "iteration_modules",
    "reshard_frozen_after_forward",
]


@dataclass
class PPOModels:
    policy: nn.Module
    ref_policy: nn.Module  # the policy itself when `shares_reference` (LoRA: its adapters are turned off)
    reward_model: Any  # a RewardModel, or any (input_ids, attention_mask) -> [B] callable
    value_model: nn.Module
    shares_reference: bool


def build_ppo_models(
    policy, reward_model, ref_policy, value_model, precision: Precision, device: torch.device
) -> PPOModels:
    """The four models on `device` in their precision; the defaults as `PPOTrainer` documents them."""
    from rlhf_fast.models import RewardModel, ValueModel

    policy = prepare_trained(load_policy(policy), precision)
    shares_reference = precision.lora is not None and ref_policy is None
    if shares_reference:
        ref_policy = policy
    else:
        ref_policy = load_policy(ref_policy) if ref_policy is not None else copy.deepcopy(policy)
        store_frozen(ref_policy.to(device), precision.dtype)
    given_reward_model = reward_model
    if isinstance(reward_model, nn.Module):
        reward_model = reward_model.to(device)
        reward_model.requires_grad_(False).eval()
    is_reward_model = isinstance(reward_model, RewardModel)
    if value_model is None and precision.lora is not None and is_reward_model:
        store_frozen(reward_model, precision.dtype)
        value_model = shared_base_value_model(reward_model, precision)  # a LoRA head on the RM's base
    else:
        if value_model is None:  # copied before the reward model is stored in the compute dtype
            value_model = (
                ValueModel.from_reward_model(given_reward_model)
                if is_reward_model
                else ValueModel.from_policy(policy)
            )
            value_model.requires_grad_(True)  # the copy of a frozen reward model must still train
        value_model = prepare_trained(value_model, precision)
        if is_reward_model:
            store_frozen(reward_model, precision.dtype)
    for model in (policy, ref_policy, value_model):
        model.eval()
    return PPOModels(policy, ref_policy, reward_model, value_model, shares_reference)


@dataclass
class IterationModules:
    policy: nn.Module  # PolicyLogprobs
    value: nn.Module  # ValueScores
    reference: nn.Module  # PolicyLogprobs of the reference (or of the policy with its adapters off)
    reward: Any  # the reward model as given
    policy_train: nn.Module  # `policy` wrapped for DDP / FSDP2
    value_train: nn.Module


def iteration_modules(
    models: PPOModels, precision: Precision, ctx: DistributedContext, fsdp: bool
) -> IterationModules:
    """The models as the iteration calls them, each forward under autocast to the compute dtype; the trained
    ones wrapped for the processes; under FSDP2 the frozen ones sharded too."""
    device_type = ctx.device.type
    policy = PolicyLogprobs(models.policy)
    value = ValueScores(models.value_model)
    reference = (
        WithoutAdapters(PolicyLogprobs(models.policy), models.policy)
        if models.shares_reference
        else PolicyLogprobs(models.ref_policy)
    )
    reward = models.reward_model
    for module in (policy, value, reference):
        autocast_forward(module, device_type, precision.dtype)
    if isinstance(reward, nn.Module):
        autocast_forward(reward, device_type, precision.dtype)
    policy_train = wrap_model(policy, ctx, fsdp=fsdp)
    value_train = wrap_model(value, ctx, fsdp=fsdp)
    if fsdp and ctx.is_distributed:
        wrap_model(reference, ctx, fsdp=True)
        if isinstance(reward, nn.Module):
            wrap_model(reward, ctx, fsdp=True)
    return IterationModules(policy, value, reference, reward, policy_train, value_train)


def reshard_frozen_after_forward(modules: IterationModules) -> None:
    """Frozen FSDP2 roots are never backpropagated: free their gathered weights right after each forward."""
    for frozen in (modules.reference, modules.reward):
        if is_fsdp(frozen):
            frozen.set_reshard_after_forward(True, recurse=False)
