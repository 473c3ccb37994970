"""Fact tracing (TrackStar, Chang et al. 2024): is a query's known source document ranked near the top?

A query carries `"source"`: a document id or a list of ids. A method ranks the training sequences by score,
highest first (ties by doc id, then chunk, as in topk.parquet); the query's rank is that of the first sequence
of ANY source document (any chunk), 1-based. A sequence a method did not rank (score NaN: outside the query's
TF-IDF candidates) is not in the ranking, so a source never ranked has no rank and reciprocal rank 0.
    recall@k = fraction of queries with rank <= k            MRR = mean over queries of 1 / rank
Baselines: `tfidf`, the BM25 similarity of the query text to each sequence (whence.tfidf, the filter's own
scoring) as the ranking; `random`, a seeded random ranking.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whence.errors import QueryError
from whence.text import Query, load_queries
from whence.tfidf import DEFAULT_FEATURES, CandidateSelector, DocumentFrequencies, TermHasher, bm25_scores

RECALL_AT = (1, 10, 100)
SOURCE_FIELD = "source"


def load_sourced_queries(path: str | Path) -> tuple[list[Query], list[frozenset[str]]]:
    """Queries (validated by whence.text.load_queries) and each one's source document ids; QueryError naming
    the file, line and query id when a query has no "source" or a source is not an id or a list of ids."""
    queries = load_queries(path)
    sources: list[frozenset[str]] = []
    with open(path, encoding="utf-8") as handle:
        numbered = [(n, json.loads(line)) for n, line in enumerate(handle, start=1) if line.strip()]
    for (line_number, row), query in zip(numbered, queries):
        where = f"{path}:{line_number}: query {query.id!r}"
        if SOURCE_FIELD not in row:
            raise QueryError(f"{where} has no {SOURCE_FIELD!r} field (fact tracing needs each query's source "
                             "document id, or a list of ids)")
        source = row[SOURCE_FIELD]
        ids = source if isinstance(source, list) else [source]
        if not ids or any(isinstance(i, bool) or not isinstance(i, (str, int)) or str(i) == "" for i in ids):
            raise QueryError(f"{where}: {SOURCE_FIELD!r} must be a document id or a non-empty list of ids, "
                             f"got {source!r}")
        sources.append(frozenset(str(i) for i in ids))
    return queries, sources


def ranking(scores: np.ndarray, doc_ids: Sequence[str], chunks: Sequence[int]) -> np.ndarray:
    """Indices of the ranked sequences, best first: score descending, then doc id, then chunk; NaN left out."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.asarray(chunks, dtype=np.int64), np.asarray(doc_ids, dtype=str), -scores))
    return order[~np.isnan(scores[order])]


def source_ranks(scores: np.ndarray, doc_ids: Sequence[str], chunks: Sequence[int],
                 sources: Sequence[frozenset[str]]) -> list[int | None]:
    """Per query, the 1-based rank of its first source sequence under scores (Q, N), or None if unranked."""
    doc_ids = np.asarray(doc_ids, dtype=object)
    ranks: list[int | None] = []
    for row, source in zip(np.asarray(scores, dtype=np.float64), sources):
        order = ranking(row, doc_ids, chunks)
        hits = np.flatnonzero(np.isin(doc_ids[order], list(source)))
        ranks.append(int(hits[0]) + 1 if hits.size else None)
    return ranks


@dataclass
class TraceMetrics:
    recall: dict[int, float]  # k -> fraction of queries whose source ranks within k
    mrr: float
    ranks: list[int | None]

    def to_dict(self, query_ids: Sequence[str]) -> dict:
        return {**{f"recall@{k}": v for k, v in self.recall.items()}, "mrr": self.mrr,
                "ranks": dict(zip(query_ids, self.ranks))}


def trace_metrics(ranks: Sequence[int | None], recall_at: Sequence[int] = RECALL_AT) -> TraceMetrics:
    """recall@k and MRR from per-query source ranks (None: never ranked, reciprocal rank 0)."""
    if not ranks:
        raise ValueError("no queries to trace")
    reciprocal = [1.0 / r if r else 0.0 for r in ranks]
    recall = {k: sum(1 for r in ranks if r is not None and r <= k) / len(ranks) for k in recall_at}
    return TraceMetrics(recall, float(np.mean(reciprocal)), list(ranks))


def query_text(query: Query) -> str:
    """The text the TF-IDF filter compares with sequences (as `whence score` builds it)."""
    return f"{query.prompt} {query.completion}"


def bm25_matrix(query_texts: Sequence[str], sequence_texts: Sequence[str],
                n_features: int = DEFAULT_FEATURES) -> np.ndarray:
    """(Q, N) BM25 scores of every query text against every sequence text, IDF over these N sequences."""
    hasher = TermHasher(n_features)
    rows = hasher.transform(sequence_texts)  # (N, F)
    frequencies = DocumentFrequencies.zeros(n_features)
    frequencies.update(rows)
    return bm25_scores(hasher.transform(query_texts), rows, frequencies.idf())


def candidate_mask(bm25: np.ndarray, doc_ids: Sequence[str], chunks: Sequence[int], num_candidates: int,
                   query_ids: Sequence[str]) -> np.ndarray:
    """(Q, N) bool: each query's top-`num_candidates` sequences by BM25, selected as `whence score` selects
    them (whence.tfidf.CandidateSelector, ties by doc id and chunk); all True when num_candidates is 0."""
    if num_candidates == 0:
        return np.ones(bm25.shape, dtype=bool)
    selector = CandidateSelector(query_ids, num_candidates)
    selector.update(bm25, doc_ids, chunks)
    position = {(d, int(c)): n for n, (d, c) in enumerate(zip(doc_ids, chunks))}
    mask = np.zeros(bm25.shape, dtype=bool)
    for q in range(len(query_ids)):
        mask[q, [position[(d, c)] for d, c, _ in selector.candidates(q)]] = True
    return mask


def random_scores(num_queries: int, num_sequences: int, seed: int = 0) -> np.ndarray:
    """(Q, N) independent uniform scores from a numpy Generator seeded with `seed`: the random baseline."""
    return np.random.default_rng(seed).random((num_queries, num_sequences))
