"""The scoring kernel: a batch of training sequences against every prepared query at once.

For query q, layer l and training sequence b with per-token inputs a_bt and output gradients s_bt:
    I_l(q, b) = < P_l(grad f(q)), dW_b >  = sum_t s_bt^T P_ql a_bt        (the per-token terms, Eq. 31)
Two ways to evaluate it, and we take the cheaper per layer (counting multiply-adds):
  low-rank  P_ql = sum_k u_qk v_qk^T:  sum_t (s_bt . u_qk)(v_qk . a_bt)     ~ B*T * Q*r * (d_out + d_in)
  gradient  dW_b = s_b^T a_b, then <P_ql, dW_b> as one GEMM               ~ B*T * d_out*d_in + B * Q*d_out*d_in
Neither forms a per-example weight gradient for more than the current batch, and no parameter gradient is
ever computed (the backward pass stops at the tracked layers' outputs).

Values are checked where they are made: prepared queries (`check_finite_queries`, before they are saved) and
every batch's scores, so that a NaN or inf becomes a NonFiniteError naming where, never a NaN in the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from whence.errors import NonFiniteError
from whence.factors import Factors, compute_dtype
from whence.model import TrackedLayer
from whence.queries import PreparedQueries, QueriesHeader
from whence.task import LanguageModelingTask
from whence.tracking import LayerCapture, LayerTracker

# The gradient path keeps the queries' dense matrices; above this many bytes per layer it is not considered.
DENSE_QUERY_BYTES_LIMIT = 2 * 1024**3


@dataclass
class BatchScores:
    total: torch.Tensor  # (Q, B) float64
    per_layer: torch.Tensor  # (Q, B, L) float64
    per_token: torch.Tensor | None = None  # (Q, B, T) float64, position t's term s_t^T P a_t


def lowrank_cost(q: int, r: int, d_out: int, d_in: int, tokens: int) -> float:
    return tokens * q * r * (d_out + d_in)


def gradient_cost(q: int, d_out: int, d_in: int, tokens: int, sequences: int) -> float:
    return tokens * d_out * d_in + sequences * q * d_out * d_in


class QueryScorer:
    """Scores batches against prepared queries. Holds the model, its tracked layers and the queries."""

    def __init__(self, model, layers: list[TrackedLayer], queries: PreparedQueries,
                 task: LanguageModelingTask | None = None, path: str = "auto"):
        if [layer.name for layer in layers] != queries.layer_names:
            raise ValueError("prepared queries were made for other tracked layers")
        if path not in ("auto", "lowrank", "gradient"):
            raise ValueError(f"path must be auto, lowrank or gradient, got {path!r}")
        self.model = model
        self.layers = layers
        self.task = task or LanguageModelingTask()
        self.tracker = LayerTracker(layers)
        self.device = next(model.parameters()).device
        self.dtype = compute_dtype(next(model.parameters()).dtype)
        self.queries = queries.to(self.device, self.dtype)
        self.path = path
        self._dense: dict[str, torch.Tensor] = {}  # (Q, d_out * d_in), built on first use

    def _dense_queries(self, name: str) -> torch.Tensor:
        if name not in self._dense:
            self._dense[name] = self.queries.matrices(name).reshape(self.queries.num_queries, -1)
        return self._dense[name]

    def layer_path(self, layer: TrackedLayer, tokens: int, sequences: int) -> str:
        """Which evaluation to use for this layer and batch shape."""
        if self.queries.rank == "full":
            return "gradient"
        if self.path != "auto":
            return self.path
        q, r = self.queries.num_queries, self.queries.left[layer.name].shape[1]
        dense_bytes = q * layer.d_out * layer.d_in * torch.finfo(self.dtype).bits // 8
        if dense_bytes > DENSE_QUERY_BYTES_LIMIT:
            return "lowrank"
        cheaper = gradient_cost(q, layer.d_out, layer.d_in, tokens, sequences) < lowrank_cost(q, r, layer.d_out, layer.d_in, tokens)
        return "gradient" if cheaper else "lowrank"

    def capture(self, batch: dict) -> list[LayerCapture]:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.tracker.capture(self.model, batch, self.task.sequence_log_likelihood, self.task.forward)

    def score(self, batch: dict, per_token: bool = False) -> BatchScores:
        """Scores of every query against every sequence of `batch` (from whence.text.collate)."""
        captures = self.capture(batch)
        return self.score_captures(captures, per_token)

    def score_captures(self, captures: list[LayerCapture], per_token: bool = False) -> BatchScores:
        per_layer, per_token_sum = [], None
        for layer, capture in zip(self.layers, captures):
            a = capture.activations.to(self.dtype)  # (B, T, d_in)
            s = capture.output_grads.to(self.dtype)  # (B, T, d_out)
            batch_size, length = a.shape[:2]
            if per_token or self.layer_path(layer, batch_size * length, batch_size) == "lowrank":
                tokens = self._token_scores(layer.name, s, a)  # (Q, B, T)
                per_layer.append(tokens.sum(dim=-1))
                if per_token:
                    per_token_sum = tokens if per_token_sum is None else per_token_sum + tokens
            else:
                per_layer.append(self._gradient_scores(layer.name, s, a))
        stacked = torch.stack(per_layer, dim=-1).to(torch.float64)  # (Q, B, L)
        check_finite_scores(stacked, self.queries.query_ids, [layer.name for layer in self.layers])
        return BatchScores(stacked.sum(dim=-1), stacked,
                           per_token_sum.to(torch.float64) if per_token_sum is not None else None)

    def _gradient_scores(self, name: str, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(Q, B): <P_q, dW_b> with dW_b = s_b^T a_b."""
        gradients = torch.bmm(s.transpose(1, 2), a)  # (B, d_out, d_in)
        return self._dense_queries(name) @ gradients.reshape(gradients.shape[0], -1).T

    def _token_scores(self, name: str, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(Q, B, T): s_bt^T P_q a_bt for every token."""
        q = self.queries.num_queries
        if name in self.queries.full:
            # (B, T, d_out) x (Q, d_out, d_in) -> (Q, B, T, d_in), then dot with a_bt.
            projected = torch.einsum("bto,qoi->qbti", s, self.queries.full[name])
            return (projected * a[None]).sum(dim=-1)
        left, right = self.queries.left[name], self.queries.right[name]  # (Q, r, d_out), (Q, r, d_in)
        r = left.shape[1]
        # One GEMM per side over all queries' factors stacked: (B, T, d) x (d, Q*r).
        su = (s @ left.reshape(q * r, -1).T).view(*s.shape[:2], q, r)  # (B, T, Q, r)
        av = (a @ right.reshape(q * r, -1).T).view(*a.shape[:2], q, r)  # (B, T, Q, r)
        return (su * av).sum(dim=-1).permute(2, 0, 1)  # (Q, B, T)

    @torch.no_grad()
    def self_influence(self, batch: dict, factors: Factors, damping: float | str = "heuristic") -> torch.Tensor:
        """(B,) I(m, m) = sum_l <P_l(grad_l log p(m)), grad_l log p(m)>."""
        captures = self.capture(batch)
        total = None
        for layer, capture in zip(self.layers, captures):
            gradients = capture.per_sequence_gradients().to(torch.float64)  # (B, d_out, d_in)
            preconditioned = factors.precondition(layer.name, gradients, damping)
            values = (preconditioned * gradients).sum(dim=(1, 2))
            total = values if total is None else total + values
        return total


def check_finite_scores(per_layer: torch.Tensor, query_ids: list[str], layer_names: list[str]) -> None:
    """NonFiniteError unless every (Q, B, L) per-layer score is finite (one device sync per batch); names the
    first query, layer and batch rows affected (the caller adds the sequences' doc ids)."""
    if bool(torch.isfinite(per_layer).all()):
        return
    bad = ~torch.isfinite(per_layer)  # (Q, B, L)
    q, _, layer = (int(i) for i in torch.nonzero(bad)[0])
    rows = torch.nonzero(bad.any(dim=(0, 2))).flatten().tolist()
    raise NonFiniteError(f"non-finite score for query {query_ids[q]!r} at layer {layer_names[layer]}",
                         layer=layer_names[layer], rows=rows)


def check_finite_queries(prepared: PreparedQueries) -> None:
    """NonFiniteError naming the layer and queries whose preconditioned gradients hold NaN or inf (non-finite
    factors, damping or model outputs), before such queries are saved and scored."""
    for name in prepared.layer_names:
        tensors = [t for kind in (prepared.left, prepared.right, prepared.full) if (t := kind.get(name)) is not None]
        bad = [q for q in range(prepared.num_queries) if not all(bool(torch.isfinite(t[q]).all()) for t in tensors)]
        if bad:
            ids = ", ".join(repr(prepared.query_ids[q]) for q in bad[:5])
            raise NonFiniteError(f"the prepared gradients of queries {ids} hold NaN or inf at layer {name}; are "
                                 "the factors or the damping finite?", layer=name)


def prepared_queries_problem(path: str | Path, query_ids: list[str]) -> tuple[str | None, bool]:
    """(None, False) when the prepared-queries file at `path` matches its checksum and holds `query_ids` in
    order. Otherwise (what is wrong, whether it was made for other queries: results scored with it are stale)."""
    from safetensors import SafetensorError

    from whence.checksums import checksum_problem

    problem = checksum_problem(path)
    if problem is not None:
        return problem, False
    try:
        header = QueriesHeader.read(path)
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        return f"unreadable ({error})", False
    if header.query_ids != list(query_ids):
        return f"made for other queries ({len(header.query_ids)} ids, {header.query_ids[:3]} ...)", True
    return None, False
