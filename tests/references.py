"""Brute-force references: dense per-sequence gradients and exact Fisher blocks (float64)."""

from __future__ import annotations

import torch

from whence.api import sequence_batches
from whence.task import LanguageModelingTask
from whence.tracking import LayerTracker


def per_sequence_gradients(model, tokenizer, layers, sequences, fisher="true", seed=0, objective=None):
    """name -> (N, d_out * d_in): each sequence's gradient, row-major, from the same objective as fitting."""
    task = LanguageModelingTask()
    tracker = LayerTracker(layers)
    objective = objective or (lambda logits, b: task.fisher_objective(logits, b, fisher))
    out = {layer.name: [] for layer in layers}
    for _, batch in sequence_batches(tokenizer, sequences, batch_size=16, seed=seed):
        for layer, capture in zip(layers, tracker.capture(model, batch, objective, task.forward)):
            out[layer.name].append(capture.per_sequence_gradients().flatten(1).to(torch.float64))
    return {name: torch.cat(parts) for name, parts in out.items()}


def exact_fisher(gradients: torch.Tensor) -> torch.Tensor:
    """G = mean_n g_n g_n^T, (D, D)."""
    return gradients.T @ gradients / gradients.shape[0]


def kronecker_basis(basis) -> torch.Tensor:
    """Q = Q_S kron Q_A (dense, blocks assembled), matching row-major vec of (d_out, d_in)."""
    q_a = torch.block_diag(*basis.activation_vectors)
    q_s = torch.block_diag(*basis.gradient_vectors)
    return torch.kron(q_s, q_a)
