"""Between the whole model and its stages: queries cut down to a stage's layers, and the stages' partial sums and
scores merged back into the model's (layers in the model's order, scores in float64), equal to the unsharded
results."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from whence.factors import CovarianceSums, LambdaSums
from whence.queries import PreparedQueries
from whence.scoring import BatchScores


def select_layers(queries: PreparedQueries, names: Sequence[str]) -> PreparedQueries:
    """The prepared queries of the named layers only, in the given order (tensors are shared, not copied)."""
    missing = [n for n in names if n not in queries.layer_names]
    if missing:
        raise ValueError(f"prepared queries have no layer {', '.join(missing)}")
    pick = lambda d: {n: d[n] for n in names if n in d}  # noqa: E731
    return PreparedQueries(list(queries.query_ids), list(names), queries.rank, pick(queries.left), pick(queries.right),
                           pick(queries.full))


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
    """One LambdaSums from the stages' disjoint layer sets, layers in `order` (sequence counts checked equal)."""
    counts = {p.sequences for p in parts}
    if len(counts) > 1:
        raise RuntimeError(f"stages counted different micro-batches: sequences {sorted(counts)}")
    sums = {n: t for p in parts for n, t in p.sums.items()}
    return LambdaSums({n: sums[n] for n in order}, counts.pop())


def merge_scores(parts: Sequence[BatchScores], positions: Sequence[Sequence[int]], num_layers: int) -> BatchScores:
    """The model's BatchScores from each stage's: per-layer columns placed at their global positions, the total
    summed over all layers in global order (as QueryScorer sums them), per-token scores added."""
    q, b = parts[0].total.shape
    per_layer = torch.zeros(q, b, num_layers, dtype=torch.float64)  # (Q, B, L)
    for part, where in zip(parts, positions):
        per_layer[..., list(where)] = part.per_layer.to(torch.float64)
    per_token = None
    if all(part.per_token is not None for part in parts):
        per_token = sum(part.per_token.to(torch.float64) for part in parts)  # (Q, B, T)
    return BatchScores(per_layer.sum(dim=-1), per_layer, per_token)


def concat_scores(parts: Sequence[BatchScores]) -> BatchScores:
    """Micro-batches' scores side by side along the batch dimension."""
    if len(parts) == 1:
        return parts[0]
    per_token = None if parts[0].per_token is None else torch.cat([p.per_token for p in parts], dim=1)
    return BatchScores(torch.cat([p.total for p in parts], dim=1), torch.cat([p.per_layer for p in parts], dim=1),
                       per_token)


def sum_coefficients(parts: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A Fisher-vector product's c (B, Q) for one micro-batch: the stages' parts (each over its own layers) summed
    in stage order; None is a stage without tracked layers."""
    present = [part for part in parts if part is not None]
    if not present:
        raise ValueError("no stage holds a tracked layer")
    total = present[0].clone()
    for part in present[1:]:
        total += part
    return total


def merge_products(parts: Sequence[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """G V (layer -> (Q, d_out, d_in) float64, layers in stage order, which is the model's) from the stages'
    (product sums, sequences accumulated); stages without tracked layers hold none. Every stage with layers saw
    the same micro-batches, so their counts are checked equal."""
    held = [(sums, sequences) for sums, sequences in parts if sums]
    counts = {sequences for _, sequences in held}
    if len(counts) != 1 or 0 in counts:
        raise RuntimeError(f"stages accumulated different numbers of fitting sequences: {sorted(counts)}")
    sequences = counts.pop()
    return {name: total / sequences for sums, _ in held for name, total in sums.items()}
