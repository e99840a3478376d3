"""The memory plan of a run, from the model configs alone (no weights): does it fit, and the largest batch that
does.

Bytes per parameter (see `rlhf_fast.models.loading`: autocast over float32 master weights):

    trained, full        weights 4 (fp32 master) + gradients 4 + AdamW state 8, + 2 for autocast's weight
                         copies (held from forward to backward) when the compute dtype is not float32
    trained, LoRA        the base in the compute dtype (2 for bf16), shared with the reference / reward model;
                         the adapters as a full trained model
    frozen               the compute dtype (reference policy, reward model)

Activations are measured, not guessed: the model is built on the meta device from its config and one forward
of the trainer's own module (`PolicyLogprobs`, `ValueScores`) runs under a saved-tensor hook that adds up what
autograd keeps for backward (no memory is used, no arithmetic done). Traced with one and with two blocks, that
gives the bytes of one block and of the rest at the configured rows and length; activation checkpointing keeps
each block's input instead, plus one block recomputed in backward. Attention is traced as the fused kernel SDPA
takes without attention dropout, on a CPU as on CUDA (flash / memory-efficient: q, k, v, the output, the
log-sum-exp and the one additive mask); attention dropout in training would keep [rows, heads, L, L]
probabilities per layer, which the plan does not count.

The peak of a step is the largest of its phases: the optimizer state is always resident; within a training
step the activations and the gradients trade places (backward frees one as it fills the other), so a step
peaks at max(activations + autocast copies + transient + the LM head's gradient, all gradients). The
transient is one block's saved bytes: a block's backward allocates gradients of about its saved tensors' size
while it frees those tensors (measured peaks, tests/trainers/measure_peak.py, sit within 10% of it). A PPO
iteration adds the sampler's KV cache (with FSDP2, the whole policy is gathered while it samples).
FSDP2 (`fsdp: true` under N processes) divides weights, gradients and optimizer state by N and adds the
gathered parameters of two blocks (the one computing and the one prefetched).

    python -m rlhf_fast.trainers.memory     # the plans of a 7B Llama-shaped PPO (README, "Memory")
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

GIB = 1024**3
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, float32
MASTER_BYTES = 4  # float32 weights and gradients of a trained parameter


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def llama_7b_config():
    """A Llama-2-7B-shaped config: 32 layers, width 4096, MLP 11008, 32 heads, 32k vocabulary, 4k positions."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a causal-LM config (tied weights counted once) and the shapes the plan needs."""

    params: int  # the causal LM
    backbone_params: int  # without the LM head: the reward / value model's backbone (+ a d + 1 head)
    lora_params: int  # LoRA adapter parameters under the given LoRA config (0 without one)
    block_params: int  # one transformer block
    layers: int
    hidden: int
    kv_width: int  # key (= value) width per token and layer: kv heads × head dim


def _meta_causal_lm(config, dtype: torch.dtype = torch.float32, attention: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attention} if attention else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, **kwargs)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() lists a tied weight once


_SIZES: dict[tuple, ModelSize] = {}


def model_size(config, lora=None) -> ModelSize:
    """Counts from a config on the meta device; `lora` (a `LoRAConfig`) counts the adapters peft would add."""
    key = (config.to_json_string(use_diff=False), repr(lora))
    if key not in _SIZES:
        _SIZES[key] = _model_size(config, lora)
    return _SIZES[key]


def _model_size(config, lora) -> ModelSize:
    from rlhf_fast.models._common import transformer_blocks

    model = _meta_causal_lm(config)
    params, backbone = _count(model), _count(model.base_model)
    blocks = transformer_blocks(model)
    lora_params = 0
    if lora is not None:
        from rlhf_fast.models.loading import LoRAConfig, add_lora

        add_lora(model, lora if isinstance(lora, LoRAConfig) else LoRAConfig(**lora))
        lora_params = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelSize(
        params=params,
        backbone_params=backbone,
        lora_params=lora_params,
        block_params=_count(blocks[0]) if blocks else 0,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        kv_width=kv_heads * head_dim,
    )


# ---------------------------------------------------------------------------------------- activations


class _FlashLikeAttention(torch.autograd.Function):
    """What a flash / memory-efficient attention kernel keeps for backward: q, k, v, output, log-sum-exp (and
    the additive mask, one tensor shared by every layer). Only ever run on meta tensors."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        saved = (query, key, value, out, lse) + ((mask,) if mask is not None else ())
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the trace never runs backward
        query, key, value = ctx.saved_tensors[:3]
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value), None


def _flash_like_attention(module, query, key, value, attention_mask, **kwargs):
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
    return _FlashLikeAttention.apply(query, key, value, mask).transpose(1, 2).contiguous(), None


_FLASH_LIKE = "rlhf_fast_plan_fused_kernel"  # not "flash...": transformers reserves that prefix


def _register_flash_like() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_FLASH_LIKE, _flash_like_attention)


def _saved_bytes(run: Callable[[], object], parameters: Sequence[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while `run()` executes: each storage once (views and aliases share
    one), the parameters' own storages excluded."""
    from rlhf_fast.ops import set_value_checks

    def storage_id(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage()._cdata

    skip = {storage_id(p) for p in parameters}
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor):
        if storage_id(tensor) not in skip:
            kept[storage_id(tensor)] = tensor  # held, so the id cannot be reused during the trace
        return tensor

    checks = set_value_checks(False)  # value checks read tensors back; meta tensors have no values
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            run()
    finally:
        set_value_checks(checks)
    return sum(t.untyped_storage().nbytes() for t in kept.values())


_TRACES: dict[tuple, int] = {}


def _traced_row(config, length: int, targets: int, dtype, head: str) -> int:
    """`_traced` for one row, remembered per (config, shapes, dtype, head)."""
    key = (config.to_json_string(use_diff=False), length, targets, dtype, head)
    if key not in _TRACES:
        _TRACES[key] = _traced(config, 1, length, targets, dtype, head)
    return _TRACES[key]


def _traced(config, rows: int, length: int, targets: int, dtype, head: str) -> int:
    from rlhf_fast.models import PolicyModel, ValueModel
    from rlhf_fast.trainers._modules import PolicyLogprobs, ValueScores

    _register_flash_like()
    model = _meta_causal_lm(config, dtype, attention=_FLASH_LIKE)
    ids = torch.zeros((rows, length), dtype=torch.long, device="meta")
    mask = torch.ones((rows, length), dtype=torch.bool, device="meta")
    if head == "lm":
        module = PolicyLogprobs(PolicyModel(model))

        def run():
            return module(ids, mask, ids[:, length - targets :])

    else:
        module = ValueScores(ValueModel(model.base_model))

        def run():
            return module(ids, mask, targets)

    return _saved_bytes(run, list(module.parameters()))


@dataclasses.dataclass(frozen=True)
class Activations:
    saved: int  # bytes kept for backward at the end of the forward
    block: int  # one block's saved bytes (what a backward step frees, and checkpointing recomputes)


def activation_bytes(
    config,
    rows: int,
    length: int,
    *,
    targets: int | None = None,
    dtype: torch.dtype = torch.float32,
    head: str = "lm",
    checkpointing: bool = False,
) -> Activations:
    """Activations of one trainable forward: `rows` × `length` tokens, `targets` scored positions (default all
    but the first), through the LM head and the fused log-prob op (`head="lm"`) or a scalar head ("scalar")."""
    if rows < 1 or length < 2:
        return Activations(0, 0)
    targets = length - 1 if targets is None else targets
    shallow = [copy.deepcopy(config) for _ in range(2)]
    for layers, small in zip((1, 2), shallow):
        small.num_hidden_layers = layers
    # Every saved tensor has one row per sequence: trace one row, scale by `rows`.
    one, two = (rows * _traced_row(c, length, targets, dtype, head) for c in shallow)
    block = max(two - one, 0)
    rest = max(one - block, 0)
    layers = config.num_hidden_layers
    if checkpointing:  # each block keeps its input; one block is recomputed at a time in backward
        block_input = rows * length * config.hidden_size * _bytes(dtype)
        return Activations(rest + layers * block_input + block, block)
    return Activations(rest + layers * block, block)


# ------------------------------------------------------------------------------------------------ plans


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device: resident items (always held) and the phases of a step (the peak is the largest)."""

    title: str
    resident: list[tuple[str, int]]
    phases: list[tuple[str, list[tuple[str, int]]]]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def resident_bytes(self) -> int:
        return sum(size for _, size in self.resident)

    def phase_bytes(self, name: str) -> int:
        return sum(size for _, size in dict(self.phases)[name])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda phase: sum(size for _, size in phase[1]))[0]

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + max((self.phase_bytes(name) for name, _ in self.phases), default=0)

    def lines(self) -> list[str]:
        out = [self.title]
        out += [f"  {label:<58} {gib(size):>10}" for label, size in self.resident if size]
        for name, items in self.phases:
            marker = "  <- peak" if name == self.peak_phase else ""
            out.append(f"  during {name}: {gib(sum(size for _, size in items))}{marker}")
            out += [f"    {label:<56} {gib(size):>10}" for label, size in items if size]
        out.append(f"  {'peak per device':<58} {gib(self.peak_bytes):>10}")
        out += [f"  {note}" for note in self.notes]
        return out


def gib(size: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 1024**2:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the plan needs of a run's config (the trainer configs have these fields)."""

    dtype: torch.dtype
    device_type: str  # "cpu" | "cuda" (shown in the title; "auto" dtype resolves by it)
    world_size: int = 1
    fsdp: bool = False
    gradient_checkpointing: bool = False
    lora: object = None  # a LoRAConfig or None

    @classmethod
    def from_config(cls, config, device_type: str, world_size: int = 1) -> Setting:
        from rlhf_fast.models.loading import resolve_dtype

        return cls(
            dtype=resolve_dtype(config.dtype, device_type),
            device_type=device_type,
            world_size=world_size,
            fsdp=bool(config.fsdp) and world_size > 1,
            gradient_checkpointing=config.gradient_checkpointing,
            lora=config.lora,
        )

    @property
    def shards(self) -> int:
        return self.world_size if self.fsdp else 1

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32


def _trained(label: str, params: int, setting: Setting) -> tuple[list[tuple[str, int]], int, int]:
    """(resident items, gradient bytes, autocast-copy bytes) of a trained parameter set, per device."""
    shards = setting.shards
    weights = params * MASTER_BYTES // shards
    gradients = params * MASTER_BYTES // shards
    optimizer = params * ADAM_BYTES // shards
    copies = params * _bytes(setting.dtype) if setting.autocast else 0  # gathered, so not sharded
    return (
        [(f"{label} weights (fp32 master)", weights), (f"{label} AdamW state (fp32)", optimizer)],
        gradients,
        copies,
    )


def _model_items(label: str, size: ModelSize, params: int, setting: Setting, frozen_base: bool):
    """Resident items, gradients and autocast copies of one trained model (full or LoRA)."""
    if setting.lora is not None and frozen_base:
        base = [(f"{label} base weights ({_name(setting.dtype)}, frozen)", params * _bytes(setting.dtype))]
        items, grads, copies = _trained(f"{label} adapters", size.lora_params, setting)
        return base + items, grads, copies
    return _trained(label, params, setting)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fsdp_gather(size: ModelSize, setting: Setting) -> int:
    """Two blocks' parameters gathered at once (the computing one and the prefetched one), float32."""
    return 2 * size.block_params * MASTER_BYTES if setting.shards > 1 else 0


def plan_epoch_step(
    config, rows: int, length: int, setting: Setting, *, head: str = "lm", what: str = "sft"
) -> MemoryPlan:
    """An SFT (`head="lm"`) or reward-model (`head="scalar"`) optimizer step: `rows` sequences of `length`
    tokens per forward on each device."""
    size = model_size(config, setting.lora)
    params = size.params if head == "lm" else size.backbone_params + size.hidden + 1
    resident, grads, copies = _model_items("model", size, params, setting, frozen_base=True)
    acts = activation_bytes(
        config, rows, length, dtype=setting.dtype, head=head, checkpointing=setting.gradient_checkpointing
    )
    head_grad = _head_gradient(config, size, setting) if head == "lm" and setting.lora is None else 0
    forward = [
        (f"activations ({rows} rows × {length} tokens{_ckpt(setting)})", acts.saved),
        ("autocast weight copies", copies),
        ("transient: one block's backward", acts.block),
        ("LM head gradient (first in backward)", head_grad),
        ("FSDP2 gathered blocks", _fsdp_gather(size, setting)),
    ]
    return MemoryPlan(
        _title(what, setting, size),
        resident,
        [("forward/backward", forward), ("optimizer step", [("gradients (fp32)", grads)])],
    )


def _head_gradient(config, size: ModelSize, setting: Setting) -> int:
    return config.vocab_size * size.hidden * MASTER_BYTES // setting.shards


def _ckpt(setting: Setting) -> str:
    return ", checkpointed" if setting.gradient_checkpointing else ""


def _title(what: str, setting: Setting, size: ModelSize) -> str:
    where = (
        f"{setting.world_size} processes, FSDP2, per device"
        if setting.shards > 1
        else f"{setting.world_size} process{'es' if setting.world_size > 1 else ''}, per device"
    )
    mode = (
        f"LoRA r={setting.lora.r} ({size.lora_params / 1e6:.1f} M adapter parameters)"
        if setting.lora
        else "full"
    )
    return (
        f"memory plan: {what}, {size.params / 1e9:.2f} B-parameter model, {mode}, "
        f"{_name(setting.dtype)} compute, "
        f"{setting.device_type} ({where})"
    )


def plan_ppo(policy_config, reward_config, ppo, prompt_length: int, setting: Setting) -> MemoryPlan:
    """One PPO iteration of `ppo` (a `PPOConfig`: batch_size, num_minibatches, max_new_tokens, ptx_batch_size)
    with prompts of `prompt_length` tokens."""
    policy = model_size(policy_config, setting.lora)
    reward = model_size(reward_config, setting.lora)
    world, shards = setting.world_size, setting.shards
    length = prompt_length + ppo.max_new_tokens
    compute = _bytes(setting.dtype)
    lora = setting.lora is not None
    value_params = reward.backbone_params + reward.hidden + 1
    resident, policy_grads, policy_copies = _model_items("policy", policy, policy.params, setting, True)
    if lora:  # the value model is a LoRA head on the reward model's base (shared)
        items, value_grads, value_copies = _trained(
            "value adapters + head", reward.lora_params + reward.hidden + 1, setting
        )
        resident += [
            ("reward model = value base (" + _name(setting.dtype) + ", frozen)", value_params * compute)
        ]
        resident += items
    else:
        items, value_grads, value_copies = _trained("value", value_params, setting)
        resident += items
        resident += [
            (f"reference policy ({_name(setting.dtype)}, frozen)", policy.params * compute // shards)
        ]
        resident += [(f"reward model ({_name(setting.dtype)}, frozen)", value_params * compute // shards)]
    rows_local = ppo.batch_size // world
    minibatch = ppo.batch_size // ppo.num_minibatches // world
    cache_dtype = setting.dtype if lora else torch.float32
    kv_cache = 2 * policy.layers * rows_local * length * policy.kv_width * _bytes(cache_dtype)
    rollout = [
        (f"sampler KV cache ({rows_local} rows × {length} tokens, {_name(cache_dtype)})", kv_cache),
        (
            "policy gathered for sampling (FSDP2)",
            policy.params * MASTER_BYTES * (shards - 1) // shards if shards > 1 else 0,
        ),
    ]
    kwargs = {"dtype": setting.dtype, "checkpointing": setting.gradient_checkpointing}
    policy_acts = activation_bytes(policy_config, minibatch, length, targets=ppo.max_new_tokens, **kwargs)
    value_acts = activation_bytes(
        reward_config, minibatch, length, targets=ppo.max_new_tokens, head="scalar", **kwargs
    )
    head_grad = 0 if lora else _head_gradient(policy_config, policy, setting)
    update = [
        (f"policy activations ({minibatch} rows × {length} tokens{_ckpt(setting)})", policy_acts.saved),
        (f"value activations ({minibatch} rows × {length} tokens{_ckpt(setting)})", value_acts.saved),
        # Checkpointed, a model's copies live only to the end of its own forward (autocast's cache); otherwise
        # backward keeps both models' copies.
        ("autocast weight copies", _copies_held(policy_copies, value_copies, setting)),
        ("transient: one block's backward", max(policy_acts.block, value_acts.block)),
        ("LM head gradient (first in backward)", head_grad),
        ("FSDP2 gathered blocks", _fsdp_gather(policy, setting)),
    ]
    plan = MemoryPlan(
        _title("ppo", setting, policy),
        resident,
        [
            ("rollout", rollout),
            ("update", update),
            ("optimizer step", [("gradients (fp32)", policy_grads + value_grads)]),
        ],
    )
    if lora:
        plan.notes.append("reference = the policy's base with adapters off (no second copy)")
    return plan


def _copies_held(policy: int, value: int, setting: Setting) -> int:
    return max(policy, value) if setting.gradient_checkpointing else policy + value


def largest_fitting(
    make_plan: Callable[[int], MemoryPlan], device_bytes: float, *, step: int = 1, limit: int = 1 << 16
) -> int:
    """The largest multiple of `step` (up to `limit`) whose plan fits in `device_bytes`; 0 if none does."""
    if make_plan(step).peak_bytes > device_bytes:
        return 0
    low, high = 1, 2
    while high * step <= limit and make_plan(high * step).peak_bytes <= device_bytes:
        low, high = high, high * 2
    high = min(high, limit // step + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if make_plan(middle * step).peak_bytes <= device_bytes:
            low = middle
        else:
            high = middle
    return low * step


def verdict(plan: MemoryPlan, device_bytes: float | None, largest: int | None, what: str) -> list[str]:
    if device_bytes is None:
        return ["  pass --device-memory GIB to check the fit and find the largest batch"]
    fits = "fits" if plan.peak_bytes <= device_bytes else "does NOT fit"
    lines = [f"  device memory {gib(device_bytes)}: the run {fits} (peak {gib(plan.peak_bytes)})"]
    if largest is not None:
        lines.append(f"  largest {what} that fits: {largest}" if largest else f"  no {what} fits")
    return lines


def _readme_plans() -> list[str]:
    """The 7B Llama-shaped PPO plans shown in the README."""
    from rlhf_fast.models.loading import LoRAConfig
    from rlhf_fast.trainers.ppo import PPOConfig

    config = llama_7b_config()
    ppo = PPOConfig(batch_size=64, num_minibatches=8, max_new_tokens=512)
    out = []
    full = Setting(torch.bfloat16, "cuda", world_size=8, fsdp=True, gradient_checkpointing=True)
    lora = Setting(torch.bfloat16, "cuda", gradient_checkpointing=True, lora=LoRAConfig(r=16, alpha=32))
    for setting in (full, lora):
        plan = plan_ppo(config, config, ppo, 512, setting)
        step = ppo.num_minibatches * setting.world_size
        largest = largest_fitting(
            lambda batch, s=setting: plan_ppo(
                config, config, dataclasses.replace(ppo, batch_size=batch), 512, s
            ),
            139 * GIB,
            step=step,
            limit=4096,
        )
        out += plan.lines() + verdict(plan, 139 * GIB, largest, "batch_size (prompts per iteration)") + [""]
    return out


if __name__ == "__main__":  # pragma: no cover
    print("\n".join(_readme_plans()))
