"""Model shards: a causal LM cut into pipeline stages, each holding a contiguous range of transformer blocks.

Influence is a sum over tracked layers, so a model too large for one device can be split into N stages that each
fit their own layers' statistics and score their own layers; partial results are summed (or, per layer, placed
side by side). Nothing here imports Ray: `actors/shard.py` wraps a `Stage` in an actor.

Protocol for one micro-batch (ids are ints chosen by the caller; a stage keeps state per id):
    stage 0     forward(id, batch)            -> {batch keys..., "hidden_states": (B, T, H)}
    stage k     forward(id, outputs of k - 1) -> the same, its own blocks applied
    last stage  forward(id, outputs of k - 1) -> {"objective": (B,)}     keeps the per-sequence objective
    last stage  backward(id, None)            -> {"hidden_states": dL/dh (B, T, H)}
    stage k     backward(id, grads of k + 1)  -> {"hidden_states": dL/dh}  ({} on stage 0)
    each stage  accumulate_covariance(id) | accumulate_corrections(id) | score(id, per_token)
Everything that crosses a stage boundary is a dict of plain CPU tensors, so Ray can carry it. Backward is
activation-only: parameters are frozen during forward, and `torch.autograd.grad` runs to the stage's input
hidden states and to its tracked layers' outputs, never to a weight.

Each stage repeats the parts of the Hugging Face forward that every block needs (transformers 5.x): position ids
`arange(T)` (right padding), the causal mask from `attention_mask` (`create_causal_mask`, or the sliding-window
mask where the family uses one) and rotary position embeddings. They are cheap and depend only on the batch, so
they are recomputed per stage rather than shipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from whence.errors import ModelError
from whence.factors import CovarianceSums, LambdaSums, LayerBasis, compute_dtype
from whence.fitting import basis_to
from whence.model import TrackedLayer, find_tracked_layers
from whence.queries import PreparedQueries
from whence.scoring import BatchScores, QueryScorer
from whence.task import LanguageModelingTask
from whence.tracking import LayerCapture, layer_capture, recorded_layers

# Keys of a batch (whence.text.collate, plus true-Fisher seeds) that travel with the hidden states.
BATCH_KEYS = ("input_ids", "attention_mask", "target_mask", "seeds")
HIDDEN_STATES = "hidden_states"
OBJECTIVE = "objective"
# What the last stage differentiates: the Fisher objective (fitting) or log p(m) (scoring), as in
# whence.task.LanguageModelingTask.
OBJECTIVES = ("fisher", "log_likelihood")

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps the parts a pipeline stage needs, as attribute names on the causal-LM wrapper."""

    family: str  # how blocks are called: "gpt2", "gpt_neox" or "llama"
    body: str  # the decoder inside the wrapper
    blocks: str  # its ModuleList of transformer blocks
    embed: str  # token embeddings
    final_norm: str
    positions: str | None = None  # learned absolute position embeddings (GPT-2)
    rotary: str | None = None  # rotary embedding module (cos, sin from position ids)
    dropout: str | None = None  # embedding dropout
    head: str = "lm_head"


ARCHITECTURES = {
    "gpt2": Architecture("gpt2", "transformer", "h", "wte", "ln_f", positions="wpe", dropout="drop"),
    "gpt_neox": Architecture("gpt_neox", "gpt_neox", "layers", "embed_in", "final_layer_norm", rotary="rotary_emb",
                             dropout="emb_dropout"),
    "llama": Architecture("llama", "model", "layers", "embed_tokens", "norm", rotary="rotary_emb"),
}
# config.model_type -> architecture. The Llama-family decoders listed here share Llama's forward in transformers
# 5.x (embed, causal mask, rotary, blocks, norm); they differ only in which mask each layer uses.
MODEL_TYPES = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "llama", "qwen2": "llama",
               "qwen3": "llama"}


def architecture_of(model: nn.Module) -> Architecture:
    """The model's Architecture, or ModelError naming what cannot be split."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(MODEL_TYPES))
    if model_type not in MODEL_TYPES:
        raise ModelError(
            f"cannot split {type(model).__name__} (model_type {model_type!r}) into pipeline stages; "
            f"supported model types: {supported}"
        )
    arch = ARCHITECTURES[MODEL_TYPES[model_type]]
    body = getattr(model, arch.body, None)
    needed = [arch.blocks, arch.embed, arch.final_norm] + [a for a in (arch.positions, arch.rotary) if a]
    if body is None or getattr(model, arch.head, None) is None or any(getattr(body, a, None) is None for a in needed):
        raise ModelError(
            f"cannot split {type(model).__name__} (model_type {model_type!r}) into pipeline stages: expected a "
            f"causal LM with {arch.body}.{{{', '.join(needed)}}} and {arch.head}; supported model types: {supported}"
        )
    if getattr(config, "add_cross_attention", False):
        raise ModelError(f"cannot split {type(model).__name__}: cross-attention blocks are not supported")
    return arch


# ---------------------------------------------------------------------------------------------------------
# Choosing the stages


def parameter_count(modules: Iterable[nn.Module]) -> int:
    """Parameters held by these modules, each tensor counted once (tied weights too)."""
    seen, total = set(), 0
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
    return total


def balance_blocks(block_sizes: Sequence[int], num_stages: int, first_extra: int = 0, last_extra: int = 0
                   ) -> list[tuple[int, int]]:
    """Contiguous block ranges [start, stop), one per stage and at least one block each, that minimise the largest
    stage's parameter count. Stage 0 also holds `first_extra` (embeddings), the last stage `last_extra` (final
    norm and LM head). Ties go to the split with the earliest cuts. Dynamic programme, O(num_stages * n^2)."""
    n = len(block_sizes)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} blocks into {num_stages} stages (each stage needs at least one block)")
    prefix = [0]
    for size in block_sizes:
        prefix.append(prefix[-1] + size)

    def load(stage: int, start: int, stop: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == num_stages - 1 else 0)
        return prefix[stop] - prefix[start] + extra

    inf = float("inf")
    # best[s][j]: the smallest possible largest load when stages 0..s hold blocks [0, j); cut[s][j]: stage s start.
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = load(0, 0, j)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                value = max(best[s - 1][i], load(s, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, stop = [], n
    for s in range(num_stages - 1, 0, -1):
        start = cut[s][stop]
        bounds.append((start, stop))
        stop = start
    bounds.append((0, stop))
    return bounds[::-1]


def plan_stages(model: nn.Module, num_stages: int) -> list[tuple[int, int]]:
    """The block range [start, stop) of each stage, balancing the stages' compute (ModelError if impossible).

    A token costs each weight matrix it passes through ~2 x its parameters in multiply-adds, so a stage's work
    is the parameter count of its blocks, plus the final norm and LM head on the last stage. The embeddings are
    lookups, not products: they are left out, or stage 0 would get too few blocks and idle behind the last
    (with a 32k vocabulary and width 512, the head alone is five blocks' work)."""
    arch = architecture_of(model)
    body = getattr(model, arch.body)
    blocks = _active_blocks(model, arch)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    if num_stages > len(blocks):
        raise ModelError(
            f"cannot split {type(model).__name__} into {num_stages} stages: it has {len(blocks)} transformer "
            f"blocks and each stage needs at least one"
        )
    last = [getattr(body, arch.final_norm), getattr(model, arch.head)]
    return balance_blocks([parameter_count([b]) for b in blocks], num_stages, 0, parameter_count(last))


def _active_blocks(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    blocks = list(getattr(getattr(model, arch.body), arch.blocks))
    if arch.family == "llama":  # Llama-family forwards run self.layers[: config.num_hidden_layers]
        blocks = blocks[: model.config.num_hidden_layers]
    return blocks


# ---------------------------------------------------------------------------------------------------------
# A stage


@dataclass
class _InFlight:
    """What a stage keeps between forward and backward of one micro-batch."""

    batch: dict  # on the stage's device
    inputs: torch.Tensor | None  # (B, T, H) received hidden states, requires grad; None on stage 0
    outputs: torch.Tensor | None  # (B, T, H) sent on; None on the last stage
    objective: torch.Tensor | None  # (B,) on the last stage
    layer_inputs: list[torch.Tensor]  # per tracked layer, detached
    layer_outputs: list[torch.Tensor]  # per tracked layer, in the graph


@dataclass
class _Captured:
    captures: list[LayerCapture]
    tokens: int
    sequences: int
    width: int  # T, for per-token scores of a stage without tracked layers


@dataclass
class StageStatistics:
    """One stage's partial sums and the micro-batch ids they include (so re-runs never count twice)."""

    covariance: CovarianceSums
    corrections: LambdaSums
    covariance_ids: set[int] = field(default_factory=set)
    correction_ids: set[int] = field(default_factory=set)


class Stage:
    """Blocks [start, stop) of a causal LM and, on stage 0, its embeddings, on the last stage its final norm and
    LM head. Holds references to those modules only; tracked layers inside them are its own.

    Built by `split_model`; see the module docstring for the forward/backward protocol.
    """

    def __init__(self, index: int, num_stages: int, model: nn.Module, arch: Architecture, block_range: tuple[int, int],
                 layers: list[TrackedLayer], positions: list[int], fisher: str = "true", num_blocks: int = 1,
                 task: LanguageModelingTask | None = None):
        self.index, self.num_stages = index, num_stages
        self.arch = arch
        self.config = model.config
        self.model_type = model.config.model_type
        self.block_range = block_range
        body = getattr(model, arch.body)
        parts: dict[str, nn.Module] = {}
        if self.first:
            parts["embed"] = getattr(body, arch.embed)
            if arch.positions:
                parts["positions"] = getattr(body, arch.positions)
            if arch.dropout:
                parts["dropout"] = getattr(body, arch.dropout)
        if arch.rotary:
            parts["rotary"] = getattr(body, arch.rotary)
        parts["blocks"] = nn.ModuleList(_active_blocks(model, arch)[block_range[0] : block_range[1]])
        if self.last:
            parts["final_norm"] = getattr(body, arch.final_norm)
            parts["head"] = getattr(model, arch.head)
        # A container of references: the modules stay where they are in `model` too.
        self.parts = nn.ModuleDict(parts)
        self.layers = list(layers)
        self.positions = list(positions)  # each layer's index in the model's tracked-layer order
        self.fisher = fisher
        self.num_blocks = num_blocks
        self.task = task or LanguageModelingTask()
        self.shapes = {layer.name: (layer.d_out, layer.d_in) for layer in self.layers}
        self._in_flight: dict[int, _InFlight] = {}
        self._captured: dict[int, _Captured] = {}
        self.statistics = self._empty_statistics()
        self.bases: dict[str, LayerBasis | None] | None = None  # None until set_bases: required for corrections
        self.scorer: QueryScorer | None = None
        self.num_queries: int | None = None  # None until set_queries

    # -- description ---------------------------------------------------------------------------------------
    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def device(self) -> torch.device:
        return next(self.parts.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parts.parameters()).dtype

    def describe(self) -> dict:
        return {"stage": self.index, "num_stages": self.num_stages, "blocks": list(self.block_range),
                "layers": [layer.describe() for layer in self.layers], "positions": list(self.positions),
                "parameters": parameter_count([self.parts]), "device": str(self.device)}

    def to(self, device) -> Stage:
        self.parts.to(device)
        stats = self.statistics
        stats.covariance, stats.corrections = stats.covariance.to(device), stats.corrections.to(device)
        if self.bases is not None:
            self.bases = {n: basis_to(b, self.device) for n, b in self.bases.items()}
        return self

    def memory_report(self) -> dict:
        """Bytes held: weights (parameters and buffers), factors (partial sums and bases), queries."""
        weights = _tensor_bytes(list(self.parts.parameters()) + list(self.parts.buffers()))
        stats = self.statistics
        factor_tensors = [t for blocks in stats.covariance.activation.values() for t in blocks]
        factor_tensors += [t for blocks in stats.covariance.gradient.values() for t in blocks]
        factor_tensors += list(stats.corrections.sums.values())
        for basis in (self.bases or {}).values():
            if basis is not None:
                factor_tensors += [*basis.activation_vectors, *basis.gradient_vectors, basis.activation_values,
                                   basis.gradient_values]
        query_tensors = []
        if self.scorer is not None:
            prepared = self.scorer.queries
            query_tensors = [*prepared.left.values(), *prepared.right.values(), *prepared.full.values(),
                             *self.scorer._dense.values()]
        return {"stage": self.index, "blocks": list(self.block_range), "device": str(self.device),
                "weights": weights, "factors": _tensor_bytes(factor_tensors), "queries": _tensor_bytes(query_tensors),
                "micro_batches_held": len(self._in_flight) + len(self._captured)}

    # -- forward / backward --------------------------------------------------------------------------------
    def forward(self, micro_batch_id: int, inputs: dict, objective: str = "fisher") -> dict:
        """Run this stage's blocks on one micro-batch and keep its autograd graph under `micro_batch_id`.

        inputs: a batch (stage 0) or the previous stage's outputs. Returns the batch keys and the hidden states
        (CPU), or on the last stage {"objective": (B,)} (the per-sequence objective, whose backward it starts).
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        device = self.device
        batch = {k: inputs[k].to(device) for k in BATCH_KEYS if k in inputs}
        with recorded_layers(self.layers) as (layer_inputs, layer_outputs):
            with _frozen(self.parts), torch.enable_grad():
                received, hidden = self._input_hidden_states(inputs, batch)
                hidden = self._run_blocks(hidden, batch["attention_mask"])
                logits = values = None
                if self.last:
                    logits = self.parts["head"](self.parts["final_norm"](hidden))
                    values = self._objective(logits, batch, objective)
        missing = [self.layers[i].name for i, out in enumerate(layer_outputs) if out is None]
        if missing:
            raise RuntimeError(f"tracked layers not called in stage {self.index}'s forward: {', '.join(missing)}")
        self._in_flight[micro_batch_id] = _InFlight(batch, received, None if self.last else hidden, values,
                                                    layer_inputs, layer_outputs)
        if self.last:
            return {OBJECTIVE: values.detach().to("cpu")}
        outputs = {k: inputs[k] for k in BATCH_KEYS if k in inputs}
        outputs[HIDDEN_STATES] = hidden.detach().to("cpu")
        return outputs

    def backward(self, micro_batch_id: int, grad_outputs: dict | None = None, capture: bool = True) -> dict:
        """Backpropagate one micro-batch: from the objective (last stage, grad_outputs None) or from the next
        stage's gradient w.r.t. this stage's output hidden states. Returns {"hidden_states": grad} for the previous
        stage ({} on stage 0) and keeps the tracked layers' (a, s) for accumulate_* / score (unless capture=False,
        when only the gradient to the inputs is computed)."""
        state = self._in_flight.pop(micro_batch_id, None)
        if state is None:
            raise MicroBatchLost(f"stage {self.index} holds no forward pass for micro-batch {micro_batch_id}")
        if self.last:
            roots, root_grads = [state.objective.sum()], None
        else:
            roots = [state.outputs]
            root_grads = [grad_outputs[HIDDEN_STATES].to(state.outputs.device, state.outputs.dtype)]
        targets = ([] if self.first else [state.inputs]) + (state.layer_outputs if capture else [])
        grads = list(torch.autograd.grad(roots, targets, root_grads, allow_unused=True)) if targets else []
        result = {}
        if not self.first:
            grad_input = grads.pop(0)
            grad_input = torch.zeros_like(state.inputs) if grad_input is None else grad_input
            result[HIDDEN_STATES] = grad_input.detach().to("cpu")
        if capture:
            mask = state.batch["attention_mask"]
            padded = not bool(mask.all())
            captures = [layer_capture(layer, a, s, out, mask, padded) for layer, a, s, out in
                        zip(self.layers, state.layer_inputs, grads, state.layer_outputs)]
            self._captured[micro_batch_id] = _Captured(captures, int(mask.sum()), int(mask.shape[0]),
                                                       int(mask.shape[1]))
        return result

    def discard(self, micro_batch_ids: Iterable[int] | None = None) -> None:
        """Drop kept graphs and captures (all of them by default): after a failed micro-batch."""
        if micro_batch_ids is None:
            self._in_flight.clear()
            self._captured.clear()
            return
        for mb in micro_batch_ids:
            self._in_flight.pop(mb, None)
            self._captured.pop(mb, None)

    # -- statistics ----------------------------------------------------------------------------------------
    def accumulate_covariance(self, micro_batch_id: int, batch_key: int | None = None) -> None:
        """Add one micro-batch's (a, s) to the covariance sums. batch_key (default: micro_batch_id) is what the
        sums record as included: a re-run of a lost micro-batch gets a new micro_batch_id but keeps its key, and a
        key already included is not counted again."""
        captured = self._take_captured(micro_batch_id)
        if self._include(self.statistics.covariance_ids, micro_batch_id, batch_key):
            self.statistics.covariance.accumulate(dict(zip(self.layer_names, captured.captures)), captured.tokens,
                                                  captured.sequences)

    def set_bases(self, bases: dict[str, LayerBasis | None]) -> None:
        """Bases of this stage's layers for the correction pass (extra layers are ignored; None: identity)."""
        missing = [n for n in self.layer_names if n not in bases]
        if missing:
            raise ValueError(f"stage {self.index}: no basis given for {', '.join(missing)}")
        # Eigenvectors in the precision the rotations run in, cast once (as FactorFitter.set_bases does).
        dtype = compute_dtype(self.dtype)
        self.bases = {n: basis_to(bases[n], self.device, dtype) for n in self.layer_names}

    def accumulate_corrections(self, micro_batch_id: int, batch_key: int | None = None) -> None:
        """Add one micro-batch to the eigenvalue-correction sums (batch_key as in accumulate_covariance)."""
        captured = self._take_captured(micro_batch_id)
        if self.bases is None:
            raise RuntimeError(f"stage {self.index}: set_bases before the correction pass")
        if self._include(self.statistics.correction_ids, micro_batch_id, batch_key):
            self.statistics.corrections.accumulate(dict(zip(self.layer_names, captured.captures)), self.bases,
                                                   captured.sequences)

    @staticmethod
    def _include(included: set[int], micro_batch_id: int, batch_key: int | None) -> bool:
        """Record the micro-batch's key (batch_key, default micro_batch_id) in `included`; False if it was there
        already, so that a re-run micro-batch is not counted twice."""
        key = micro_batch_id if batch_key is None else batch_key
        if key in included:
            return False
        included.add(key)
        return True

    def take_covariance(self) -> CovarianceSums:
        """The partial sums so far (CPU), and reset."""
        result = self.statistics.covariance.to("cpu")
        self.statistics.covariance = CovarianceSums.zeros(self.shapes, self.num_blocks, self.device)
        self.statistics.covariance_ids = set()
        return result

    def take_corrections(self) -> LambdaSums:
        result = self.statistics.corrections.to("cpu")
        self.statistics.corrections = LambdaSums.zeros(self.shapes, self.device)
        self.statistics.correction_ids = set()
        return result

    # -- scoring -------------------------------------------------------------------------------------------
    def set_queries(self, queries: PreparedQueries, path: str = "auto") -> None:
        """Prepared queries for scoring: only this stage's layers are kept."""
        self.num_queries = queries.num_queries
        self.scorer = None
        if self.layers:
            self.scorer = QueryScorer(self.parts, self.layers, select_layers(queries, self.layer_names), self.task,
                                      path)

    def score(self, micro_batch_id: int, per_token: bool = False) -> BatchScores:
        """This stage's layers' scores of one micro-batch: per_layer (Q, B, L_stage), total their sum."""
        captured = self._take_captured(micro_batch_id)
        if self.num_queries is None:
            raise RuntimeError(f"stage {self.index}: set_queries before scoring")
        if not self.layers:
            zeros = torch.zeros(self.num_queries, captured.sequences, dtype=torch.float64)
            tokens = zeros[..., None].expand(-1, -1, captured.width).clone() if per_token else None
            return BatchScores(zeros, zeros[..., None][..., :0], tokens)
        scores = self.scorer.score_captures(captured.captures, per_token)
        return BatchScores(*(t.to("cpu") if t is not None else None
                             for t in (scores.total, scores.per_layer, scores.per_token)))

    # -- internals -----------------------------------------------------------------------------------------
    def _empty_statistics(self) -> StageStatistics:
        device = self.device
        return StageStatistics(CovarianceSums.zeros(self.shapes, self.num_blocks, device),
                               LambdaSums.zeros(self.shapes, device))

    def _take_captured(self, micro_batch_id: int) -> _Captured:
        captured = self._captured.pop(micro_batch_id, None)
        if captured is None:
            raise MicroBatchLost(f"stage {self.index} holds no backward pass for micro-batch {micro_batch_id}")
        return captured

    def _input_hidden_states(self, inputs: dict, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(received, hidden): the hidden states entering this stage's first block."""
        if not self.first:
            received = inputs[HIDDEN_STATES].to(self.device).detach().requires_grad_(True)
            return received, received
        hidden = self.parts["embed"](batch["input_ids"])  # (B, T, H)
        if "positions" in self.parts:  # GPT-2: hidden = wte(ids) + wpe(position_ids)
            hidden = hidden + self.parts["positions"](_position_ids(hidden)).to(hidden.device)
        if "dropout" in self.parts:
            hidden = self.parts["dropout"](hidden)
        # Parameters are frozen: the embeddings' output is made to require grad so the blocks build a graph
        # (as whence.tracking.frozen_parameters does with a hook).
        return None, hidden.requires_grad_(True)

    def _run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """This stage's blocks, called exactly as the family's HF forward calls them (no cache)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = _position_ids(hidden)  # (1, T): right padding, so positions are 0..T-1 for every row
        mask_args = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                         past_key_values=None, position_ids=position_ids)
        extra = {}
        if getattr(self.config, "is_causal", None) is not None:  # merge_with_config_defaults passes it on
            extra["is_causal"] = self.config.is_causal
        start, stop = self.block_range
        blocks = list(zip(range(start, stop), self.parts["blocks"]))
        if self.arch.family == "gpt2":
            mask = create_causal_mask(**mask_args)
            for _, block in blocks:
                hidden = block(hidden, None, mask, None, encoder_attention_mask=None, use_cache=False,
                               position_ids=position_ids, **extra)
            return hidden
        rotary = self.parts["rotary"](hidden, position_ids=position_ids)  # (cos, sin)
        if self.arch.family == "gpt_neox":
            mask = create_causal_mask(**mask_args)
            for _, block in blocks:
                hidden = block(hidden, attention_mask=mask, position_ids=position_ids, layer_past=None,
                               use_cache=False, position_embeddings=rotary, **extra)
            return hidden
        kinds = {i: self._attention_kind(i) for i, _ in blocks}
        masks = {}
        if FULL_ATTENTION in kinds.values():
            masks[FULL_ATTENTION] = create_causal_mask(**mask_args)
        if SLIDING_ATTENTION in kinds.values():
            masks[SLIDING_ATTENTION] = create_sliding_window_causal_mask(**mask_args)
        for i, block in blocks:
            hidden = block(hidden, attention_mask=masks[kinds[i]], position_embeddings=rotary,
                           position_ids=position_ids, past_key_values=None, use_cache=False, **extra)
        return hidden

    def _attention_kind(self, block: int) -> str:
        """Which mask block `block` gets, as the family's forward decides it."""
        if self.model_type in ("qwen2", "qwen3"):
            return self.config.layer_types[block]
        if self.model_type == "mistral" and self.config.sliding_window is not None:
            return SLIDING_ATTENTION
        return FULL_ATTENTION

    def _objective(self, logits: torch.Tensor, batch: dict, objective: str) -> torch.Tensor:
        if objective == "fisher":
            return self.task.fisher_objective(logits, batch, self.fisher)
        return self.task.sequence_log_likelihood(logits, batch)


class MicroBatchLost(RuntimeError):
    """A stage was asked to continue a micro-batch it does not hold (its process restarted): re-run it."""


def split_model(model: nn.Module, num_stages: int, layers: list[TrackedLayer] | None = None, *, fisher: str = "true",
                num_blocks: int = 1, task: LanguageModelingTask | None = None) -> list[Stage]:
    """Cut `model` (GPT-2, Llama family, GPT-NeoX) into `num_stages` stages of contiguous blocks, balancing
    parameter counts. `layers` (default: the MLP layers) are the tracked layers in the model's order; each goes to
    the stage that holds its module. ModelError for an architecture that cannot be split, or too many stages."""
    arch = architecture_of(model)
    layers = find_tracked_layers(model, "mlp") if layers is None else list(layers)
    bounds = plan_stages(model, num_stages)
    body = getattr(model, arch.body)
    blocks = _active_blocks(model, arch)
    owners: dict[int, int] = {}  # id(module) -> stage
    for stage, (start, stop) in enumerate(bounds):
        held = list(blocks[start:stop])
        if stage == 0:
            held.append(getattr(body, arch.embed))
        if stage == num_stages - 1:
            held += [getattr(body, arch.final_norm), getattr(model, arch.head)]
        for module in held:
            for sub in module.modules():
                owners.setdefault(id(sub), stage)
    per_stage: list[list[tuple[int, TrackedLayer]]] = [[] for _ in bounds]
    for position, layer in enumerate(layers):
        if id(layer.module) not in owners:
            raise ModelError(f"tracked layer {layer.name} is outside the transformer blocks, embeddings and LM head "
                             f"of {type(model).__name__}; it cannot be assigned to a pipeline stage")
        per_stage[owners[id(layer.module)]].append((position, layer))
    return [Stage(i, num_stages, model, arch, bounds[i], [layer for _, layer in held], [p for p, _ in held],
                  fisher=fisher, num_blocks=num_blocks, task=task)
            for i, held in enumerate(per_stage)]


# ---------------------------------------------------------------------------------------------------------
# Helpers shared with the Ray actors


def select_layers(queries: PreparedQueries, names: Sequence[str]) -> PreparedQueries:
    """The prepared queries of the named layers only, in the given order (tensors are shared, not copied)."""
    missing = [n for n in names if n not in queries.layer_names]
    if missing:
        raise ValueError(f"prepared queries have no layer {', '.join(missing)}")
    pick = lambda d: {n: d[n] for n in names if n in d}  # noqa: E731
    return PreparedQueries(list(queries.query_ids), list(names), queries.rank, pick(queries.left), pick(queries.right),
                           pick(queries.full))


def split_batch(batch: dict, micro_batch_size: int | None) -> list[dict]:
    """Row slices of a batch of at most `micro_batch_size` sequences (None: the batch itself). Slices keep the
    batch's width T, so per-token results concatenate back along the batch dimension."""
    size = batch["input_ids"].shape[0]
    if micro_batch_size is None or micro_batch_size >= size:
        return [batch]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    return [{k: v[start : start + micro_batch_size] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for start in range(0, size, micro_batch_size)]


def merge_covariance(parts: Sequence[CovarianceSums], order: Sequence[str]) -> CovarianceSums:
    """One CovarianceSums from the stages' disjoint layer sets, layers in `order`. Every stage saw the same
    micro-batches, so the token and sequence counts are each stage's (checked equal)."""
    counts = {(p.tokens, p.sequences) for p in parts}
    if len(counts) > 1:
        raise RuntimeError(f"stages counted different micro-batches: (tokens, sequences) {sorted(counts)}")
    activation = {n: blocks for p in parts for n, blocks in p.activation.items()}
    gradient = {n: blocks for p in parts for n, blocks in p.gradient.items()}
    tokens, sequences = counts.pop()
    return CovarianceSums({n: activation[n] for n in order}, {n: gradient[n] for n in order}, tokens, sequences)


def merge_corrections(parts: Sequence[LambdaSums], order: Sequence[str]) -> LambdaSums:
    counts = {p.sequences for p in parts}
    if len(counts) > 1:
        raise RuntimeError(f"stages counted different micro-batches: sequences {sorted(counts)}")
    sums = {n: t for p in parts for n, t in p.sums.items()}
    return LambdaSums({n: sums[n] for n in order}, counts.pop())


def merge_scores(parts: Sequence[BatchScores], positions: Sequence[Sequence[int]], num_layers: int) -> BatchScores:
    """The model's BatchScores from each stage's: per-layer columns placed at their global positions, the total
    summed over all layers in global order (as QueryScorer sums them), per-token scores added."""
    q, b = parts[0].total.shape
    per_layer = torch.zeros(q, b, num_layers, dtype=torch.float64)
    for part, where in zip(parts, positions):
        per_layer[..., list(where)] = part.per_layer.to(torch.float64)
    per_token = None
    if all(part.per_token is not None for part in parts):
        per_token = sum(part.per_token.to(torch.float64) for part in parts)
    return BatchScores(per_layer.sum(dim=-1), per_layer, per_token)


def concat_scores(parts: Sequence[BatchScores]) -> BatchScores:
    """Micro-batches' scores side by side along the batch dimension."""
    if len(parts) == 1:
        return parts[0]
    per_token = None if parts[0].per_token is None else torch.cat([p.per_token for p in parts], dim=1)
    return BatchScores(torch.cat([p.total for p in parts], dim=1), torch.cat([p.per_layer for p in parts], dim=1),
                       per_token)


# ---------------------------------------------------------------------------------------------------------
# Schedule: one-forward-one-backward (1F1B) per stage


FORWARD, BACKWARD = "forward", "backward"


def stage_order(micro_batch_ids: Sequence[int], stage: int, num_stages: int, max_in_flight: int | None = None
                ) -> list[tuple[str, int]]:
    """The order in which one stage runs its calls: `warmup` forwards, then alternately one forward and one
    backward. warmup = max_in_flight - stage - 1 (default max_in_flight: num_stages) is non-increasing along the
    pipeline, which keeps the in-order execution of each stage free of deadlock, and bounds the graphs a stage
    holds at once to warmup + 1."""
    in_flight = num_stages if max_in_flight is None else max_in_flight
    if in_flight < 1:
        raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
    ids = list(micro_batch_ids)
    warmup = min(len(ids), max(0, in_flight - stage - 1))
    order = [(FORWARD, mb) for mb in ids[:warmup]]
    for j, mb in enumerate(ids):
        if warmup + j < len(ids):
            order.append((FORWARD, ids[warmup + j]))
        order.append((BACKWARD, mb))
    return order


def pipeline_schedule(micro_batch_ids: Sequence[int], num_stages: int, max_in_flight: int | None = None
                      ) -> list[tuple[str, int, int]]:
    """Every call (kind, stage, micro-batch) in an order that respects both each stage's 1F1B order and the data
    dependencies (forward k after forward k - 1, backward k after backward k + 1). Submitting calls to in-order
    actors in this order lets micro-batch i + 1 enter stage 0 while micro-batch i is further down the pipeline."""
    orders = [stage_order(micro_batch_ids, k, num_stages, max_in_flight) for k in range(num_stages)]
    pointers = [0] * num_stages
    done: set[tuple[str, int, int]] = set()
    schedule = []
    total = sum(len(o) for o in orders)
    while len(schedule) < total:
        progressed = False
        for k in range(num_stages):
            while pointers[k] < len(orders[k]):
                kind, mb = orders[k][pointers[k]]
                before = (FORWARD, k - 1, mb) if kind == FORWARD else (BACKWARD, k + 1, mb)
                if 0 <= before[1] < num_stages and before not in done:
                    break
                done.add((kind, k, mb))
                schedule.append((kind, k, mb))
                pointers[k] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule has a cycle")  # cannot happen with non-increasing warmups
    return schedule


# ---------------------------------------------------------------------------------------------------------
# In-process pipeline (tests, notebooks): FactorFitter's and QueryScorer's methods over the stages


class ShardedPipeline:
    """All stages of one model in this process, run micro-batch by micro-batch in the 1F1B schedule.

    Exposes whence.fitting.FactorFitter's methods (covariance_step, set_bases, correction_step, take_covariance,
    take_corrections) and whence.scoring.QueryScorer's `score` (after set_queries), with results equal to theirs.
    """

    def __init__(self, model: nn.Module, layers: list[TrackedLayer], num_stages: int, fisher: str = "true",
                 num_blocks: int = 1, task: LanguageModelingTask | None = None, micro_batch_size: int | None = None):
        self.stages = split_model(model, num_stages, layers, fisher=fisher, num_blocks=num_blocks, task=task)
        self.layers = list(layers)
        self.layer_names = [layer.name for layer in self.layers]
        self.micro_batch_size = micro_batch_size
        self._next_id = 0

    def _run(self, batch: dict, objective: str, consume) -> list:
        """Forward and backward every micro-batch of `batch`; consume(stage, id) after each stage's backward."""
        micro = {}
        for part in split_batch(batch, self.micro_batch_size):
            micro[self._next_id] = part
            self._next_id += 1
        outputs: dict[tuple[int, int], dict] = {}  # (stage, id) -> forward outputs
        grads: dict[tuple[int, int], dict] = {}  # (stage, id) -> backward outputs
        results: dict[int, list] = {mb: [None] * len(self.stages) for mb in micro}
        last = len(self.stages) - 1
        for kind, k, mb in pipeline_schedule(list(micro), len(self.stages)):
            stage = self.stages[k]
            if kind == FORWARD:
                outputs[k, mb] = stage.forward(mb, micro[mb] if k == 0 else outputs.pop((k - 1, mb)), objective)
            else:
                grads[k, mb] = stage.backward(mb, None if k == last else grads.pop((k + 1, mb)))
                results[mb][k] = consume(stage, mb)
        return [results[mb] for mb in micro]

    def covariance_step(self, batch: dict) -> None:
        self._run(batch, "fisher", lambda stage, mb: stage.accumulate_covariance(mb))

    def set_bases(self, bases: dict[str, LayerBasis | None]) -> None:
        for stage in self.stages:
            stage.set_bases(bases)

    def correction_step(self, batch: dict) -> None:
        self._run(batch, "fisher", lambda stage, mb: stage.accumulate_corrections(mb))

    def take_covariance(self) -> CovarianceSums:
        return merge_covariance([stage.take_covariance() for stage in self.stages], self.layer_names)

    def take_corrections(self) -> LambdaSums:
        return merge_corrections([stage.take_corrections() for stage in self.stages], self.layer_names)

    def set_queries(self, queries: PreparedQueries, path: str = "auto") -> None:
        if queries.layer_names != self.layer_names:
            raise ValueError("prepared queries were made for other tracked layers")
        for stage in self.stages:
            stage.set_queries(queries, path)

    def score(self, batch: dict, per_token: bool = False) -> BatchScores:
        """Scores of every query against every sequence of `batch`, as QueryScorer.score."""
        micro = self._run(batch, "log_likelihood", lambda stage, mb: stage.score(mb, per_token))
        positions = [stage.positions for stage in self.stages]
        return concat_scores([merge_scores(parts, positions, len(self.layers)) for parts in micro])

    def memory_report(self) -> list[dict]:
        return [stage.memory_report() for stage in self.stages]


# ---------------------------------------------------------------------------------------------------------


def _position_ids(hidden: torch.Tensor) -> torch.Tensor:
    """(1, T) as the HF forwards build them without a cache: arange(T)."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


@contextmanager
def _frozen(module: nn.Module):
    """Parameters stop requiring grad while the graph is built, so backward computes no weight gradient."""
    previous = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in previous:
        parameter.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in previous:
            parameter.requires_grad_(flag)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages (tied or shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
