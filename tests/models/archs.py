"""Tiny random-weight causal LMs of the four architecture families the models and sampler must handle."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHITECTURES = ("gpt2", "gpt_neox", "llama", "qwen2")
VOCAB = 97  # not a power of two, so no shape coincides with a block size
PAD, BOS, EOS = 0, 1, 2
MAX_POSITIONS = 64


def build_causal_lm(arch: str, seed: int, *, dtype: torch.dtype = torch.float32, vocab: int = VOCAB,
                    tie_word_embeddings: bool | None = None, max_positions: int = MAX_POSITIONS):
    """A 2-layer model with hidden size 32-64, dropout off, special ids PAD/BOS/EOS, in eval mode."""
    special = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=48, n_head=3, vocab_size=vocab, n_positions=max_positions,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
        cls = GPT2LMHeadModel
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                               vocab_size=vocab, max_position_embeddings=max_positions, rotary_pct=0.5,
                               hidden_dropout=0.0, attention_dropout=0.0, **special)
        cls = GPTNeoXForCausalLM
    elif arch == "llama":
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, vocab_size=vocab, max_position_embeddings=max_positions,
                             **special)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        config = Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, vocab_size=vocab, max_position_embeddings=max_positions,
                             **special)
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        # The default init (std 0.02) gives nearly uniform next-token distributions; widen the weights so the
        # models have preferences (greedy choices far from ties, top-p sets of a few tokens).
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, 1.5 / parameter.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def left_padded_prompts(lengths: list[int], generator: torch.Generator, vocab: int = VOCAB):
    """Random prompts (ids 3..vocab-1, never a special id) left padded to the longest: ids, mask [B, P]."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask
