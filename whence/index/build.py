"""Building an index's rows: a model pass per batch of sequences, each sequence's gradient compressed per layer.

For a batch, LayerTracker.capture gives each tracked layer's a (B, T, d_in) and s (B, T, d_out), s the gradient
of the sequence's log-likelihood (the SUM over positions, DESIGN.md) at the layer's output; the projection turns
them into (B, width) rows (whence.index.projection). As in `whence score`, no parameter gradient is computed.
A fragment's sequences are taken `batch_size` at a time in corpus order, so a shard's rows do not depend on how
many workers built the index.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import torch

from whence.factors import compute_dtype
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
        """Every sequence's row, in order, as fragment `fragment`'s shard in one piece (`parts` with no limit)."""
        return next(self.parts(fragment, sequences, batch_size, storage_dtype))

    def parts(self, fragment: int, sequences: Iterable[TrainingSequence], batch_size: int = 8,
              storage_dtype: str | None = None, rows_per_part: int | None = None,
              empty_part: bool = True) -> Iterator[Shard]:
        """Fragment `fragment`'s rows in order, as Shards of `rows_per_part` rows (the last one fewer; None: one
        Shard of every row; one empty Shard when there are no sequences, unless not `empty_part`). Each batch's
        rows are rounded to `storage_dtype` as they are made (when given), and a part is handed on as soon as it
        is full, so a caller that writes each part holds one part's rows, in the dtype they are stored in, however
        long the fragment: a float16 lowrank part of 256 MiB is about 800 sequences of the bundled model."""
        iterator = iter(sequences)
        dtype = STORAGE_DTYPES[storage_dtype] if storage_dtype else compute_dtype(next(self.model.parameters()).dtype)
        limit = rows_per_part or float("inf")
        rows, doc_ids, chunks, held, handed = [], [], [], 0, 0
        while group := list(islice(iterator, batch_size)):
            made = self.compress(collate_sequences(group, self.pad_id)).to(dtype)  # (B, width)
            if storage_dtype is not None:
                check_storable(fragment, made, storage_dtype, f" (a sequence of {group[0].doc_id} or after it)")
            rows.append(made)
            doc_ids += [s.doc_id for s in group]
            chunks += [s.chunk for s in group]
            held += len(group)
            while held >= limit:  # a full part: hand it on and keep the batch's rest
                gradients = torch.cat(rows)
                yield Shard(fragment, gradients[:limit], doc_ids[:limit], np.asarray(chunks[:limit], dtype=np.int64))
                handed += 1
                rows, doc_ids, chunks = [gradients[limit:].clone()], doc_ids[limit:], chunks[limit:]
                held -= limit
        if held or (not handed and empty_part):
            gradients = torch.cat(rows) if rows else torch.zeros(0, self.projections.width, dtype=dtype)
            yield Shard(fragment, gradients, doc_ids, np.asarray(chunks, dtype=np.int64))


def check_model_matches_factors(model_fingerprint: str, layers: list[TrackedLayer], factors_manifest: dict) -> None:
    """FactorsMismatchError unless the factors (their manifest.json) were fitted for this model and layers."""
    from whence.factors import Factors

    stub = Factors(factors_manifest.get("strategy", "ekfac"), factors_manifest.get("layers", []), {}, {},
                   {"model_fingerprint": factors_manifest.get("model_fingerprint"),
                    "model": factors_manifest.get("model")})
    stub.check_compatible(model_fingerprint, [layer.describe() for layer in layers])
