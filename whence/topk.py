"""Per-query top-k of scored sequences, mergeable across workers with a deterministic order.

Order: score descending, then doc_id ascending, then chunk ascending. Ties are broken by the sequence's key, so
the result is the same whatever the number of workers or the order in which batches arrive.

A TopK goes to and from the topk.parquet columns with `to_columns` and `from_table` (whence.results writes and
reads the files).
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
        return cls(list(query_ids), k, [_blank(num_layers) for _ in query_ids])

    @classmethod
    def from_table(cls, table, query_ids: list[str], k: int | None, num_layers: int, fragment: int = -1) -> TopK:
        """The entries of a table in the topk.parquet schema (a pyarrow Table; rows in any order, ranks ignored;
        rows of other queries dropped), all from corpus fragment `fragment`. One pass over the rows."""
        n = table.num_rows
        position = {query_id: q for q, query_id in enumerate(query_ids)}
        codes = np.fromiter((position.get(query_id, -1) for query_id in table.column("query_id").to_pylist()),
                            dtype=np.int64, count=n)
        columns = {
            "doc_id": np.asarray(table.column("doc_id").to_pylist(), dtype=object),
            "chunk": table.column("chunk").to_numpy().astype(np.int64),
            "score": table.column("score").to_numpy().astype(np.float64),
            # list<float64> flattened row-major: (n, L)
            "layer_scores": np.asarray(table.column("layer_scores").combine_chunks().flatten().to_numpy(
                zero_copy_only=False), dtype=np.float64).reshape(n, num_layers),
            "fragment": np.full(n, fragment, dtype=np.int64),
        }
        entries = [_prune({name: values[rows] for name, values in columns.items()}, k)
                   for rows in rows_by_query(codes, len(query_ids))]
        return cls(list(query_ids), k, entries)

    def update(self, doc_ids, chunks, scores: np.ndarray, layer_scores: np.ndarray, fragments=None) -> None:
        """scores (N, Q), layer_scores (N, Q, L) for N sequences."""
        doc_ids = np.asarray(doc_ids, dtype=object)
        chunks = np.asarray(chunks, dtype=np.int64)
        fragments = np.full(len(chunks), -1, dtype=np.int64) if fragments is None else np.asarray(fragments, np.int64)
        for q, kept in enumerate(self.entries):
            incoming = {"doc_id": doc_ids, "chunk": chunks, "score": scores[:, q], "layer_scores": layer_scores[:, q, :],
                        "fragment": fragments}
            self.entries[q] = _prune(_concat(kept, incoming), self.k)

    def update_query(self, q: int, doc_ids, chunks, scores: np.ndarray, layer_scores: np.ndarray, fragments) -> None:
        """Query q's candidates only: scores (N,), layer_scores (N, L) (from another TopK's long_columns)."""
        incoming = {"doc_id": np.asarray(doc_ids, dtype=object), "chunk": np.asarray(chunks, dtype=np.int64),
                    "score": np.asarray(scores, dtype=np.float64), "layer_scores": np.asarray(layer_scores),
                    "fragment": np.asarray(fragments, dtype=np.int64)}
        self.entries[q] = _prune(_concat(self.entries[q], incoming), self.k)

    def long_columns(self) -> dict[str, np.ndarray]:
        """Every kept entry as rows: query (n,) its query's index, doc_id, chunk, score (n,), layer_scores (n, L),
        fragment (n,); query by query, each in rank order."""
        entries = self.entries or [_blank(0)]
        columns = {name: np.concatenate([entry[name] for entry in entries]) for name in entries[0]}
        columns["query"] = np.repeat(np.arange(len(self.entries), dtype=np.int64),
                                     [len(entry["score"]) for entry in self.entries])
        return columns

    def merge(self, other: TopK) -> TopK:
        """Fold another worker's TopK (same queries) into this one."""
        self.entries = [_prune(_concat(mine, theirs), self.k) for mine, theirs in zip(self.entries, other.entries)]
        return self

    def to_columns(self) -> dict:
        """Every kept entry in rank order, query by query, as the topk.parquet columns: query_id and doc_id (lists
        of str), rank, chunk, score (n,) and layer_scores (n, L)."""
        counts = [len(entry["score"]) for entry in self.entries]
        entries = self.entries or [_blank(0)]
        joined = lambda name: np.concatenate([entry[name] for entry in entries])  # noqa: E731
        return {
            "query_id": [query_id for query_id, count in zip(self.query_ids, counts) for _ in range(count)],
            "rank": np.concatenate([np.arange(1, count + 1, dtype=np.int64) for count in counts]
                                   + [np.empty(0, dtype=np.int64)]),
            "doc_id": [str(doc_id) for doc_id in joined("doc_id")],
            "chunk": joined("chunk").astype(np.int64),
            "score": joined("score").astype(np.float64),
            "layer_scores": joined("layer_scores").astype(np.float64),
        }

    def rows(self):
        """Yield dicts (query_id, rank, doc_id, chunk, score, layer_scores) in rank order."""
        for query_id, entry in zip(self.query_ids, self.entries):
            for rank in range(len(entry["score"])):
                yield {"query_id": query_id, "rank": rank + 1, "doc_id": str(entry["doc_id"][rank]),
                       "chunk": int(entry["chunk"][rank]), "score": float(entry["score"][rank]),
                       "layer_scores": [float(x) for x in entry["layer_scores"][rank]]}


def rows_by_query(codes: np.ndarray, num_queries: int) -> list[np.ndarray]:
    """For each query q < num_queries, the indices of the rows whose code is q, in row order (other codes, such as
    -1, dropped): one stable sort, query q's rows are order[bounds[q]:bounds[q + 1]]."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(num_queries + 1))
    return [order[bounds[q] : bounds[q + 1]] for q in range(num_queries)]


def _blank(num_layers: int) -> dict:
    return {"doc_id": np.empty(0, dtype=object), "chunk": np.empty(0, dtype=np.int64),
            "score": np.empty(0, dtype=np.float64), "layer_scores": np.empty((0, num_layers)),
            "fragment": np.empty(0, dtype=np.int64)}


def _concat(a: dict, b: dict) -> dict:
    return {name: np.concatenate([a[name], b[name]]) for name in a}


def _prune(entry: dict, k: int | None) -> dict:
    # np.lexsort sorts by the last key first: score descending, then doc_id, then chunk ascending.
    order = np.lexsort((entry["chunk"], entry["doc_id"].astype(str), -entry["score"]))
    if k is not None:
        order = order[:k]
    return {name: values[order] for name, values in entry.items()}
