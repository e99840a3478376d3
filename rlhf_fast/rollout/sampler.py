"""Batched on-device sampling with a static KV cache and no host synchronization in the decode loop.

Shape of one call: a prefill over the ``[B, P]`` prompts, then ``T - 1`` decode steps, each feeding one token per
row. Everything the loop changes lives in preallocated device buffers updated in place (the token fed next, its
position, the key mask, the write index, the finished flags, the outputs), so one decode step is a fixed sequence
of kernels over fixed addresses: on CUDA it is captured once as a CUDA graph and replayed.

The KV cache is transformers' ``StaticCache`` (transformers 5.x): each layer holds ``[B, kv_heads, P + T, d_head]``
buffers and a device-side write counter that it advances in place, which keeps its updates graph-capturable. The
attention mask is ours: a 4D additive mask ``[B, 1, q, P + T]`` that transformers passes through unchanged, with
padded keys masked and each padded prompt query allowed to see itself (so no softmax row is empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, StaticCache

from rlhf_fast.models._common import max_positions, position_ids_from_mask
from rlhf_fast.rollout.fast_decode import fast_decode_step


@dataclass
class SampleOutput:
    """The result of ``sample``.

    sequences:     [B, P + T] int64, the prompt (as given, left padded) followed by the response.
    response_ids:  [B, T] int64, the sampled tokens; ``pad_token_id`` after a row's EOS.
    response_mask: [B, T] bool, True up to and including the row's first EOS.
    logprobs:      [B, T] float32 or None, log-prob of each sampled token under the temperature-scaled
                   distribution before top-k / top-p filtering (the distribution the PPO ratio is taken
                   against); 0 where ``response_mask`` is False. With ``temperature=0`` (greedy), under the
                   unscaled distribution.
    """

    sequences: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None


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
    ``pad_token_id``. generator: the source of sampling noise (on the prompts' device); seeded, the output is
    deterministic. use_cuda_graph: capture the decode step as a CUDA graph (default: on for CUDA tensors).

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
    selector = TokenSelector(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    eos_ids = _check_eos(eos_token_id)
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    _check_attention(config)
    device = prompt_ids.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but prompt_ids is on {device}")
    if use_cuda_graph is None:
        use_cuda_graph = device.type == "cuda"
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs CUDA tensors, prompt_ids is on {device}")

    was_training = hf_model.training
    if was_training:
        hf_model.eval()
    try:
        decoder = _Decoder(
            backbone=hf_model.base_model, weight=weight, bias=bias, config=config,
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, max_new_tokens=max_new_tokens,
            selector=selector, eos_ids=eos_ids, pad_token_id=pad_token_id, return_logprobs=return_logprobs,
        )
        decoder.prefill()
        decoder.decode(use_cuda_graph=use_cuda_graph)
    finally:
        if was_training:
            hf_model.train()

    sequences = torch.cat([prompt_ids, decoder.response_ids], dim=1)
    return SampleOutput(
        sequences=sequences,
        response_ids=decoder.response_ids,
        response_mask=decoder.response_mask,
        logprobs=decoder.logprobs if return_logprobs else None,
    )


class TokenSelector:
    """Picks the next token from fp32 logits without reading anything back to the host.

    Sampling uses the Gumbel-max trick: ``argmax(log p + G)`` with ``G = -log(-log U)`` i.i.d. per token picks
    token i with probability p_i with elementwise ops and one argmax (no ``multinomial``, which may read back to
    the host). Filtered tokens carry log-probability -inf and never win.
    """

    def __init__(self, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None):
        if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                or not 0 <= temperature < float("inf")):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.generator = generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] fp32 -> the temperature-scaled logits."""
        return logits if self.greedy or self.temperature == 1.0 else logits / self.temperature

    def filtered(self, scaled: torch.Tensor) -> torch.Tensor:
        """Top-k then top-p on scaled logits [B, V]; removed tokens get -inf."""
        vocab = scaled.shape[-1]
        if 0 < self.top_k < vocab:
            kth_largest = torch.topk(scaled, self.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # A token is dropped when the tokens ranked above it already reach top_p; the top one always stays.
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = mass_before >= self.top_p
            drop_sorted[:, 0] = False
            drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
            scaled = scaled.masked_fill(drop, float("-inf"))
        return scaled

    def __call__(self, logits: torch.Tensor, want_logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits: [B, V] fp32 -> (tokens [B] int64, log-probs [B] fp32 of those tokens or None)."""
        scaled = self.scaled(logits)
        if self.greedy:
            tokens = scaled.argmax(dim=-1)
        else:
            uniform = torch.rand(scaled.shape, generator=self.generator, device=scaled.device)
            # U = 0 is a possible draw and would give G = -inf: clamping keeps G finite (within about -4.5..17).
            gumbel = uniform.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()
            tokens = (self.filtered(scaled) + gumbel).argmax(dim=-1)
        logprobs = None
        if want_logprobs:
            chosen = scaled.gather(-1, tokens[:, None]).squeeze(-1)
            logprobs = chosen - torch.logsumexp(scaled, dim=-1)
        return tokens, logprobs


class _Decoder:
    """The buffers and steps of one ``sample`` call."""

    def __init__(self, *, backbone, weight, bias, config, prompt_ids, prompt_mask, max_new_tokens, selector,
                 eos_ids, pad_token_id, return_logprobs):
        self.backbone, self.weight, self.bias = backbone, weight, bias
        self.selector, self.eos_ids, self.pad_token_id = selector, eos_ids, pad_token_id
        self.return_logprobs = return_logprobs
        self.prompt_ids = prompt_ids
        self.prompt_mask = prompt_mask.bool()
        batch, prompt_len = prompt_ids.shape
        self.prompt_len, self.max_new_tokens = prompt_len, max_new_tokens
        total_len = prompt_len + max_new_tokens
        device = prompt_ids.device
        # The attention mask is added to the scores, so it takes the backbone's dtype (not necessarily the head's).
        self.compute_dtype = backbone.get_input_embeddings().weight.dtype
        self.mask_min = torch.finfo(self.compute_dtype).min

        self.cache = StaticCache(config=config, max_cache_len=total_len)
        self.fast_step = fast_decode_step(backbone)
        # Outputs.
        self.response_ids = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.response_mask = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
        self.logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        # Loop state, all updated in place.
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.next_input = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.next_position = self.prompt_mask.sum(-1, keepdim=True)  # first response token's position
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # response column written next
        self.cache_index = torch.full((1,), prompt_len, dtype=torch.long, device=device)  # cache slot fed next
        # Additive key mask for decode steps: prompt padding and not-yet-written slots masked.
        key_mask = torch.zeros((batch, total_len), dtype=self.compute_dtype, device=device)
        key_mask[:, :prompt_len].masked_fill_(~self.prompt_mask, self.mask_min)
        key_mask[:, prompt_len:] = self.mask_min
        self.decode_mask = key_mask[:, None, None, :]  # [B, 1, 1, S]

    # ----------------------------------------------------------------------------------------------- steps
    def _hidden(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        output = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        return output.last_hidden_state

    def _emit(self, last_hidden: torch.Tensor) -> None:
        """From the hidden state [B, d] at each row's newest token: choose, record, and advance."""
        logits = nn.functional.linear(last_hidden.to(self.weight.dtype), self.weight, self.bias).float()
        tokens, logprobs = self.selector(logits, self.return_logprobs)
        alive = ~self.finished
        tokens = torch.where(alive, tokens, self.pad_token_id)
        self.response_ids.index_copy_(1, self.step_index, tokens[:, None])
        self.response_mask.index_copy_(1, self.step_index, alive[:, None])
        if logprobs is not None:
            self.logprobs.index_copy_(1, self.step_index, torch.where(alive, logprobs, 0.0)[:, None])
        for eos in self.eos_ids:
            self.finished |= tokens == eos
        self.next_input.copy_(tokens[:, None])
        self.step_index += 1

    def prefill(self) -> None:
        prompt_len, total_len = self.prompt_len, self.prompt_len + self.max_new_tokens
        device = self.prompt_ids.device
        queries = torch.arange(prompt_len, device=device)[:, None]
        keys = torch.arange(total_len, device=device)[None, :]
        key_real = torch.nn.functional.pad(self.prompt_mask, (0, self.max_new_tokens))  # [B, S]
        allowed = (keys <= queries) & (key_real[:, None, :] | (keys == queries))  # [B, P, S]
        mask = torch.zeros(allowed.shape, dtype=self.compute_dtype, device=device)
        mask.masked_fill_(~allowed, self.mask_min)
        hidden = self._hidden(self.prompt_ids, mask[:, None], position_ids_from_mask(self.prompt_mask))
        last_real = (self.prompt_mask.long() * torch.arange(prompt_len, device=device)).argmax(-1)
        self._emit(hidden[torch.arange(hidden.shape[0], device=device), last_real])

    def step(self) -> None:
        """One decode step: feed ``next_input`` at slot ``cache_index``, choose the next token."""
        self.decode_mask.index_fill_(3, self.cache_index, 0.0)
        if self.fast_step is not None:
            layers = self.cache.layers
            hidden = self.fast_step(
                self.next_input, self.next_position, self.decode_mask, self.cache_index,
                [layer.keys for layer in layers], [layer.values for layer in layers],
            )
        else:
            hidden = self._hidden(self.next_input, self.decode_mask, self.next_position)[:, -1]
        self._emit(hidden)
        self.next_position += 1
        self.cache_index += 1

    def decode(self, *, use_cuda_graph: bool) -> None:
        """The ``T - 1`` decode steps after the prefill."""
        steps = self.max_new_tokens - 1
        generator = self.selector.generator
        if use_cuda_graph and generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            use_cuda_graph = False  # this torch cannot replay a user generator inside a graph
        if steps == 0:
            return
        if not use_cuda_graph:
            self._run_eager(steps)
            return
        # CUDA graphs need a warm-up run before capture (lazy library initialization must not be captured): the
        # first step runs eagerly on a side stream; the captured step then replays for the remaining ones.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        if steps == 1:
            return
        graph = torch.cuda.CUDAGraph()
        if generator is not None and not self.selector.greedy:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self.step()
        self._replay(graph, steps - 1)

    def _run_eager(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    @staticmethod
    def _replay(graph, steps: int) -> None:
        for _ in range(steps):
            graph.replay()


# ------------------------------------------------------------------------------------------------- checks
def _resolve_policy(policy) -> tuple[PreTrainedModel, torch.Tensor, torch.Tensor | None]:
    if isinstance(policy, nn.parallel.DistributedDataParallel):
        policy = policy.module
    hf_model = getattr(policy, "hf_model", policy)
    if not isinstance(hf_model, PreTrainedModel) or hf_model.get_output_embeddings() is None:
        raise ValueError(f"policy must be a PolicyModel or a transformers causal LM, got {type(policy).__name__}")
    if hf_model.base_model is hf_model:
        raise ValueError(f"policy ({type(hf_model).__name__}) has no separate decoder stack")
    head = hf_model.get_output_embeddings()
    return hf_model, head.weight, getattr(head, "bias", None)


def _check_prompt(prompt_ids, prompt_mask) -> tuple[int, int]:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be a [B, P] tensor, got {getattr(prompt_ids, 'shape', prompt_ids)!r}")
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
        raise ValueError(f"prompt_ids must have at least one row and one column, got shape {(batch, prompt_len)}")
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
        raise ValueError(f"the sampler supports full-attention layers only, the model has layer_types={layer_types}")
