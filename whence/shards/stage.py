"""A pipeline stage: blocks [start, stop) of a causal LM, its tracked layers, their partial sums and queries.

Protocol for one micro-batch (ids are ints chosen by the caller; a stage keeps state per id):
    stage 0     forward(id, batch)            -> {batch keys..., "hidden_states": (B, T, H)}
    stage k     forward(id, outputs of k - 1) -> the same, its own blocks applied
    last stage  forward(id, outputs of k - 1) -> {"objective": (B,)}     keeps the per-sequence objective
    last stage  backward(id, None)            -> {"hidden_states": dL/dh (B, T, H)}
    stage k     backward(id, grads of k + 1)  -> {"hidden_states": dL/dh}  ({} on stage 0)
    each stage  accumulate_covariance(id) | accumulate_corrections(id) | score(id, per_token)
    each stage  product_coefficients(id) -> (B, Q); then accumulate_products(id, their sum over the stages)
    stage k     forward(id, inputs, keep=False) -> the same outputs, no graph kept (activation checkpointing: the
                stage's forward runs again with its graph when its backward comes; not the last stage)
The last stage applies its LM head a group of sequences at a time (whence.shards.schedule.head_group_sequences)
and keeps the gradient at the final norm's output, so its backward never holds the whole batch's logits.
Everything that crosses a stage boundary is a dict of plain CPU tensors, so Ray can carry it. Backward is
activation-only: parameters are frozen during forward, and `torch.autograd.grad` runs to the stage's input
hidden states and to its tracked layers' outputs, never to a weight. The family's forward (embeddings, blocks)
comes from its Architecture (whence.shards.families).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from whence.factor_owners import CORRECTION, COVARIANCE
from whence.factors import CovarianceSums, LambdaSums, LayerBasis, compute_dtype
from whence.fitting import basis_to
from whence.model import TrackedLayer, find_tracked_layers
from whence.queries import PreparedQueries
from whence.refine import LayerProducts
from whence.scoring import BatchScores, QueryScorer
from whence.shards.architecture import architecture_of
from whence.shards.merge import select_layers
from whence.shards.planning import StageSpec, parameter_count, stage_specs
from whence.shards.schedule import head_group_sequences
from whence.task import LanguageModelingTask
from whence.tracking import LayerCapture, check_finite_captures, layer_capture, recorded_layers

# Keys of a batch (whence.text.collate, plus true-Fisher seeds) that travel with the hidden states.
BATCH_KEYS = ("input_ids", "attention_mask", "target_mask", "seeds")
HIDDEN_STATES = "hidden_states"
OBJECTIVE = "objective"
# What the last stage differentiates: the Fisher objective (fitting) or log p(m) (scoring), as in
# whence.task.LanguageModelingTask.
OBJECTIVES = ("fisher", "log_likelihood")


@dataclass
class _InFlight:
    """What a stage keeps between forward and backward of one micro-batch."""

    batch: dict  # on the stage's device
    inputs: torch.Tensor | None  # (B, T, H) received hidden states, requires grad; None on stage 0
    outputs: torch.Tensor | None  # (B, T, H) sent on; on the last stage, the final norm's output (head in groups)
    objective: torch.Tensor | None  # (B,) on the last stage
    layer_inputs: list[torch.Tensor]  # per tracked layer, detached
    layer_outputs: list[torch.Tensor]  # per tracked layer, in the graph
    head_grads: torch.Tensor | None = None  # (B, T, H) d objective / d outputs, when the head ran in groups


@dataclass
class _Captured:
    captures: list[LayerCapture]
    tokens: int
    sequences: int
    width: int  # T, for per-token scores of a stage without tracked layers


@dataclass
class StageStatistics:
    """One stage's partial sums and the micro-batch ids they include (so re-runs never count twice). Each pass's
    sums are allocated at its first micro-batch (None before), as whence.fitting.FactorFitter's: a stage running
    one pass never holds the other pass's sums, nor a fresh zero copy of the sums it just handed over."""

    covariance: CovarianceSums | None = None
    corrections: LambdaSums | None = None
    covariance_ids: set[int] = field(default_factory=set)
    correction_ids: set[int] = field(default_factory=set)


class MicroBatchLost(RuntimeError):
    """A stage was asked to continue a micro-batch it does not hold (its process restarted): re-run it."""


class Stage:
    """Blocks [start, stop) of a causal LM and, on stage 0, its embeddings, on the last stage its final norm and
    LM head. Holds references to those modules only; tracked layers inside them are its own.

    Built by `split_model` from a StageSpec; fisher, num_blocks and task as whence.fitting.FactorFitter. See the
    module docstring for the forward/backward protocol.
    """

    def __init__(self, model: nn.Module, spec: StageSpec, fisher: str = "true", num_blocks: int = 1,
                 task: LanguageModelingTask | None = None):
        self.spec = spec
        self.index, self.num_stages, self.block_range = spec.index, spec.num_stages, spec.block_range
        self.arch = architecture_of(model)
        self.config = model.config
        # A container of references: the modules stay where they are in `model` too.
        self.parts = nn.ModuleDict(self.arch.stage_parts(model, spec.block_range, self.first, self.last))
        self.layers = list(spec.layers)
        self.positions = list(spec.positions)  # each layer's index in the model's tracked-layer order
        self.fisher = fisher
        self.num_blocks = num_blocks
        self.task = task or LanguageModelingTask()
        self.shapes = {layer.name: (layer.d_out, layer.d_in) for layer in self.layers}
        self._in_flight: dict[int, _InFlight] = {}
        self._captured: dict[int, _Captured] = {}
        self.statistics = StageStatistics()
        self.bases: dict[str, LayerBasis | None] | None = None  # None until set_bases: required for corrections
        self.scorer: QueryScorer | None = None
        self.num_queries: int | None = None  # None until set_queries
        self.products: LayerProducts | None = None  # ekfac-cg's Fisher-vector product sums, from set_directions

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
        stats.covariance = stats.covariance.to(device) if stats.covariance is not None else None
        stats.corrections = stats.corrections.to(device) if stats.corrections is not None else None
        if self.bases is not None:
            self.bases = {n: basis_to(b, self.device) for n, b in self.bases.items()}
        return self

    def memory_report(self) -> dict:
        """Bytes held: weights (parameters and buffers), factors (partial sums and bases), queries."""
        weights = _tensor_bytes(list(self.parts.parameters()) + list(self.parts.buffers()))
        stats = self.statistics
        factor_tensors = []
        if stats.covariance is not None:
            factor_tensors += [t for blocks in stats.covariance.activation.values() for t in blocks]
            factor_tensors += [t for blocks in stats.covariance.gradient.values() for t in blocks]
        if stats.corrections is not None:
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
    def forward(self, micro_batch_id: int, inputs: dict, objective: str = "fisher", keep: bool = True) -> dict:
        """Run this stage's blocks on one micro-batch and keep its autograd graph under `micro_batch_id`.

        inputs: a batch (stage 0) or the previous stage's outputs. Returns the batch keys and the hidden states
        (CPU), or on the last stage {"objective": (B,)} (the per-sequence objective, whose backward it starts).
        keep=False runs the blocks without a graph and keeps nothing: the outputs only, for a pass that recomputes
        this stage when its backward comes (ShardedPipeline's activation checkpointing).
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        device = self.device
        batch = {k: inputs[k].to(device) for k in BATCH_KEYS if k in inputs}
        if not keep:
            if self.last:
                raise ValueError(f"stage {self.index} is the last: its forward starts the backward pass, keep it")
            with torch.no_grad():
                hidden = self.arch.run_blocks(self.config, self.parts, self.block_range[0],
                                              self._input_hidden_states(inputs, batch)[1], batch["attention_mask"])
            return self._outputs(inputs, hidden)
        with recorded_layers(self.layers) as (layer_inputs, layer_outputs):
            with _frozen(self.parts), torch.enable_grad():
                received, hidden = self._input_hidden_states(inputs, batch)
                hidden = self.arch.run_blocks(self.config, self.parts, self.block_range[0], hidden,
                                              batch["attention_mask"])
                values = head_grads = None
                if self.last:
                    hidden = self.parts["final_norm"](hidden)
                    if self._head_tracked:
                        values = self._objective(self.parts["head"](hidden), batch, objective)
                        hidden = None
                    else:
                        values, head_grads = self._head_in_groups(hidden, batch, objective)
        missing = [self.layers[i].name for i, out in enumerate(layer_outputs) if out is None]
        if missing:
            raise RuntimeError(f"tracked layers not called in stage {self.index}'s forward: {', '.join(missing)}")
        self._in_flight[micro_batch_id] = _InFlight(batch, received, hidden, values, layer_inputs, layer_outputs,
                                                    head_grads)
        if self.last:
            return {OBJECTIVE: values.detach().to("cpu")}
        return self._outputs(inputs, hidden)

    @staticmethod
    def _outputs(inputs: dict, hidden: torch.Tensor) -> dict:
        """What the next stage receives: the batch keys as received and the hidden states (CPU)."""
        return {**{k: inputs[k] for k in BATCH_KEYS if k in inputs}, HIDDEN_STATES: hidden.detach().to("cpu")}

    def backward(self, micro_batch_id: int, grad_outputs: dict | None = None, capture: bool = True) -> dict:
        """Backpropagate one micro-batch: from the objective (last stage, grad_outputs None) or from the next
        stage's gradient w.r.t. this stage's output hidden states. Returns {"hidden_states": grad} for the previous
        stage ({} on stage 0) and keeps the tracked layers' (a, s) for accumulate_* / score (unless capture=False,
        when only the gradient to the inputs is computed)."""
        state = self._in_flight.pop(micro_batch_id, None)
        if state is None:
            raise MicroBatchLost(f"stage {self.index} holds no forward pass for micro-batch {micro_batch_id}")
        if self.last and state.head_grads is None:
            roots, root_grads = [state.objective.sum()], None
        elif self.last:  # the head ran in groups: its gradient at the final norm's output is known already
            roots, root_grads = [state.outputs], [state.head_grads]
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
            if captures:  # a stage without tracked layers has nothing to check
                check_finite_captures(self.layers, captures)
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
            if self.statistics.covariance is None:
                self.statistics.covariance = CovarianceSums.zeros(self.shapes, self.num_blocks, self.device)
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
            if self.statistics.corrections is None:
                self.statistics.corrections = LambdaSums.zeros(self.shapes, self.device)
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
        """The partial sums so far (CPU; zeros if no micro-batch was included), and reset."""
        result = self.statistics.covariance or CovarianceSums.zeros(self.shapes, self.num_blocks, self.device)
        self.drop_sums(COVARIANCE)
        return result.to("cpu")

    def take_corrections(self) -> LambdaSums:
        result = self.statistics.corrections or LambdaSums.zeros(self.shapes, self.device)
        self.drop_sums(CORRECTION)
        return result.to("cpu")

    def drop_sums(self, kind: str) -> None:
        """Forget the partial sums of one pass (COVARIANCE or CORRECTION) and the ids they include."""
        stats = self.statistics
        if kind == COVARIANCE:
            stats.covariance, stats.covariance_ids = None, set()
        else:
            stats.corrections, stats.correction_ids = None, set()

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

    # -- Fisher-vector products (ekfac-cg, whence.refine) -------------------------------------------------------
    def set_directions(self, directions: dict[str, torch.Tensor], path: str = "auto") -> None:
        """ekfac-cg's current directions V (layer -> (Q, d_out, d_in)); only this stage's layers are kept. Resets
        the product sums: a pass over the fitting sequences follows."""
        dtype = compute_dtype(self.dtype)
        self.products = LayerProducts({n: directions[n].to(self.device, dtype) for n in self.layer_names}, path)

    def product_coefficients(self, micro_batch_id: int, key: int | None = None) -> torch.Tensor | None:
        """(B, Q) this stage's part of c_bq = sum_l <g_bl, V_ql> for one micro-batch after its backward pass (None
        for a stage without tracked layers); its captures are kept under `key` (default: micro_batch_id) until
        accumulate_products gives the c summed over every stage."""
        captured = self._take_captured(micro_batch_id)
        if self.products is None:
            raise RuntimeError(f"stage {self.index}: set_directions before a Fisher-vector product")
        if not self.layers:
            return None
        key = micro_batch_id if key is None else key
        return self.products.coefficients(key, captured.captures).to("cpu")

    def accumulate_products(self, key: int, c: torch.Tensor) -> None:
        """Add micro-batch `key`'s sum_b c_bq s_b a_b^T to this stage's layers' product sums, c (B, Q) summed over
        the stages."""
        if self.layers:
            self.products.accumulate(key, c)

    def take_products(self) -> tuple[dict[str, torch.Tensor], int]:
        """(layer -> (Q, d_out, d_in) float64 product sums on the CPU, sequences accumulated) of this stage."""
        return {n: t.to("cpu") for n, t in self.products.sums.items()}, self.products.sequences

    # -- internals -----------------------------------------------------------------------------------------
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
        hidden = self.arch.embed_inputs(self.parts, batch["input_ids"])  # (B, T, H)
        # Parameters are frozen: the embeddings' output is made to require grad so the blocks build a graph
        # (as whence.tracking.frozen_parameters does with a hook).
        return None, hidden.requires_grad_(True)

    @property
    def _head_tracked(self) -> bool:
        head = list(self.parts["head"].modules()) if self.last else []
        return any(layer.module is module for layer in self.layers for module in head)

    def _head_in_groups(self, normed: torch.Tensor, batch: dict, objective: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective (B,), its gradient at the final norm's output (B, T, H)): the LM head and the objective run
        head_group_sequences() sequences at a time, each group differentiated before the next starts, so that a
        batch never holds more than one group's logits. Sequences do not interact and sampled labels are seeded
        per sequence, so the values and gradients are those of the whole batch at once."""
        detached = normed.detach()
        batch_size, seq_len = detached.shape[:2]
        vocab = self.parts["head"].weight.shape[0]
        group = head_group_sequences(seq_len, vocab, detached.element_size())
        values, grads = [], torch.empty_like(detached)
        for start in range(0, batch_size, group):
            rows = slice(start, start + group)
            part = {k: v[rows] for k, v in batch.items()}
            inputs = detached[rows].requires_grad_(True)
            value = self._objective(self.parts["head"](inputs), part, objective)  # (g,)
            grads[rows] = torch.autograd.grad(value.sum(), inputs)[0]
            values.append(value.detach())
        return torch.cat(values), grads

    def _objective(self, logits: torch.Tensor, batch: dict, objective: str) -> torch.Tensor:
        if objective == "fisher":
            return self.task.fisher_objective(logits, batch, self.fisher)
        return self.task.sequence_log_likelihood(logits, batch)


def split_model(model: nn.Module, num_stages: int, layers: list[TrackedLayer] | None = None, *, fisher: str = "true",
                num_blocks: int = 1, task: LanguageModelingTask | None = None) -> list[Stage]:
    """Cut `model` (a registered family: GPT-2, Llama family, GPT-NeoX) into `num_stages` stages of contiguous
    blocks, balancing parameter counts. `layers` (default: the MLP layers) are the tracked layers in the model's
    order; each goes to the stage that holds its module. ModelError for an architecture that cannot be split, or
    too many stages."""
    architecture_of(model)
    layers = find_tracked_layers(model, "mlp") if layers is None else list(layers)
    return [Stage(model, spec, fisher=fisher, num_blocks=num_blocks, task=task)
            for spec in stage_specs(model, num_stages, layers)]


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
