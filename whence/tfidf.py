"""The paper's TF-IDF filter: per query, keep the N training sequences most similar to the query's text.

Similarity is Okapi BM25 with binary term presence, k1 = 1.5 and no length normalisation (Grosse et al. 2023):

    score(q, m) = sum over terms t in both q and m of  IDF(t) * f(k1 + 1) / (f + k1),   f = 1 if t in m
    IDF(t)      = log((C - count_t + 0.5) / (count_t + 0.5) + 1)

with C the number of training sequences and count_t the number of them containing t. Everything streams with
memory independent of the corpus size: terms are hashed into F buckets (`TermHasher`), document frequencies are
F counters (`DocumentFrequencies`), and the top N per query is kept by a bounded `CandidateSelector`. Document
frequencies and selectors computed on parts of the corpus merge into exactly the one-pass result.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer

DEFAULT_FEATURES = 2**20
DEFAULT_K1 = 1.5
# A selector re-sorts everything when an offer brings at least 1/8 as many entries as it keeps, else inserts them.
_FULL_SORT_RATIO = 8


class TermHasher:
    """Texts -> binary term-presence rows (n, F): entry (i, t) is 1 when hashed term t occurs in text i.

    Wraps scikit-learn's `HashingVectorizer` (lowercased word tokens, no sign flipping, no normalisation), so
    it is stateless: every worker hashes identically, with no vocabulary to fit or ship.
    """

    def __init__(self, n_features: int = DEFAULT_FEATURES):
        self.n_features = n_features
        self._vectorizer = HashingVectorizer(
            n_features=n_features,
            binary=True,
            norm=None,
            alternate_sign=False,
            lowercase=True,
            dtype=np.float64,
        )

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """csr (n, F) float64 of 0/1, canonical (sorted indices, no duplicates)."""
        matrix = sp.csr_matrix(self._vectorizer.transform(list(texts)))
        matrix.sum_duplicates()
        return matrix


@dataclass
class DocumentFrequencies:
    """For each hashed term t, `counts[t]` = the number of sequences containing t; `num_documents` = C.

    `update` adds a batch of binary rows; partial frequencies from any split of the corpus sum (`+`, `merge`)
    to exactly the one-pass frequencies.
    """

    counts: np.ndarray  # (F,) int64
    num_documents: int = 0

    @classmethod
    def zeros(cls, n_features: int = DEFAULT_FEATURES) -> DocumentFrequencies:
        return cls(np.zeros(n_features, dtype=np.int64), 0)

    @property
    def n_features(self) -> int:
        return self.counts.shape[0]

    def update(self, rows: sp.spmatrix) -> None:
        """Count a batch of term-presence rows (n, F): each row adds 1 to every term it contains."""
        rows = sp.csr_matrix(rows)
        if rows.shape[1] != self.n_features:
            raise ValueError(f"rows have {rows.shape[1]} features, frequencies {self.n_features}")
        rows.sum_duplicates()  # canonical: each (row, term) once, so counting indices counts rows
        present = rows.indices[rows.data != 0]
        self.counts += np.bincount(present, minlength=self.n_features).astype(np.int64)
        self.num_documents += rows.shape[0]

    def merge(self, other: DocumentFrequencies) -> DocumentFrequencies:
        """New frequencies summing both; neither input changes."""
        if other.n_features != self.n_features:
            raise ValueError(
                f"cannot merge frequencies over {self.n_features} and {other.n_features} features"
            )
        return DocumentFrequencies(self.counts + other.counts, self.num_documents + other.num_documents)

    __add__ = merge

    def idf(self) -> np.ndarray:
        """(F,) float64: IDF(t) = log((C - count_t + 0.5) / (count_t + 0.5) + 1), always > 0.

        The "+ 1" inside the log keeps terms present in more than half the sequences positive (classic BM25
        would make them negative); a term in no sequence gets the largest weight, log(2C + 2).
        """
        count = self.counts.astype(np.float64)
        return np.log((self.num_documents - count + 0.5) / (count + 0.5) + 1.0)


def bm25_scores(
    queries: sp.spmatrix, sequences: sp.spmatrix, idf: np.ndarray, k1: float = DEFAULT_K1
) -> np.ndarray:
    """BM25 scores (Q, n) float64 of binary query rows (Q, F) against sequence rows (n, F), weights `idf` (F,).

    score[q, m] = sum_t [t in q] * idf_t * f_mt (k1 + 1) / (f_mt + k1), with no length normalisation (b = 0).
    With binary presence f_mt in {0, 1} the saturation f(k1 + 1)/(f + k1) is 0 for an absent term and exactly
    1 for a present one, whatever k1: each shared term contributes idf_t, and k1 has no effect. It is applied to
    the stored entries anyway, so non-binary counts would be scored by the full formula.

    Computed as one sparse product: presence(queries) (Q, F) @ [idf * saturation(sequences)] (n, F)^T.
    """
    queries, sequences = sp.csr_matrix(queries), sp.csr_matrix(sequences)
    idf = np.asarray(idf, dtype=np.float64)
    if not queries.shape[1] == sequences.shape[1] == idf.shape[0]:
        raise ValueError(
            f"features differ: queries {queries.shape}, sequences {sequences.shape}, idf {idf.shape}"
        )
    presence = queries.copy()
    presence.data = (presence.data != 0).astype(np.float64)  # a query term counts once
    weighted = sequences.astype(np.float64)  # a copy: the caller's matrix is left alone
    # (n, F): entry (m, t) becomes idf_t * f(k1 + 1)/(f + k1), the saturation being 1 for binary presence.
    weighted.data = idf[weighted.indices] * weighted.data * (k1 + 1.0) / (weighted.data + k1)
    return (presence @ weighted.T).toarray()  # (Q, n) float64


class CandidateSelector:
    """Per query, the `num_candidates` (N) sequences with the highest BM25 scores, keyed by (doc_id, chunk).

    Order: score descending, ties broken by (doc_id, chunk) ascending, so the result is a function of the set
    of scored sequences only, never of the order, batching or number of workers that scored them; partial
    selectors `merge` into exactly the one-pass selection. Sequences scoring 0 (no shared term) are eligible but
    rank last. Memory: at most Q*N kept entries between calls (numpy arrays per query, pruned on every update);
    a sequence offered twice with the same score (a retried batch) is kept once. Cost per update: a batch
    entry below a query's current N-th score is dropped by one vectorised comparison; the few that enter are
    inserted by binary search (a full re-sort only when an offer is large next to what is kept).
    """

    def __init__(self, query_ids: Sequence[str], num_candidates: int):
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.query_ids = list(query_ids)
        self.num_candidates = num_candidates
        empty = _Kept.empty()
        self._kept: list[_Kept] = [empty] * len(self.query_ids)  # one per query, best first

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    @property
    def stored_size(self) -> int:
        """Entries held across all queries (<= Q*N)."""
        return sum(len(kept) for kept in self._kept)

    def update(self, scores: np.ndarray, doc_ids: Sequence[str], chunks: Sequence[int]) -> None:
        """Offer a batch of n sequences: `scores` (Q, n), their `doc_ids` (n,) and `chunks` (n,)."""
        scores = np.asarray(scores, dtype=np.float64)
        ids, chunks = np.asarray(doc_ids, dtype=object), np.asarray(chunks, dtype=np.int64)
        if scores.shape != (self.num_queries, ids.shape[0]) or chunks.shape != ids.shape:
            raise ValueError(
                f"scores {scores.shape} must be (queries={self.num_queries}, n) with n = {ids.shape} = {chunks.shape}"
            )
        if not np.isfinite(scores).all():
            raise ValueError("scores must be finite")
        for q, row in enumerate(scores):
            self._kept[q] = self._kept[q].offer(_Kept(row, ids, chunks), self.num_candidates)

    def merge(self, other: CandidateSelector) -> CandidateSelector:
        """A new selector holding the best of both (disjoint or overlapping parts); neither input changes."""
        if other.query_ids != self.query_ids or other.num_candidates != self.num_candidates:
            raise ValueError("cannot merge selectors over different queries or numbers of candidates")
        merged = CandidateSelector(self.query_ids, self.num_candidates)
        merged._kept = [a.offer(b, self.num_candidates) for a, b in zip(self._kept, other._kept)]
        return merged

    def candidates(self, query_index: int) -> list[tuple[str, int, float]]:
        """(doc_id, chunk, score) of one query's candidates, best first."""
        kept = self._kept[query_index]
        return list(zip(kept.doc_ids.tolist(), kept.chunks.tolist(), kept.scores.tolist()))

    def all_keys(self) -> set[tuple[str, int]]:
        """Every (doc_id, chunk) that is a candidate of at least one query: the sequences to score."""
        return {(d, c) for kept in self._kept for d, c in zip(kept.doc_ids.tolist(), kept.chunks.tolist())}


@dataclass(frozen=True)
class _Kept:
    """Parallel arrays of one query's entries: scores float64, doc_ids object (str), chunks int64.

    Kept in selection order, best first: key (-score, doc_id, chunk) ascending, no entry repeated.
    """

    scores: np.ndarray
    doc_ids: np.ndarray
    chunks: np.ndarray

    @classmethod
    def empty(cls) -> _Kept:
        return cls(np.empty(0, np.float64), np.empty(0, object), np.empty(0, np.int64))

    def __len__(self) -> int:
        return self.scores.shape[0]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.scores, self.doc_ids, self.chunks

    def take(self, index: np.ndarray | slice) -> _Kept:
        return _Kept(self.scores[index], self.doc_ids[index], self.chunks[index])

    def offer(self, new: _Kept, limit: int) -> _Kept:
        """The best `limit` of self (sorted) and `new` (any order), sorted."""
        if len(self) == limit:
            # Only entries scoring at least the current worst can enter (a tie may win on its key).
            new = new.take(np.flatnonzero(new.scores >= self.scores[-1]))
        if len(new) == 0:
            return self
        if len(new) * _FULL_SORT_RATIO >= len(self):  # a large offer: sort everything at once
            both = _Kept(*(np.concatenate(pair) for pair in zip(self.arrays(), new.arrays())))
            return both.sorted_unique().take(slice(0, limit))
        return self._insert(new.sorted_unique().take(slice(0, limit))).take(slice(0, limit))

    def sorted_unique(self) -> _Kept:
        """Sorted into selection order, dropping exact repeats (same key and score, adjacent once sorted)."""
        # lexsort's last key is the primary one: score descending, then doc_id, then chunk ascending.
        ordered = self.take(np.lexsort((self.chunks, self.doc_ids, -self.scores)))
        repeat = np.zeros(len(ordered), dtype=bool)
        repeat[1:] = (
            (ordered.scores[1:] == ordered.scores[:-1])
            & (ordered.doc_ids[1:] == ordered.doc_ids[:-1])
            & (ordered.chunks[1:] == ordered.chunks[:-1])
        )
        return ordered.take(np.flatnonzero(~repeat))

    def _insert(self, new: _Kept) -> _Kept:
        """Merge a few sorted, unique entries into self: O(k log N) comparisons instead of a full sort."""
        positions = np.empty(len(new), dtype=np.int64)
        fresh = np.ones(len(new), dtype=bool)
        neg = -self.scores  # ascending
        lo = np.searchsorted(neg, -new.scores, side="left")
        hi = np.searchsorted(neg, -new.scores, side="right")
        for i in range(len(new)):
            # Among the entries with an equal score, place by (doc_id, chunk); usually there are none.
            key = (new.doc_ids[i], int(new.chunks[i]))
            at = lo[i] + bisect.bisect_left(range(lo[i], hi[i]), key, key=self._key_at)
            positions[i] = at
            fresh[i] = at == hi[i] or self._key_at(at) != key  # the same key and score is already kept
        return _Kept(*(np.insert(a, positions[fresh], b[fresh]) for a, b in zip(self.arrays(), new.arrays())))

    def _key_at(self, index: int) -> tuple[str, int]:
        return self.doc_ids[index], int(self.chunks[index])
