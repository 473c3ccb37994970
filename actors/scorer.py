"""The Ray Data stage that scores sequence batches against the prepared queries, whole or sharded.

    RowScorer              turns a Ray Data batch into the stage's output columns with any scorer that has
                           score(batch, per_token) -> BatchScores, `rows_per_call` sequence rows at a time
    SequenceScorer         a RowScorer over whence.scoring.QueryScorer on a model replica in this process
    ShardedSequenceScorer  a RowScorer over actors.sharded_worker.ShardedWorker: the model split over stage actors

Callable classes (Ray's batch-inference pattern): the model and the queries load once in __init__; __call__
takes and returns dict[str, np.ndarray]. Marker rows (the end of a corpus fragment) pass through unscored so the
driver can tell when a fragment is complete. With top_k a batch leaves as its per-query top-k entries and a tally
(whence.fragment_parts.reduce_to_top_k) rather than a row of Q x (L + 1) scores per sequence. With `scores` (a
whence.fragment_parts.ScoresPieces: --save-all-scores) the scorer first writes every score of the batch itself, one
piece per fragment under the run's parts directory, so that every score never has to travel to the driver.
"""

from __future__ import annotations

import numpy as np

from actors.hosting import ModelSpec, host_model, maybe_fail, pad_id_of, rows_to_batch, sequence_rows_mask
from actors.sharded_worker import ShardedWorker, ShardOptions
from whence.errors import NonFiniteError
from whence.fragment_parts import ScoresPieces, reduce_to_top_k
from whence.queries import PreparedQueries
from whence.scoring import QueryScorer


def load_prepared(paths: str | list[str], query_range: tuple[int, int] | None = None) -> PreparedQueries:
    """The prepared queries of one file, or of several side by side (a run's queries and its baselines' scored
    in one pass: the scores of file i are the columns of its queries, in file order); only the queries in
    [start, stop) = query_range of each (a query group) when given."""
    if isinstance(paths, str):
        return PreparedQueries.load(paths, queries=query_range)
    return PreparedQueries.concatenate([PreparedQueries.load(path, queries=query_range) for path in paths])


SLICE_ROWS = 4096  # rows of a batch scored and reduced at a time when scorers send their top-k (RowScorer)


def concatenate_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Column dicts with the same columns, one after the other."""
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


class RowScorer:
    """Scores the sequence rows of Ray Data batches with `scorer` (Q queries, L tracked layers), in row order,
    `rows_per_call` rows per call to scorer.score, and lays the scores out per row; writes them to `scores`' pieces
    when given, then cuts them to `top_k` when given."""

    def __init__(self, scorer, num_queries: int, num_layers: int, pad_id: int, per_token: bool, rows_per_call: int,
                 skip_non_finite: bool = False, top_k: int | None = None, scores: ScoresPieces | None = None):
        self.scorer = scorer
        self.num_queries, self.num_layers = num_queries, num_layers
        self.pad_id, self.per_token, self.rows_per_call = pad_id, per_token, rows_per_call
        self.skip_non_finite = skip_non_finite
        self.top_k = top_k  # when set, each batch leaves cut to its per-query top-k (reduce_to_top_k)
        self.scores = scores  # when set, every score of each batch is written here before it leaves
        self.batches_done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's scores per row, or with top_k its reduced rows. Ray Data may hand a whole fragment over as
        one batch (its reader's blocks are merged up to Ray's target block size: 173,000 sequences in one batch
        measured by `whence bench --only scale`), so with top_k the batch is scored SLICE_ROWS rows at a time,
        each slice written and reduced before the next: (SLICE_ROWS, Q, L) scores at most, whatever the batch."""
        if self.top_k is None or len(batch["doc_id"]) <= SLICE_ROWS:
            out = self._rows(batch)
        else:
            step = max(SLICE_ROWS // self.rows_per_call, 1) * self.rows_per_call  # the same scorer calls
            out = concatenate_columns([self._rows({name: values[start : start + step] for name, values in batch.items()})
                                       for start in range(0, len(batch["doc_id"]), step)])
        self.batches_done += 1
        maybe_fail(self.batches_done)  # after the pieces: the batch Ray Data reruns overwrites them
        return out

    def _rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score, write (scores' pieces) and reduce (top_k) one batch or slice of one."""
        keep = sequence_rows_mask(batch)
        n = len(keep)
        scores = np.zeros((n, self.num_queries), dtype=np.float64)  # (rows, Q)
        layer_scores = np.zeros((n, self.num_queries, self.num_layers), dtype=np.float64)  # (rows, Q, L)
        token_scores = np.empty(n, dtype=object) if self.per_token else None  # each (Q, T_row)
        non_finite = np.zeros(n, dtype=bool)  # rows skipped for NaN or inf (skip_non_finite): not scored
        sequence_rows = np.flatnonzero(keep)
        for start in range(0, len(sequence_rows), self.rows_per_call):
            for rows, result in self._scored(batch, sequence_rows[start : start + self.rows_per_call], non_finite):
                scores[rows] = result.total.T.cpu().numpy()
                layer_scores[rows] = result.per_layer.permute(1, 0, 2).cpu().numpy()
                if self.per_token:
                    per_token = result.per_token.permute(1, 0, 2).cpu().numpy()  # (B, Q, T)
                    for j, row in enumerate(rows):
                        token_scores[row] = per_token[j, :, : len(batch["input_ids"][row])].copy()
        if token_scores is not None:
            for row in np.flatnonzero(~keep | non_finite):
                token_scores[row] = np.zeros((self.num_queries, 0))
        out = {"fragment": batch["fragment"], "doc_id": batch["doc_id"], "chunk": batch["chunk"],
               "marker_total": batch["marker_total"], "scores": scores, "layer_scores": layer_scores,
               "non_finite": non_finite,
               "num_tokens": np.asarray([len(t) for t in batch["input_ids"]], dtype=np.int64)}
        if token_scores is not None:
            out["token_scores"] = token_scores
            out["input_ids"] = batch["input_ids"]
        if self.scores is not None:
            self.scores.write(out)
        return out if self.top_k is None else reduce_to_top_k(out, self.top_k)

    def _scored(self, batch: dict[str, np.ndarray], rows: np.ndarray, non_finite: np.ndarray):
        """(rows, BatchScores) for `rows` of the batch, scored together. A NaN or inf raises NonFiniteError naming
        the sequences; with skip_non_finite the rows are scored one by one instead, and those that fail are
        marked in `non_finite` and left out (a sequence's scores never depend on the others in its batch)."""
        try:
            return [(rows, self._score(batch, rows))]
        except NonFiniteError as error:  # name the sequences: doc id and chunk of each batch row
            if not self.skip_non_finite:
                raise error.naming([f"{batch['doc_id'][r]}#{batch['chunk'][r]}" for r in rows]) from None
        scored = []
        for row in rows:
            try:
                scored.append((np.asarray([row]), self._score(batch, np.asarray([row]))))
            except NonFiniteError:
                non_finite[row] = True
        return scored

    def _score(self, batch: dict[str, np.ndarray], rows: np.ndarray):
        chunk = np.zeros(len(batch["doc_id"]), dtype=bool)
        chunk[rows] = True
        return self.scorer.score(rows_to_batch(batch, chunk, self.pad_id), per_token=self.per_token)


class SequenceScorer:
    """The model (a replica on this process's device) and its QueryScorer, with the queries at `queries_path`
    (one prepared-queries file, or several scored side by side: load_prepared). top_k and scores: RowScorer's."""

    def __init__(self, spec: ModelSpec, queries_path: str | list[str], per_token: bool = False, batch_size: int = 8,
                 num_threads: int | None = None, skip_non_finite: bool = False, top_k: int | None = None,
                 query_range: tuple[int, int] | None = None, scores: ScoresPieces | None = None):
        self.model, self.tokenizer, self.layers = host_model(spec, num_threads)
        queries = load_prepared(queries_path, query_range)
        self.scorer = QueryScorer(self.model, self.layers, queries)
        # A Ray Data block can hold thousands of sequences; the model sees them batch_size at a time, in row
        # order, so which sequences share a forward pass depends only on the block (not on scheduling).
        self.rows = RowScorer(self.scorer, queries.num_queries, len(self.layers), pad_id_of(self.tokenizer),
                              per_token, rows_per_call=batch_size, skip_non_finite=skip_non_finite, top_k=top_k,
                              scores=scores)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.rows(batch)


class ShardedSequenceScorer:
    """The model split over `shards` stage actors (a ShardedWorker) with the queries at `queries_path`: each Ray
    Data batch is cut into micro-batches (of batch_size / shards sequences unless `options` say otherwise) that
    go through the pipeline several at a time. top_k and scores: RowScorer's."""

    def __init__(self, spec: ModelSpec, queries_path: str | list[str], per_token: bool = False, shards: int = 2,
                 batch_size: int = 8, options: ShardOptions | None = None, skip_non_finite: bool = False,
                 top_k: int | None = None, query_range: tuple[int, int] | None = None,
                 scores: ScoresPieces | None = None):
        options = options or ShardOptions()
        self.worker = ShardedWorker(spec, shards, batch_size=batch_size, options=options)
        queries = load_prepared(queries_path, query_range)
        self.worker.set_queries(queries)
        # Enough rows per call to keep every stage busy: the worker cuts them into micro-batches.
        rows_per_call = batch_size * max(shards, options.max_in_flight or shards) * 2
        self.rows = RowScorer(self.worker, queries.num_queries, len(self.worker.layers), self.worker.pad_id,
                              per_token, rows_per_call, skip_non_finite, top_k, scores)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.rows(batch)
