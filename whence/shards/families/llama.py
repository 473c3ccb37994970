"""The Llama family: Llama, Mistral, Qwen2, Qwen3. Their transformers 5.x decoders share Llama's forward (embed,
causal mask, rotary embeddings, blocks, norm) and differ only in which mask each block gets: full causal, or the
sliding-window causal mask (Mistral with a sliding window: every block; Qwen2 and Qwen3: per block, from
`config.layer_types`)."""

from __future__ import annotations

import torch
from torch import nn

from whence.shards.architecture import Architecture, block_extras, mask_arguments, position_ids

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class Llama(Architecture, family="llama", model_types=("llama", "mistral", "qwen2", "qwen3")):
    body, blocks, embed, final_norm = "model", "layers", "embed_tokens", "norm"
    rotary = "rotary_emb"

    def blocks_of(self, model: nn.Module) -> list[nn.Module]:
        # Llama-family forwards run self.layers[: config.num_hidden_layers]
        return super().blocks_of(model)[: model.config.num_hidden_layers]

    def run_blocks(self, config, parts: nn.ModuleDict, start: int, hidden: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        positions = position_ids(hidden)  # (1, T)
        rotary = parts["rotary"](hidden, position_ids=positions)  # (cos, sin)
        blocks = list(enumerate(parts["blocks"], start))  # (model block index, block)
        kinds = {i: attention_kind(config, i) for i, _ in blocks}
        arguments = mask_arguments(config, hidden, attention_mask, positions)
        masks = {}
        if FULL_ATTENTION in kinds.values():
            masks[FULL_ATTENTION] = create_causal_mask(**arguments)
        if SLIDING_ATTENTION in kinds.values():
            masks[SLIDING_ATTENTION] = create_sliding_window_causal_mask(**arguments)
        extras = block_extras(config)
        for i, block in blocks:
            hidden = block(hidden, attention_mask=masks[kinds[i]], position_embeddings=rotary,
                           position_ids=positions, past_key_values=None, use_cache=False, **extras)
        return hidden


def attention_kind(config, block: int) -> str:
    """Which mask model block `block` gets, as the family's forward decides it."""
    if config.model_type in ("qwen2", "qwen3"):
        return config.layer_types[block]
    if config.model_type == "mistral" and config.sliding_window is not None:
        return SLIDING_ATTENTION
    return FULL_ATTENTION
