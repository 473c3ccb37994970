"""GPT-2 (transformers' GPT2LMHeadModel): learned absolute position embeddings, one causal mask for all blocks."""

from __future__ import annotations

import torch
from torch import nn

from whence.shards.architecture import Architecture, block_extras, mask_arguments, position_ids


class GPT2(Architecture, family="gpt2", model_types=("gpt2",)):
    body, blocks, embed, final_norm = "transformer", "h", "wte", "ln_f"
    positions, dropout = "wpe", "drop"

    def embed_inputs(self, parts: nn.ModuleDict, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = parts["embed"](input_ids)  # (B, T, H)
        hidden = hidden + parts["positions"](position_ids(hidden)).to(hidden.device)  # wte(ids) + wpe(positions)
        return parts["dropout"](hidden)

    def run_blocks(self, config, parts: nn.ModuleDict, start: int, hidden: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        positions = position_ids(hidden)  # (1, T)
        mask = create_causal_mask(**mask_arguments(config, hidden, attention_mask, positions))
        extras = block_extras(config)
        for block in parts["blocks"]:  # (hidden, past_key_values, attention_mask, encoder_hidden_states)
            hidden = block(hidden, None, mask, None, encoder_attention_mask=None, use_cache=False,
                           position_ids=positions, **extras)
        return hidden
