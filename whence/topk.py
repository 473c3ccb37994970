"""Per-query top-k of scored sequences, mergeable across workers with a deterministic order.

Order: score descending, then doc_id ascending, then chunk ascending. Ties are broken by the sequence's key, so
the result is the same whatever the number of workers or the order in which batches arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TopK:
    """Kept entries per query: arrays doc_id (object), chunk (int64), score (float64), layer_scores (n, L), and
    fragment (int64: the corpus fragment the sequence came from, -1 when unknown)."""

    query_ids: list[str]
    k: int | None  # None keeps every entry
    entries: list[dict]

    @classmethod
    def empty(cls, query_ids: list[str], k: int | None, num_layers: int) -> TopK:
        blank = lambda: {"doc_id": np.empty(0, dtype=object), "chunk": np.empty(0, dtype=np.int64),  # noqa: E731
                         "score": np.empty(0, dtype=np.float64), "layer_scores": np.empty((0, num_layers)),
                         "fragment": np.empty(0, dtype=np.int64)}
        return cls(list(query_ids), k, [blank() for _ in query_ids])

    def update(self, doc_ids, chunks, scores: np.ndarray, layer_scores: np.ndarray, fragments=None) -> None:
        """scores (N, Q), layer_scores (N, Q, L) for N sequences."""
        doc_ids = np.asarray(doc_ids, dtype=object)
        chunks = np.asarray(chunks, dtype=np.int64)
        fragments = np.full(len(chunks), -1, dtype=np.int64) if fragments is None else np.asarray(fragments, np.int64)
        for q, kept in enumerate(self.entries):
            incoming = {"doc_id": doc_ids, "chunk": chunks, "score": scores[:, q], "layer_scores": layer_scores[:, q, :],
                        "fragment": fragments}
            self.entries[q] = _prune(_concat(kept, incoming), self.k)

    def merge(self, other: TopK) -> TopK:
        """Fold another worker's TopK (same queries) into this one."""
        self.entries = [_prune(_concat(mine, theirs), self.k) for mine, theirs in zip(self.entries, other.entries)]
        return self

    def rows(self):
        """Yield dicts (query_id, rank, doc_id, chunk, score, layer_scores) in rank order."""
        for query_id, entry in zip(self.query_ids, self.entries):
            for rank in range(len(entry["score"])):
                yield {"query_id": query_id, "rank": rank + 1, "doc_id": str(entry["doc_id"][rank]),
                       "chunk": int(entry["chunk"][rank]), "score": float(entry["score"][rank]),
                       "layer_scores": [float(x) for x in entry["layer_scores"][rank]]}


def _concat(a: dict, b: dict) -> dict:
    return {name: np.concatenate([a[name], b[name]]) for name in a}


def _prune(entry: dict, k: int | None) -> dict:
    # np.lexsort sorts by the last key first: score descending, then doc_id, then chunk ascending.
    order = np.lexsort((entry["chunk"], entry["doc_id"].astype(str), -entry["score"]))
    if k is not None:
        order = order[:k]
    return {name: values[order] for name, values in entry.items()}
