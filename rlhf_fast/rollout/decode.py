"""The decode machinery behind ``sample``: the static KV cache and loop buffers, the prefill and the decode step.

``_DecodeBuffers`` holds every tensor a decode step reads or writes at a fixed address: transformers'
``StaticCache`` (transformers 5.x; each layer ``[B, kv_heads, P + T, d_head]`` with a device-side write counter it
advances in place), the token fed next, its position, the additive key mask, the write index, the finished flags
and the outputs. ``_DecodeProgram`` is one model and sampling setting acting on them: ``prefill`` runs the prompts
into the cache and picks the first token, ``step`` feeds one token per row and picks the next, all on the device,
so that a step is a fixed sequence of kernels the sampler can replay as a CUDA graph. The attention mask is ours: a
4D additive mask ``[B, 1, q, P + T]`` that transformers passes through unchanged, with padded keys masked and each
padded prompt query allowed to see itself (so no softmax row is empty). ``SampleOutput`` is what a run returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import StaticCache

from rlhf_fast import _extension
from rlhf_fast.models.functional import functional_decode_step
from rlhf_fast.models.masks import causal_mask, position_ids_from_mask
from rlhf_fast.ops._backend import select_backend


def _compiled_record_runs(device: torch.device) -> bool:
    """Whether the bookkeeping after each draw runs as one C++ kernel (csrc/cpu/decode_record.cpp): on a CPU,
    where a dozen small ops cost a third of a small model's decode step; their torch form in `_emit` is the
    reference, and what a CUDA graph replays at no per-op cost."""
    return device.type == "cpu" and select_backend("decode_record", device, ("reference", "cpp"), ()) == "cpp"


@dataclass
class SampleOutput:
    """The result of ``sample``.

    sequences:     [B, P + T] int64, the prompt (as given, left padded) followed by the response.
    response_ids:  [B, T] int64, the sampled tokens; ``pad_token_id`` after a row's EOS.
    response_mask: [B, T] bool, True up to and including the row's first EOS.
    logprobs:      [B, T] float32 or None, log-prob of each sampled token under the temperature-scaled
                   distribution, before top-k / top-p filtering by default, or under the filtered and
                   renormalized distribution the token was drawn from with ``filtered_logprobs=True``; 0 where
                   ``response_mask`` is False. With ``temperature=0`` (greedy), under the unscaled distribution.
    entropy:       [B, T] float32 or None (``return_entropy``), the entropy of the same distribution at each
                   step, from the logits the step already has; 0 where ``response_mask`` is False.
    """

    sequences: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None
    entropy: torch.Tensor | None = None


class _DecodeBuffers:
    """Every tensor the decode step reads or writes, at fixed addresses: the KV cache, the loop state, the outputs.

    ``response_width`` columns of outputs: ``T`` for a one-off call, ``P + T`` for a cached graph (which then serves
    any split of the same total length).
    """

    def __init__(
        self,
        *,
        config,
        batch: int,
        total_len: int,
        response_width: int,
        compute_dtype: torch.dtype,
        device: torch.device,
    ):
        self.total_len = total_len
        self.mask_min = torch.finfo(compute_dtype).min
        self.cache = StaticCache(config=config, max_cache_len=total_len)
        # Outputs.
        self.response_ids = torch.empty((batch, response_width), dtype=torch.long, device=device)
        self.response_mask = torch.empty((batch, response_width), dtype=torch.bool, device=device)
        self.logprobs = torch.empty((batch, response_width), dtype=torch.float32, device=device)
        self.entropy = torch.empty((batch, response_width), dtype=torch.float32, device=device)
        # Loop state.
        self.finished = torch.empty(batch, dtype=torch.bool, device=device)
        self.next_input = torch.empty((batch, 1), dtype=torch.long, device=device)
        self.next_position = torch.empty((batch, 1), dtype=torch.long, device=device)
        self.step_index = torch.empty(1, dtype=torch.long, device=device)  # response column written next
        self.cache_index = torch.empty(1, dtype=torch.long, device=device)  # cache slot fed next
        # Additive: 0 where a key is visible, the dtype's minimum where it is masked.
        self.decode_mask = torch.empty((batch, 1, 1, total_len), dtype=compute_dtype, device=device)

    def reset(self, prompt_mask: torch.Tensor, pad_token_id: int) -> None:
        """The state before the prefill of these prompts, written in place (device-side only)."""
        prompt_len = prompt_mask.shape[1]
        self.cache.reset()
        self.response_ids.fill_(pad_token_id)
        self.response_mask.zero_()
        self.logprobs.zero_()
        self.entropy.zero_()
        self.finished.zero_()
        self.next_input.zero_()
        self.next_position.copy_(prompt_mask.sum(-1, keepdim=True))  # first response token's position
        self.step_index.zero_()
        self.cache_index.fill_(prompt_len)
        # Decode steps see the real prompt keys; prompt padding and not-yet-written slots stay masked.
        self.decode_mask.fill_(self.mask_min)
        self.decode_mask[:, 0, 0, :prompt_len].masked_fill_(prompt_mask, 0.0)


class _DecodeProgram:
    """The prefill and the decode step of one model and sampling setting, acting on ``_DecodeBuffers``."""

    def __init__(
        self,
        *,
        backbone,
        weight,
        bias,
        config,
        selector,
        eos_ids,
        pad_token_id,
        return_logprobs,
        return_entropy=False,
        stop_check_every=0,
    ):
        self.backbone, self.weight, self.bias, self.config = backbone, weight, bias, config
        self.selector, self.eos_ids, self.pad_token_id = selector, eos_ids, pad_token_id
        self.return_logprobs, self.return_entropy = return_logprobs, return_entropy
        self.stop_check_every = stop_check_every
        # The attention mask is added to the scores, so it takes the backbone's dtype (not necessarily the head's).
        self.compute_dtype = backbone.get_input_embeddings().weight.dtype
        self.mask_min = torch.finfo(self.compute_dtype).min
        self.fast_step = functional_decode_step(backbone)
        self.head_columns: torch.Tensor | None = None  # see `copy_head`
        self.compiled_record = _compiled_record_runs(weight.device)

    def copy_head(self) -> None:
        """For an eager loop on a CPU: the head as a [d, V] copy, since BLAS multiplies a few rows by a transposed
        weight at about half speed (one thread, batch 8, d 128, V 2,048: 78 vs 43 µs). Made per call, as the
        weights change between calls; a graph reads the weight itself, by address."""
        if self.weight.device.type == "cpu":
            self.head_columns = self.weight.detach().t().contiguous()

    def buffers(
        self, batch: int, total_len: int, response_width: int, device: torch.device
    ) -> _DecodeBuffers:
        return _DecodeBuffers(
            config=self.config,
            batch=batch,
            total_len=total_len,
            response_width=response_width,
            compute_dtype=self.compute_dtype,
            device=device,
        )

    def graph_key(self, batch: int, total_len: int, device: torch.device) -> tuple:
        """Everything besides the model's tensors that fixes the captured kernels and their shapes."""
        selector = self.selector
        autocast = torch.is_autocast_enabled(device.type)
        return (
            batch,
            total_len,
            device,
            self.compute_dtype,
            self.weight.dtype,
            self.fast_step is not None,
            getattr(self.config, "_attn_implementation", None),
            selector.temperature,
            selector.top_k,
            selector.top_p,
            selector.filtered_logprobs,
            self.eos_ids,
            self.pad_token_id,
            self.return_logprobs,
            self.return_entropy,
            autocast,
            torch.get_autocast_dtype(device.type) if autocast else None,
        )

    def _hidden(self, buffers, input_ids, attention_mask, position_ids) -> torch.Tensor:
        output = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=buffers.cache,
            use_cache=True,
        )
        return output.last_hidden_state

    def _emit(self, buffers: _DecodeBuffers, last_hidden: torch.Tensor) -> None:
        """From the hidden state [B, d] at each row's newest token: choose, record, and advance."""
        last_hidden = last_hidden.to(self.weight.dtype)
        if self.head_columns is None:
            logits = nn.functional.linear(last_hidden, self.weight, self.bias)
        elif self.bias is None:
            logits = torch.mm(last_hidden, self.head_columns)
        else:
            logits = torch.addmm(self.bias, last_hidden, self.head_columns)
        logits = logits.float()
        tokens, logprobs, entropy = self.selector(logits, self.return_logprobs, self.return_entropy)
        if self.compiled_record:
            _extension.kernels().decode_record(
                tokens, logprobs, entropy, self.eos_ids, self.pad_token_id, buffers.step_index, buffers.finished,
                buffers.response_ids, buffers.response_mask, buffers.logprobs, buffers.entropy, buffers.next_input,
            )  # fmt: skip
            return
        alive = ~buffers.finished
        tokens = torch.where(alive, tokens, self.pad_token_id)
        buffers.response_ids.index_copy_(1, buffers.step_index, tokens[:, None])
        buffers.response_mask.index_copy_(1, buffers.step_index, alive[:, None])
        if logprobs is not None:
            buffers.logprobs.index_copy_(1, buffers.step_index, torch.where(alive, logprobs, 0.0)[:, None])
        if entropy is not None:
            buffers.entropy.index_copy_(1, buffers.step_index, torch.where(alive, entropy, 0.0)[:, None])
        for eos in self.eos_ids:
            buffers.finished |= tokens == eos
        buffers.next_input.copy_(tokens[:, None])
        buffers.step_index += 1

    def prefill(self, buffers: _DecodeBuffers, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """The prompts through the model into the cache, and the first response token. prompt_mask: [B, P] bool."""
        prompt_len, total_len = prompt_ids.shape[1], buffers.total_len
        device = prompt_ids.device
        # The prompts' causal mask, its keys widened to the whole cache (slots not yet written stay masked).
        mask = nn.functional.pad(causal_mask(prompt_mask, self.compute_dtype), (0, total_len - prompt_len),
                                 value=self.mask_min)  # fmt: skip
        hidden = self._hidden(buffers, prompt_ids, mask, position_ids_from_mask(prompt_mask))
        last_real = (prompt_mask.long() * torch.arange(prompt_len, device=device)).argmax(-1)
        self._emit(buffers, hidden[torch.arange(hidden.shape[0], device=device), last_real])

    def step(self, buffers: _DecodeBuffers) -> None:
        """One decode step: feed ``next_input`` at slot ``cache_index``, choose the next token."""
        buffers.decode_mask.index_fill_(3, buffers.cache_index, 0.0)
        if self.fast_step is not None:
            layers = buffers.cache.layers
            hidden = self.fast_step(
                buffers.next_input,
                buffers.next_position,
                buffers.decode_mask,
                buffers.cache_index,
                [layer.keys for layer in layers],
                [layer.values for layer in layers],
            )
        else:
            hidden = self._hidden(buffers, buffers.next_input, buffers.decode_mask, buffers.next_position)
            hidden = hidden[:, -1]
        self._emit(buffers, hidden)
        buffers.next_position += 1
        buffers.cache_index += 1

    def output(
        self, buffers: _DecodeBuffers, prompt_ids: torch.Tensor, max_new_tokens: int, copy: bool
    ) -> SampleOutput:
        """The first ``max_new_tokens`` output columns; copied when the buffers outlive the call."""
        columns = slice(0, max_new_tokens)
        response_ids = buffers.response_ids[:, columns]
        response_mask = buffers.response_mask[:, columns]
        logprobs = buffers.logprobs[:, columns] if self.return_logprobs else None
        entropy = buffers.entropy[:, columns] if self.return_entropy else None
        if copy:
            response_ids, response_mask = response_ids.clone(), response_mask.clone()
            logprobs = logprobs.clone() if logprobs is not None else None
            entropy = entropy.clone() if entropy is not None else None
        return SampleOutput(
            sequences=torch.cat([prompt_ids, response_ids], dim=1),
            response_ids=response_ids,
            response_mask=response_mask,
            logprobs=logprobs,
            entropy=entropy,
        )

    def all_finished(self, buffers: _DecodeBuffers, steps_done: int) -> bool:
        """Every ``stop_check_every`` steps: whether every row has finished (a host read); False otherwise."""
        every = self.stop_check_every
        return every > 0 and steps_done % every == 0 and bool(buffers.finished.all())
