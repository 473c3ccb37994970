"""What a pipeline stage needs to know about a model family, and the registry of families.

A family (GPT-2, the Llama family, GPT-NeoX) is one module in `whence/shards/families/` that subclasses
`Architecture`: where the causal-LM wrapper keeps its parts (attribute names), which blocks its forward runs, and
that forward as a stage runs it: the embeddings on stage 0, then the blocks called exactly as the family's Hugging
Face forward calls them (transformers 5.x). Defining the subclass registers it for its `model_types`, as
kronfluence's tracked modules register the module types they wrap; `architecture_of(model)` finds it from
`config.model_type`.

Every family repeats the parts of the HF forward that each block needs: position ids `arange(T)` (right padding),
the causal mask from `attention_mask`, and rotary position embeddings where the family has them. They are cheap and
depend only on the batch, so each stage recomputes them rather than receiving them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from whence.errors import ModelError

# family name -> its Architecture; config.model_type -> family name. Filled by Architecture's subclasses.
ARCHITECTURES: dict[str, Architecture] = {}
MODEL_TYPES: dict[str, str] = {}


class Architecture:
    """A model family as pipeline stages see it. Subclass it with `family=` and `model_types=` to register:

        class GPT2(Architecture, family="gpt2", model_types=("gpt2",)):
            body, blocks, embed, final_norm = "transformer", "h", "wte", "ln_f"
            def run_blocks(self, config, parts, start, hidden, attention_mask): ...

    The attribute names below are those of the causal-LM wrapper (`head`) and of the decoder inside it (the rest).
    """

    family: ClassVar[str]  # the registry's key
    model_types: ClassVar[tuple[str, ...]]  # the config.model_type values this family's forward serves
    body: ClassVar[str]  # the decoder inside the wrapper
    blocks: ClassVar[str]  # its ModuleList of transformer blocks
    embed: ClassVar[str]  # token embeddings
    final_norm: ClassVar[str]
    positions: ClassVar[str | None] = None  # learned absolute position embeddings (GPT-2)
    rotary: ClassVar[str | None] = None  # rotary embedding module (cos, sin from position ids)
    dropout: ClassVar[str | None] = None  # embedding dropout
    head: ClassVar[str] = "lm_head"

    def __init_subclass__(cls, *, family: str, model_types: tuple[str, ...], **kwargs):
        super().__init_subclass__(**kwargs)
        cls.family, cls.model_types = family, tuple(model_types)
        ARCHITECTURES[family] = cls()
        MODEL_TYPES.update({model_type: family for model_type in cls.model_types})

    # -- where the parts are ----------------------------------------------------------------------------------
    def blocks_of(self, model: nn.Module) -> list[nn.Module]:
        """The blocks the family's forward runs, in order."""
        return list(getattr(getattr(model, self.body), self.blocks))

    def stage_parts(self, model: nn.Module, block_range: tuple[int, int], first: bool, last: bool
                    ) -> dict[str, nn.Module]:
        """The modules of the stage holding blocks [start, stop): embeddings on the first stage, final norm and LM
        head on the last, rotary embeddings on every stage that has them (references, not copies)."""
        body = getattr(model, self.body)
        parts: dict[str, nn.Module] = {}
        if first:
            parts["embed"] = getattr(body, self.embed)
            if self.positions:
                parts["positions"] = getattr(body, self.positions)
            if self.dropout:
                parts["dropout"] = getattr(body, self.dropout)
        if self.rotary:
            parts["rotary"] = getattr(body, self.rotary)
        parts["blocks"] = nn.ModuleList(self.blocks_of(model)[block_range[0] : block_range[1]])
        if last:
            parts["final_norm"] = getattr(body, self.final_norm)
            parts["head"] = getattr(model, self.head)
        return parts

    def held_modules(self, model: nn.Module, block_range: tuple[int, int], first: bool, last: bool
                     ) -> list[nn.Module]:
        """The modules whose tracked layers belong to that stage: its blocks, the token embeddings on the first
        stage, the final norm and LM head on the last."""
        body = getattr(model, self.body)
        held = list(self.blocks_of(model)[block_range[0] : block_range[1]])
        if first:
            held.append(getattr(body, self.embed))
        if last:
            held += [getattr(body, self.final_norm), getattr(model, self.head)]
        return held

    def last_modules(self, model: nn.Module) -> list[nn.Module]:
        """The final norm and LM head: the last stage's work besides its blocks."""
        return [getattr(getattr(model, self.body), self.final_norm), getattr(model, self.head)]

    def check(self, model: nn.Module) -> None:
        """ModelError unless `model` has every part this family's stages use."""
        model_type = model.config.model_type
        body = getattr(model, self.body, None)
        needed = [self.blocks, self.embed, self.final_norm] + [a for a in (self.positions, self.rotary) if a]
        if body is None or getattr(model, self.head, None) is None or any(getattr(body, a, None) is None for a in needed):
            raise ModelError(
                f"cannot split {type(model).__name__} (model_type {model_type!r}) into pipeline stages: expected a "
                f"causal LM with {self.body}.{{{', '.join(needed)}}} and {self.head}; supported model types: "
                f"{supported_model_types()}"
            )
        if getattr(model.config, "add_cross_attention", False):
            raise ModelError(f"cannot split {type(model).__name__}: cross-attention blocks are not supported")

    # -- the forward --------------------------------------------------------------------------------------------
    def embed_inputs(self, parts: nn.ModuleDict, input_ids: torch.Tensor) -> torch.Tensor:
        """Stage 0: (B, T) token ids -> (B, T, H) hidden states entering the first block."""
        hidden = parts["embed"](input_ids)  # (B, T, H)
        if "dropout" in parts:
            hidden = parts["dropout"](hidden)
        return hidden

    def run_blocks(self, config, parts: nn.ModuleDict, start: int, hidden: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """parts["blocks"] (model blocks start, start + 1, ...) on (B, T, H) hidden states, as the family's HF
        forward calls them without a cache; attention_mask (B, T), 1 for real tokens (right padding)."""
        raise NotImplementedError


def supported_model_types() -> str:
    return ", ".join(sorted(MODEL_TYPES))


def architecture_of(model: nn.Module) -> Architecture:
    """The model's Architecture, or ModelError naming what cannot be split."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ModelError(
            f"cannot split {type(model).__name__} (model_type {model_type!r}) into pipeline stages; "
            f"supported model types: {supported_model_types()}"
        )
    architecture = ARCHITECTURES[MODEL_TYPES[model_type]]
    architecture.check(model)
    return architecture


# -- what every family's forward builds per batch ---------------------------------------------------------------
def position_ids(hidden: torch.Tensor) -> torch.Tensor:
    """(1, T) as the HF forwards build them without a cache: arange(T), the same for every row (right padding)."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def mask_arguments(config, hidden: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> dict:
    """The keyword arguments of transformers.masking_utils' create_causal_mask and its sliding-window variant."""
    return dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None,
                position_ids=positions)


def block_extras(config) -> dict:
    """Keyword arguments every block gets besides its own: `is_causal` where the config sets it (the HF forward's
    merge_with_config_defaults passes it on)."""
    if getattr(config, "is_causal", None) is not None:
        return {"is_causal": config.is_causal}
    return {}
