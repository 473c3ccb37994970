"""Building an index's rows: a model pass per batch of sequences, each sequence's gradient compressed per layer.

For a batch, LayerTracker.capture gives each tracked layer's a (B, T, d_in) and s (B, T, d_out), s the gradient
of the sequence's log-likelihood (the SUM over positions, DESIGN.md) at the layer's output; the projection turns
them into (B, width) rows (whence.index.projection). As in `whence score`, no parameter gradient is computed.
A fragment's sequences are taken `batch_size` at a time in corpus order, so a shard's rows do not depend on how
many workers built the index.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import numpy as np
import torch

from whence.index.projection import Projections
from whence.index.shards import STORAGE_DTYPES, Shard, check_storable
from whence.model import TrackedLayer
from whence.task import LanguageModelingTask
from whence.text import TrainingSequence, collate_sequences, pad_id_of
from whence.tracking import LayerTracker


class GradientCompressor:
    """Holds the model, its tracked layers and the projections; turns sequences into compressed rows."""

    def __init__(self, model, tokenizer, layers: list[TrackedLayer], projections: Projections,
                 task: LanguageModelingTask | None = None):
        if [layer.name for layer in layers] != projections.layer_names:
            raise ValueError("the projections were made for other tracked layers")
        self.model, self.layers, self.projections = model, layers, projections
        self.task = task or LanguageModelingTask()
        self.tracker = LayerTracker(layers)
        self.pad_id = pad_id_of(tokenizer)
        self.device = next(model.parameters()).device

    def compress(self, batch: dict) -> torch.Tensor:
        """(B, width) rows for a collated batch (whence.text.collate), on the CPU."""
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        captures = self.tracker.capture(self.model, batch, self.task.sequence_log_likelihood, self.task.forward)
        return self.projections.compress(captures).cpu()

    def shard(self, fragment: int, sequences: Iterable[TrainingSequence], batch_size: int = 8,
              storage_dtype: str | None = None) -> Shard:
        """Every sequence's row, in order, as fragment `fragment`'s shard; each batch's rows rounded to
        `storage_dtype` as they are made (when given), so a fragment's rows are held once, in the dtype they are
        stored in: a float16 lowrank fragment of 6,000 sequences is 2 GB, its float32 rows twice that."""
        iterator = iter(sequences)
        rows, doc_ids, chunks = [], [], []
        dtype = torch.float64 if next(self.model.parameters()).dtype == torch.float64 else torch.float32
        dtype = STORAGE_DTYPES[storage_dtype] if storage_dtype else dtype
        while group := list(islice(iterator, batch_size)):
            made = self.compress(collate_sequences(group, self.pad_id)).to(dtype)  # (B, width)
            if storage_dtype is not None:
                check_storable(fragment, made, storage_dtype, f" (a sequence of {group[0].doc_id} or after it)")
            rows.append(made)
            doc_ids += [s.doc_id for s in group]
            chunks += [s.chunk for s in group]
        gradients = torch.cat(rows) if rows else torch.zeros(0, self.projections.width, dtype=dtype)
        return Shard(fragment, gradients, doc_ids, np.asarray(chunks, dtype=np.int64))


def check_model_matches_factors(model_fingerprint: str, layers: list[TrackedLayer], factors_manifest: dict) -> None:
    """FactorsMismatchError unless the factors (their manifest.json) were fitted for this model and layers."""
    from whence.factors import Factors

    stub = Factors(factors_manifest.get("strategy", "ekfac"), factors_manifest.get("layers", []), {}, {},
                   {"model_fingerprint": factors_manifest.get("model_fingerprint"),
                    "model": factors_manifest.get("model")})
    stub.check_compatible(model_fingerprint, [layer.describe() for layer in layers])
