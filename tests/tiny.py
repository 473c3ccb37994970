"""Tiny models of each architecture family and a tiny tokenizer, built from configs (never downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from whence.tokenizer import train_bpe_tokenizer

TEXTS = [
    "The whale swam far beyond the harbour, and the sailors watched it go.",
    "It is a truth universally acknowledged that a single man in possession of a good fortune must be in want of a wife.",
    "The state of the union is strong, said the president to the assembled congress.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.",
    "The committee met on Tuesday to discuss the budget and the new harbour.",
    "She walked to the window and looked at the rain falling on the garden.",
    "Numbers one two three four five six seven eight nine ten eleven twelve.",
    "A quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
]
FAMILIES = ("gpt2", "llama", "neox")


def make_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on TEXTS: small and deterministic, with an end-of-text token as BOS/EOS/pad."""
    return train_bpe_tokenizer(TEXTS * 4, vocab_size)


def make_model(family: str, vocab_size: int, hidden: int = 16, layers: int = 2, context: int = 64,
               dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, n_positions=context, bos_token_id=0, eos_token_id=0,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=context, tie_word_embeddings=False,
                             bos_token_id=0, eos_token_id=0)
        model = LlamaForCausalLM(config)
    elif family == "neox":
        config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=context,
                               rotary_pct=0.5, bos_token_id=0, eos_token_id=0)
        model = GPTNeoXForCausalLM(config)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()
