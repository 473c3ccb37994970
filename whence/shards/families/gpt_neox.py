"""GPT-NeoX (transformers' GPTNeoXForCausalLM, e.g. Pythia): rotary position embeddings, one causal mask."""

from __future__ import annotations

import torch
from torch import nn

from whence.shards.architecture import Architecture, block_extras, mask_arguments, position_ids


class GPTNeoX(Architecture, family="gpt_neox", model_types=("gpt_neox",)):
    body, blocks, embed, final_norm = "gpt_neox", "layers", "embed_in", "final_layer_norm"
    rotary, dropout = "rotary_emb", "emb_dropout"

    def run_blocks(self, config, parts: nn.ModuleDict, start: int, hidden: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        positions = position_ids(hidden)  # (1, T)
        rotary = parts["rotary"](hidden, position_ids=positions)  # (cos, sin)
        mask = create_causal_mask(**mask_arguments(config, hidden, attention_mask, positions))
        extras = block_extras(config)
        for block in parts["blocks"]:
            hidden = block(hidden, attention_mask=mask, position_ids=positions, layer_past=None, use_cache=False,
                           position_embeddings=rotary, **extras)
        return hidden
