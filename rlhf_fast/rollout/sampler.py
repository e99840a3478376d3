"""Batched on-device sampling with a static KV cache and no host synchronization in the decode loop: ``sample``,
``prepare`` and ``clear_graphs``.

Shape of one call: a prefill over the ``[B, P]`` prompts, then ``T - 1`` decode steps, each feeding one token per
row. Everything the loop changes lives in preallocated device buffers updated in place (the token fed next, its
position, the key mask, the write index, the finished flags, the outputs), so one decode step is a fixed sequence
of kernels over fixed addresses: on CUDA it is captured as a CUDA graph and replayed. The buffers, the KV cache,
the prefill and the step are in ``decode.py``; how a step picks its token (temperature, top-k / top-p,
inverse-CDF sampling) is in ``selection.py``. This module checks the arguments, runs the loop eagerly or as graph
replays, and keeps the captured graphs.

CUDA graphs are captured once and reused. Capturing synchronizes the device, so the captured decode step, its KV
cache and its loop buffers are kept per model (at most ``MAX_GRAPHS_PER_MODEL``, least recently used dropped),
keyed on what fixes the step's shapes and kernels: batch size, total length ``P + T``, device, dtypes, attention
implementation and decode path, and the sampling settings. A later call with the same key resets the buffers in
place, runs the prefill eagerly, and replays the graph, with no host synchronization anywhere. The optimizer
updates parameters in place, which the graph sees; if a parameter or buffer tensor of the model is replaced
(``load_state_dict(assign=True)``, ``.to()``, FSDP re-gathering into new memory), its address changes and the
model's graphs are dropped and captured again. Sampling noise inside the graph comes from a generator owned by
the graph (registered with ``CUDAGraph.register_generator_state``): each call copies the caller's generator state
into it and the advanced state back (host-side seed and offset, no device work), so a seeded call returns the same
tokens with or without the graph and leaves the caller's generator where the eager loop would.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from rlhf_fast.models._common import max_positions
from rlhf_fast.rollout.decode import SampleOutput, _DecodeBuffers, _DecodeProgram
from rlhf_fast.rollout.selection import TokenSelector

# Captured decode steps kept per model; each holds a KV cache of [B, kv_heads, P + T, d_head] per layer.
MAX_GRAPHS_PER_MODEL = 4
# Device types whose tensors may take the graph path (the tests add "cpu" to run it under an emulated graph).
_GRAPH_DEVICE_TYPES = ("cuda",)


@torch.no_grad()
def sample(
    policy: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    return_entropy: bool = False,
    filtered_logprobs: bool = False,
    stop_check_every: int = 0,
    use_cuda_graph: bool | None = None,
) -> SampleOutput:
    """Samples ``max_new_tokens`` tokens per prompt.

    policy: a ``PolicyModel`` or a transformers causal LM (eager or sdpa attention).
    prompt_ids: [B, P] int64, left padded. prompt_mask: [B, P] bool/int (1 = real token); every row needs at least
    one real token. The next-token distribution of a row is read at its last real token, so right-padded prompts
    also work, but ``sequences`` then keeps the padding between prompt and response.
    temperature: 0 means greedy (argmax); otherwise logits are divided by it. top_k: keep the k most likely tokens
    (0 = off); top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off);
    applied in that order, on the temperature-scaled distribution, as transformers' ``generate`` does.
    eos_token_id: an id, several ids, or None (never stop early). A row stops at its first EOS and then emits
    ``pad_token_id``. generator: the source of sampling noise (on the prompts' device; None: the default
    generator); seeded, the output is deterministic, the same with and without a CUDA graph.
    return_entropy: also return the entropy of each step's distribution. filtered_logprobs: log-probs and entropy
    under the filtered, renormalized distribution tokens are drawn from (what PPO's ratio needs with top-k /
    top-p), instead of the unfiltered one.
    stop_check_every: every this many decode steps, read back whether every row has finished (one host
    synchronization) and stop if so; the output is the same as the full loop's (finished rows emit padding).
    0 (default) never reads back: the loop runs all ``max_new_tokens`` steps without a host synchronization.
    use_cuda_graph: replay the decode step as a CUDA graph (default: on for CUDA tensors). The graph is captured
    on the first call with a new shape or setting (or by ``prepare``), which synchronizes the device once; later
    calls make no host synchronization. CPU tensors always run the eager loop.

    The model runs in eval mode (dropout off) and is put back in its previous mode afterwards. A DDP-wrapped policy
    is unwrapped; an FSDP-sharded one must be unsharded by the caller (the decode step reads the weights directly).
    """
    hf_model, weight, bias = _resolve_policy(policy)
    config = hf_model.config
    _, prompt_len = _check_prompt(prompt_ids, prompt_mask)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    total_len = prompt_len + max_new_tokens
    limit = max_positions(config)
    if limit is not None and total_len > limit:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {total_len} exceeds the model's "
            f"maximum of {limit} positions; truncate the prompts or lower max_new_tokens"
        )
    selector = TokenSelector(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                             filtered_logprobs=filtered_logprobs)  # fmt: skip
    eos_ids = _check_eos(eos_token_id)
    if not isinstance(stop_check_every, int) or isinstance(stop_check_every, bool) or stop_check_every < 0:
        raise ValueError(f"stop_check_every must be an int >= 0 (0 = never), got {stop_check_every!r}")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    _check_attention(config)
    device = prompt_ids.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but prompt_ids is on {device}")
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    if use_cuda_graph and device.type not in _GRAPH_DEVICE_TYPES:
        raise ValueError(f"use_cuda_graph=True needs CUDA tensors, prompt_ids is on {device}")
    use_cuda_graph = use_cuda_graph and max_new_tokens > 1 and _graph_can_sample(selector)

    was_training = hf_model.training
    if was_training:
        hf_model.eval()
    try:
        program = _DecodeProgram(
            backbone=hf_model.base_model, weight=weight, bias=bias, config=config, selector=selector,
            eos_ids=eos_ids, pad_token_id=pad_token_id, return_logprobs=return_logprobs,
            return_entropy=return_entropy, stop_check_every=stop_check_every if eos_ids else 0,
        )  # fmt: skip
        signature = _tensor_signature(hf_model) if use_cuda_graph else None
        if signature is not None:
            return _sample_with_graph(program, hf_model, signature, prompt_ids, prompt_mask, max_new_tokens)
        return _sample_eager(program, prompt_ids, prompt_mask, max_new_tokens)
    finally:
        if was_training:
            hf_model.train()


@torch.no_grad()
def prepare(
    policy: nn.Module,
    batch_size: int,
    prompt_length: int,
    max_new_tokens: int,
    *,
    device: torch.device | str | None = None,
    **settings,
) -> bool:
    """Captures the decode-step CUDA graph that ``sample`` uses for ``[batch_size, prompt_length]`` prompts and
    these settings, so that a timed loop starts with replays.

    settings: ``sample``'s keyword arguments (its defaults for those left out) except ``generator`` and
    ``use_cuda_graph``. Capture synchronizes the device; call this before the region that must not. It runs one
    generation on dummy prompts with its own generator: callers' generators and the global RNG state are left
    untouched. device: where the prompts will be (default: the LM head's device). Returns True when a graph is
    ready, False where ``sample`` uses none (CPU tensors, ``max_new_tokens == 1``, sampling on a torch without
    ``CUDAGraph.register_generator_state``).
    """
    hf_model, weight, _ = _resolve_policy(policy)
    for name, value in (
        ("batch_size", batch_size),
        ("prompt_length", prompt_length),
        ("max_new_tokens", max_new_tokens),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    device = weight.device if device is None else torch.device(device)
    ids = torch.zeros((batch_size, prompt_length), dtype=torch.long, device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    noise = torch.Generator(device=device)
    noise.manual_seed(0)
    # Bound against sample's own signature: one home for the settings' names and defaults.
    call = inspect.signature(sample).bind(
        policy, ids, mask, max_new_tokens, generator=noise, use_cuda_graph=True, **settings
    )
    call.apply_defaults()
    chosen = call.arguments
    selector = TokenSelector(
        temperature=chosen["temperature"], top_k=chosen["top_k"], top_p=chosen["top_p"], generator=None
    )
    if device.type not in _GRAPH_DEVICE_TYPES or max_new_tokens == 1 or not _graph_can_sample(selector):
        return False
    sample(*call.args, **call.kwargs)
    return _tensor_signature(hf_model) is not None


def clear_graphs(policy: nn.Module | None = None) -> None:
    """Drops the captured decode graphs (and their KV caches) of one policy, or of every model when None.
    Waits for their queued work first."""
    if policy is None:
        dropped = list(_GRAPHS.values())
        _GRAPHS.clear()
    else:
        hf_model, _, _ = _resolve_policy(policy)
        dropped = [_GRAPHS.pop(hf_model)] if hf_model in _GRAPHS else []
    for graphs in dropped:
        for entry in graphs.entries.values():
            _release(entry)


# ---------------------------------------------------------------------------------------------- the eager loop
def _sample_eager(program: _DecodeProgram, prompt_ids, prompt_mask, max_new_tokens: int) -> SampleOutput:
    batch, prompt_len = prompt_ids.shape
    prompt_mask = prompt_mask.bool()
    program.copy_head()
    buffers = program.buffers(batch, prompt_len + max_new_tokens, max_new_tokens, prompt_ids.device)
    buffers.reset(prompt_mask, program.pad_token_id)
    program.prefill(buffers, prompt_ids, prompt_mask)
    _run_eager(program, buffers, max_new_tokens - 1)
    return program.output(buffers, prompt_ids, max_new_tokens, copy=False)


def _run_eager(program: _DecodeProgram, buffers: _DecodeBuffers, steps: int) -> None:
    for done in range(steps):
        if program.all_finished(buffers, done):
            return
        program.step(buffers)


# -------------------------------------------------------------------------------------------- the CUDA graph
def _graph_can_sample(selector: TokenSelector) -> bool:
    """Sampling inside a graph needs a generator registered with it (``register_generator_state``)."""
    return selector.greedy or hasattr(torch.cuda.CUDAGraph, "register_generator_state")


class _CapturedDecode:
    """A decode step captured as a CUDA graph, with the buffers it reads and writes and the generator it draws
    from. Holds no reference to the model (the model's weights are read by address)."""

    def __init__(self, buffers: _DecodeBuffers, device: torch.device):
        self.buffers = buffers
        self.graph: torch.cuda.CUDAGraph | None = None  # captured at the first call
        self.noise = torch.Generator(device=device)
        self.done = torch.cuda.Event()  # recorded after each call's last use of the buffers


class _ModelGraphs:
    """The captured decode steps of one model, valid while its tensors stay where they were at capture."""

    def __init__(self, signature: tuple):
        self.signature = signature
        self.entries: OrderedDict[tuple, _CapturedDecode] = OrderedDict()


# Model -> its graphs. Weak keys: a model's graphs, caches and buffers go when the model does.
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, _ModelGraphs] = weakref.WeakKeyDictionary()


def _tensor_signature(model: nn.Module) -> tuple | None:
    """Address, dtype, shape and strides of every parameter and buffer: the graph reads them by address, so it
    stays valid under in-place updates and is stale once any of them is replaced. None when a tensor has no
    plain storage (e.g. a DTensor shard): such a model is sampled eagerly."""
    try:
        return tuple(
            (tensor.data_ptr(), tensor.device, tensor.dtype, tuple(tensor.shape), tensor.stride())
            for tensor in itertools.chain(model.parameters(), model.buffers())
        )
    except RuntimeError:
        return None


def _release(entry: _CapturedDecode) -> None:
    """Waits for the entry's queued replays before its graph and buffers are freed. Only on the way to a new
    capture (eviction, stale tensors), an explicit ``clear_graphs``, or a failed call, all of which synchronize
    anyway."""
    entry.done.synchronize()


def _graph_entry(model: nn.Module, signature: tuple, key: tuple, make_buffers) -> _CapturedDecode:
    graphs = _GRAPHS.get(model)
    if graphs is None or graphs.signature != signature:
        if graphs is not None:  # replaced tensors: every graph of the model reads stale addresses
            for stale in graphs.entries.values():
                _release(stale)
        graphs = _GRAPHS[model] = _ModelGraphs(signature)
    entry = graphs.entries.get(key)
    if entry is None:
        while len(graphs.entries) >= MAX_GRAPHS_PER_MODEL:
            _release(graphs.entries.popitem(last=False)[1])
        buffers = make_buffers()
        entry = graphs.entries[key] = _CapturedDecode(buffers, buffers.decode_mask.device)
    graphs.entries.move_to_end(key)
    return entry


def _forget(model: nn.Module, key: tuple, stream) -> None:
    graphs = _GRAPHS.get(model)
    entry = graphs.entries.pop(key, None) if graphs is not None else None
    if entry is not None:
        entry.done.record(stream)
        _release(entry)


def _sample_with_graph(
    program: _DecodeProgram, model: nn.Module, signature: tuple, prompt_ids, prompt_mask, max_new_tokens: int
) -> SampleOutput:
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    total_len = prompt_len + max_new_tokens
    key = program.graph_key(batch, total_len, device)
    entry = _graph_entry(model, signature, key, lambda: program.buffers(batch, total_len, total_len, device))
    buffers, stream = entry.buffers, torch.cuda.current_stream(device)
    stream.wait_event(entry.done)  # a previous call may have used the buffers on another stream
    # The graph draws from its own registered generator, which starts where the caller's is and hands the state
    # back afterwards: the caller's generator advances exactly as in the eager loop.
    source = None
    if not program.selector.greedy:
        source = program.selector.generator or _default_generator(device)
        entry.noise.set_state(source.get_state())
        program.selector = program.selector.drawing_from(entry.noise)
    try:
        with _on_device(device):  # capture and replay use the current device's streams
            prompt_mask = prompt_mask.bool()
            buffers.reset(prompt_mask, program.pad_token_id)
            program.prefill(buffers, prompt_ids, prompt_mask)
            steps = max_new_tokens - 1
            if entry.graph is None:
                _warm_up(program, buffers, stream)
                steps -= 1
                entry.graph = _capture_decode_step(program, buffers, entry.noise)
            _replay_until_finished(program, buffers, entry.graph, steps)
            output = program.output(buffers, prompt_ids, max_new_tokens, copy=True)
            entry.done.record(stream)
    except BaseException:
        _forget(model, key, stream)  # a half-run or half-captured entry is not reused
        raise
    if source is not None:
        source.set_state(entry.noise.get_state())
    return output


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator ``torch.rand`` uses on ``device`` when given none."""
    if device.type != "cuda":
        return torch.default_generator
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def _warm_up(program: _DecodeProgram, buffers: _DecodeBuffers, stream: torch.cuda.Stream) -> None:
    """The first decode step, run eagerly on a side stream before capture: lazy initialization (library handles,
    workspaces) must happen outside the graph."""
    side = torch.cuda.Stream(stream.device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        program.step(buffers)
    stream.wait_stream(side)


def _capture_decode_step(
    program: _DecodeProgram, buffers: _DecodeBuffers, noise: torch.Generator
) -> torch.cuda.CUDAGraph:
    """Records one decode step (capture runs nothing; it synchronizes the device)."""
    graph = torch.cuda.CUDAGraph()
    if not program.selector.greedy:
        graph.register_generator_state(noise)
    with torch.cuda.graph(graph):
        program.step(buffers)
    return graph


def _replay(graph: torch.cuda.CUDAGraph, steps: int) -> None:
    for _ in range(steps):
        graph.replay()


def _replay_until_finished(program: _DecodeProgram, buffers: _DecodeBuffers, graph, steps: int) -> None:
    """``steps`` replays, in chunks of ``stop_check_every`` with the early-stop check before each chunk."""
    every = program.stop_check_every or steps
    for done in range(0, steps, every):
        if program.all_finished(buffers, done):
            return
        _replay(graph, min(every, steps - done))


# ------------------------------------------------------------------------------------------------- checks
def _resolve_policy(policy) -> tuple[PreTrainedModel, torch.Tensor, torch.Tensor | None]:
    if isinstance(policy, nn.parallel.DistributedDataParallel):
        policy = policy.module
    hf_model = getattr(policy, "hf_model", policy)
    if not isinstance(hf_model, PreTrainedModel) or hf_model.get_output_embeddings() is None:
        raise ValueError(
            f"policy must be a PolicyModel or a transformers causal LM, got {type(policy).__name__}"
        )
    if hf_model.base_model is hf_model:
        raise ValueError(f"policy ({type(hf_model).__name__}) has no separate decoder stack")
    head = hf_model.get_output_embeddings()
    return hf_model, head.weight, getattr(head, "bias", None)


def _check_prompt(prompt_ids, prompt_mask) -> tuple[int, int]:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
        raise ValueError(
            f"prompt_ids must be a [B, P] tensor, got {getattr(prompt_ids, 'shape', prompt_ids)!r}"
        )
    if prompt_ids.dtype != torch.long:
        raise ValueError(f"prompt_ids must be int64, got {prompt_ids.dtype}")
    if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_mask must be a tensor of shape {tuple(prompt_ids.shape)}, got "
            f"{tuple(prompt_mask.shape) if isinstance(prompt_mask, torch.Tensor) else type(prompt_mask).__name__}"
        )
    if prompt_mask.dtype.is_floating_point or prompt_mask.dtype.is_complex:
        raise ValueError(f"prompt_mask must be bool or integer, got {prompt_mask.dtype}")
    if prompt_mask.device != prompt_ids.device:
        raise ValueError(f"prompt_mask is on {prompt_mask.device} but prompt_ids is on {prompt_ids.device}")
    batch, prompt_len = prompt_ids.shape
    if batch == 0 or prompt_len == 0:
        raise ValueError(
            f"prompt_ids must have at least one row and one column, got shape {(batch, prompt_len)}"
        )
    return batch, prompt_len


def _check_eos(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an int, a sequence of ints or None, got {eos_token_id!r}")
    return ids


def _check_attention(config) -> None:
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"the sampler needs eager or sdpa attention (it passes an explicit 4D mask), the model uses "
            f"{implementation!r}; load it with attn_implementation='sdpa'"
        )
    layer_types = getattr(config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            f"the sampler supports full-attention layers only, the model has layer_types={layer_types}"
        )
