"""SequenceScorer: the Ray Data stage that scores sequence batches against the prepared queries.

A callable class (Ray's batch-inference pattern): the model and the queries load once in __init__; __call__
takes and returns dict[str, np.ndarray]. Marker rows (the end of a corpus fragment) pass through unscored so the
driver can tell when a fragment is complete.
"""

from __future__ import annotations

import numpy as np

from actors.hosting import ModelSpec, host_model, maybe_fail, pad_id_of, rows_to_batch, sequence_rows_mask
from whence.queries import PreparedQueries
from whence.scoring import QueryScorer


class SequenceScorer:
    def __init__(self, spec: ModelSpec, queries_path: str, per_token: bool = False, batch_size: int = 8,
                 num_threads: int | None = None):
        self.model, self.tokenizer, self.layers = host_model(spec, num_threads)
        # A Ray Data block can hold thousands of sequences; the model sees them batch_size at a time, in row
        # order, so which sequences share a forward pass depends only on the block (not on scheduling).
        self.rows_per_call = batch_size
        queries = PreparedQueries.load(queries_path)
        self.scorer = QueryScorer(self.model, self.layers, queries)
        self.per_token = per_token
        self.pad_id = pad_id_of(self.tokenizer)
        self.num_queries, self.num_layers = queries.num_queries, len(self.layers)
        self.batches_done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = sequence_rows_mask(batch)
        n = len(keep)
        scores = np.zeros((n, self.num_queries), dtype=np.float64)
        layer_scores = np.zeros((n, self.num_queries, self.num_layers), dtype=np.float64)
        token_scores = np.empty(n, dtype=object) if self.per_token else None
        sequence_rows = np.flatnonzero(keep)
        for start in range(0, len(sequence_rows), self.rows_per_call):
            rows = sequence_rows[start : start + self.rows_per_call]
            chunk = np.zeros(n, dtype=bool)
            chunk[rows] = True
            result = self.scorer.score(rows_to_batch(batch, chunk, self.pad_id), per_token=self.per_token)
            scores[rows] = result.total.T.cpu().numpy()
            layer_scores[rows] = result.per_layer.permute(1, 0, 2).cpu().numpy()
            if self.per_token:
                per_token = result.per_token.permute(1, 0, 2).cpu().numpy()  # (B, Q, T)
                for j, row in enumerate(rows):
                    token_scores[row] = per_token[j, :, : len(batch["input_ids"][row])].copy()
        if token_scores is not None:
            for row in np.flatnonzero(~keep):
                token_scores[row] = np.zeros((self.num_queries, 0))
        self.batches_done += 1
        maybe_fail(self.batches_done)
        out = {"fragment": batch["fragment"], "doc_id": batch["doc_id"], "chunk": batch["chunk"],
               "marker_total": batch["marker_total"], "scores": scores, "layer_scores": layer_scores,
               "num_tokens": np.asarray([len(t) for t in batch["input_ids"]], dtype=np.int64)}
        if token_scores is not None:
            out["token_scores"] = token_scores
            out["input_ids"] = batch["input_ids"]
        return out
