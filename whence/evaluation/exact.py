"""Exact influence for models whose tracked layers are small: the dense damped Fisher, no approximation.

With g_n (D,) the gradient over ALL tracked parameters (layers concatenated in forward order, each layer's
(d_out, d_in) matrix row-major, bias as the last input column) of fitting sequence n's Fisher objective (the
same objective as fitting the factors: labels sampled from the model with the sequence's seed for the "true"
Fisher, the data's for "empirical"), J = [g_1; ...; g_N] (N, D):
    G = J^T J / N                       (D, D) the Fisher over all tracked layers jointly (cross-layer blocks too)
    damping_l = 0.1 x mean(diag(G_ll))  per layer: exactly the factors' heuristic 0.1 x mean(Lambda_l), as
                                        EK-FAC's Lambda_l is a mean of squared rotated gradients whose sum is
                                        the trace of G_ll (rotations keep norms); an absolute value when given
    I(q, m) = grad f(q)^T (G + diag(damping))^-1 grad log p(m)    with grad log p(m) from the data's labels.
The solve takes the smaller system: a Cholesky factorisation of the (D, D) damped Fisher when D <= N, else
Woodbury's identity with the (N, N) matrix N I + J D^-1 J^T. Everything is float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from whence.api import sequence_batches
from whence.evaluation.errors import ModelTooLargeError
from whence.evaluation.lds import mean_and_stderr, pearson_columns, spearman_columns
from whence.factors import DEFAULT_DAMPING_FACTOR
from whence.model import TrackedLayer
from whence.queries import query_gradients
from whence.task import LanguageModelingTask
from whence.text import Query, TrainingSequence
from whence.tracking import LayerTracker

DEFAULT_PARAMETER_BOUND = 20_000


def tracked_parameter_count(layers: Sequence[TrackedLayer]) -> int:
    """D = sum over tracked layers of d_out x d_in (bias included)."""
    return sum(layer.d_out * layer.d_in for layer in layers)


def check_parameter_bound(layers: Sequence[TrackedLayer], bound: int = DEFAULT_PARAMETER_BOUND,
                          where: str = "the model") -> int:
    """D, or ModelTooLargeError naming the count and the bound when D > bound."""
    count = tracked_parameter_count(layers)
    if count > bound:
        raise ModelTooLargeError(
            f"{where}: its {len(layers)} tracked layers hold {count:,} parameters, above the bound of {bound:,} "
            f"for exact influence (a dense {count:,} x {count:,} Fisher); track fewer modules (--modules REGEX) "
            "or raise --max-parameters")
    return count


def flat_gradients(model, tokenizer, layers: Sequence[TrackedLayer], sequences: Sequence[TrainingSequence],
                   fisher: str | None, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """(N, D) float64 per-sequence gradients over all tracked layers: of the Fisher objective (`fisher` "true"
    or "empirical", labels seeded per sequence as in fitting), or of log p(m) with the data's labels (None)."""
    task = LanguageModelingTask()
    tracker = LayerTracker(layers)
    if fisher is None:
        objective = task.sequence_log_likelihood
    else:
        def objective(logits, batch):
            return task.fisher_objective(logits, batch, fisher)
    device = next(model.parameters()).device
    rows = []
    for _, batch in sequence_batches(tokenizer, sequences, batch_size, seed):
        batch = {k: v.to(device) for k, v in batch.items()}
        captures = tracker.capture(model, batch, objective, task.forward)
        rows.append(torch.cat([c.per_sequence_gradients().flatten(1).to("cpu", torch.float64) for c in captures],
                              dim=1))
    return torch.cat(rows)


def flat_query_gradients(model, tokenizer, layers: Sequence[TrackedLayer], queries: Sequence[Query]) -> torch.Tensor:
    """(Q, D) float64 grad f(q) over all tracked layers, in the order of `flat_gradients`."""
    per_layer = query_gradients(model, tokenizer, list(layers), list(queries))  # name -> (Q, d_out, d_in)
    return torch.cat([per_layer[layer.name].flatten(1).cpu() for layer in layers], dim=1)


def layer_dampings(fisher_gradients: torch.Tensor, layers: Sequence[TrackedLayer],
                   damping: float | str = "heuristic") -> tuple[torch.Tensor, dict[str, float]]:
    """((D,) damping per parameter, {layer: damping_l}): 0.1 x mean(diag(G_ll)) per layer, or an absolute value."""
    diagonal = fisher_gradients.square().mean(dim=0)  # (D,) diag(G)
    values, per_parameter, start = {}, [], 0
    for layer in layers:
        end = start + layer.d_out * layer.d_in
        value = (DEFAULT_DAMPING_FACTOR * float(diagonal[start:end].mean()) if damping == "heuristic"
                 else float(damping))
        values[layer.name] = value
        per_parameter.append(torch.full((end - start,), value, dtype=torch.float64))
        start = end
    return torch.cat(per_parameter), values


def damped_inverse_products(fisher_gradients: torch.Tensor, damping: torch.Tensor, vectors: torch.Tensor
                            ) -> torch.Tensor:
    """(Q, D) rows x_q = (J^T J / N + diag(damping))^-1 v_q for J (N, D), damping (D,) > 0, vectors (Q, D)."""
    if not bool((damping > 0).all()):
        raise ValueError("exact influence needs positive damping on every parameter (a layer whose gradients "
                         "are all zero gets none from the heuristic; give an absolute damping)")
    jacobian, count = fisher_gradients.to(torch.float64), fisher_gradients.shape[0]
    vectors = vectors.to(torch.float64)
    if jacobian.shape[1] <= count:  # the (D, D) system
        matrix = jacobian.T @ jacobian / count + torch.diag(damping)
        factor = torch.linalg.cholesky(0.5 * (matrix + matrix.T))  # symmetrise the rounding before Cholesky
        return torch.cholesky_solve(vectors.T, factor).T
    # Woodbury: (D + J^T J / N)^-1 = D^-1 - D^-1 J^T (N I + J D^-1 J^T)^-1 J D^-1, an (N, N) system.
    scaled = vectors / damping  # (Q, D) D^-1 v
    inner = count * torch.eye(count, dtype=torch.float64) + (jacobian / damping) @ jacobian.T  # (N, N)
    factor = torch.linalg.cholesky(0.5 * (inner + inner.T))
    correction = torch.cholesky_solve(jacobian @ scaled.T, factor)  # (N, Q)
    return scaled - (jacobian.T @ correction).T / damping


def exact_scores(query_grads: torch.Tensor, train_grads: torch.Tensor, fisher_gradients: torch.Tensor,
                 damping: torch.Tensor) -> np.ndarray:
    """(Q, N) exact influence of query gradients (Q, D) on training-sequence gradients (N, D)."""
    solved = damped_inverse_products(fisher_gradients, damping, query_grads)  # (Q, D)
    return (solved @ train_grads.to(torch.float64).T).numpy()


def agreement(method_scores: np.ndarray, exact: np.ndarray) -> dict:
    """A method's scores (Q, N) against exact ones (Q, N): per query Pearson and Spearman over the sequences,
    and their means over queries (a query whose scores are constant has no correlation and is left out)."""
    pearson = pearson_columns(np.asarray(method_scores).T, np.asarray(exact).T)  # (Q,)
    spearman = spearman_columns(np.asarray(method_scores).T, np.asarray(exact).T)
    clean = lambda values: [None if np.isnan(v) else float(v) for v in values]  # noqa: E731
    means = clean([mean_and_stderr(pearson)[0], mean_and_stderr(spearman)[0]])
    return {"pearson": means[0], "spearman": means[1], "per_query_pearson": clean(pearson),
            "per_query_spearman": clean(spearman)}
