"""The tiny GPT family of the embedded default, and a word-level tokenizer built offline.

Both are ordinary ``transformers`` / ``tokenizers`` objects: they save with ``save_pretrained`` and load with
``AutoModelForCausalLM`` / ``AutoTokenizer``, so the demo runs through the same code path as real checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# GPT-2 shapes: layers, width, heads.
TINY_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "mini": {"n_layer": 4, "n_embd": 64, "n_head": 2},  # tiny's width, twice its depth
    "small": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "base": {"n_layer": 6, "n_embd": 192, "n_head": 6},
}

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "[pad]", "[bos]", "[eos]", "[unk]"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3 in that order


def tiny_causal_lm(
    size: str,
    vocab_size: int,
    *,
    max_positions: int = 256,
    seed: int = 0,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    dtype: torch.dtype = torch.float32,
) -> GPT2LMHeadModel:
    """A randomly initialized GPT-2 of one of ``TINY_SIZES``, dropout off (RLHF log-prob ratios need a
    deterministic forward). The default special-token ids match ``build_word_tokenizer``.

    The global RNG is left untouched: initialization draws from a fork seeded with ``seed``.
    """
    if size not in TINY_SIZES:
        raise ValueError(f"size must be one of {sorted(TINY_SIZES)}, got {size!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if max_positions < 2:
        raise ValueError(f"max_positions must be at least 2, got {max_positions}")
    for name, token_id in (
        ("pad_token_id", pad_token_id),
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
    ):
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise ValueError(f"{name}={token_id} is outside the vocabulary [0, {vocab_size})")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
        **TINY_SIZES[size],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(dtype)


def build_word_tokenizer(
    words: Iterable[str],
    *,
    padding_side: str = "left",
    add_bos_token: bool = False,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: whitespace splitting, one id per word.

    Ids: ``[pad]`` 0, ``[bos]`` 1, ``[eos]`` 2, ``[unk]`` 3, then ``words`` in first-seen order (duplicates and
    special tokens in ``words`` are skipped). Unknown words map to ``[unk]``. With ``add_bos_token`` every
    encoded sequence starts with ``[bos]``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise ValueError(f"words must be non-empty strings without whitespace, got {word!r}")
        vocab.setdefault(word, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos_token:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A $B",
            special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
        )
    kwargs = {"model_max_length": model_max_length} if model_max_length is not None else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side=padding_side,
        **kwargs,
    )
