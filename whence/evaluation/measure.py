"""Each query's measurement under a model: f(q) = log p(completion | prompt), summed over the completion tokens
(DESIGN.md's convention, whence.task.LanguageModelingTask.measurement), as the LDS compares across models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from whence.task import LanguageModelingTask
from whence.text import Query, collate_queries, context_length


def query_batch(tokenizer, queries: Sequence[Query], model=None, max_length: int | None = None) -> dict:
    """The queries as one right-padded batch (whence.text.collate_queries): made once on the driver and handed
    to every model's measurement, so no tokenizer is needed where the models are trained. QueryError for a
    query longer than `max_length` tokens, or than `model`'s context."""
    limit = context_length(model) if model is not None else max_length
    return collate_queries(tokenizer, list(queries), limit)


@torch.no_grad()
def measure_queries(model, batch: dict, task: LanguageModelingTask | None = None) -> np.ndarray:
    """(Q,) f(q) = log p(completion | prompt) in nats, computed in float64 (the differences between models the
    LDS ranks are small next to f itself); the model is left in its own precision and mode."""
    task = task or LanguageModelingTask()
    device = next(model.parameters()).device
    dtype, was_training = next(model.parameters()).dtype, model.training
    model.to(torch.float64).eval()
    try:
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        logits = task.forward(model, batch)  # (Q, T, V)
        return task.measurement(logits, batch).cpu().numpy().astype(np.float64)
    finally:
        model.to(dtype).train(was_training)
