"""A scoring run's per-fragment parts (RESULTS_DIR/parts/) and their reduce into topk.parquet and scores.parquet.

While `whence score` runs, each corpus fragment that completes leaves
    parts/topk-NNNNNN.parquet    its per-query top-k in the topk.parquet schema (whence.results), with schema
                                 metadata `fragment` (its index) and `sequences` (how many sequences it scored)
    parts/scores-NNNNNN.parquet  every (query, sequence) score of it, in the scores.parquet schema (only with
                                 --save-all-scores)
    parts/baseline.METHOD-NNNNNN.parquet   with --baseline METHOD: its top-k by that method's scores, made in
                                 the same pass (the scorers score the run's queries and each baseline's side by side)
Each part has a sha256 sidecar (whence.checksums), written once the part is in place. The top-k part is written
last, so its existence marks the fragment as finished; a resumed run skips it if it and its scores part match
their checksums (`verified_parts`), and scores the fragment again otherwise, with a warning naming the part.
Part paths come from the run directory (flows.run_state.RunDirectory.part_path and .finished_parts); this
module owns what is in them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from whence.checksums import checksum_problem, remove_with_checksum, write_checksum
from whence.errors import WhenceError
from whence.results import scores_table, topk_table, write_table_atomically
from whence.topk import TopK, rows_by_query

log = logging.getLogger("whence.score")

TOPK_PART = "topk"
SCORES_PART = "scores"
NON_FINITE = "non_finite"  # top-k part metadata: the sequences skipped for NaN or inf (--skip-non-finite), JSON


def baseline_part(method: str) -> str:
    """The part kind of baseline `method`'s top-k (its name does not start with TOPK_PART's "topk-")."""
    return f"baseline.{method}"


class FragmentResults:
    """One fragment's scores as they arrive from the scorers: its per-query top-k, optionally every score, and
    the top-k of each baseline method. With B baselines a batch's scores hold Q x (1 + B) columns: the run's
    queries, then each baseline's same queries in `baselines` order."""

    def __init__(self, fragment: int, query_ids: list[str], k: int | None, num_layers: int, keep_all: bool,
                 baselines: Sequence[str] = ()):
        self.fragment = fragment
        self.topk = TopK.empty(query_ids, k, num_layers)
        self.baselines = {method: TopK.empty(query_ids, k, num_layers) for method in baselines}
        self.query_ids = list(query_ids)
        self.keep_all = keep_all
        self.all_scores: list[dict] = []  # per batch: doc_id (N,), chunk (N,), scores (N, Q)
        self.received = 0
        self.non_finite: list[str] = []  # "doc_id#chunk" of the sequences skipped for NaN or inf
        self.expected: int | None = None

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.received == self.expected

    def add(self, batch: dict) -> int:
        """Take a scored batch of this fragment's rows (its marker row, if there, says how many to expect);
        returns how many sequences it held."""
        markers = batch["marker_total"] >= 0
        if markers.any():
            self.expected = int(batch["marker_total"][markers][0])
        if "query" in batch:  # already cut to its top-k by the scorer (reduce_to_top_k)
            return self._add_entries(batch)
        skipped = ~markers & batch["non_finite"] if "non_finite" in batch else np.zeros_like(markers)
        self.non_finite += [f"{d}#{c}" for d, c in zip(batch["doc_id"][skipped], batch["chunk"][skipped])]
        count = int((~markers).sum())  # every sequence counts toward completion, a skipped one too
        self.received += count
        rows = ~markers & ~skipped
        if rows.any():
            q = len(self.query_ids)
            scores, layer_scores = batch["scores"][rows], batch["layer_scores"][rows]  # (N, Q(1+B)), (N, Q(1+B), L)
            for i, topk in enumerate([self.topk, *self.baselines.values()]):
                topk.update(batch["doc_id"][rows], batch["chunk"][rows], scores[:, i * q : (i + 1) * q],
                            layer_scores[:, i * q : (i + 1) * q], batch["fragment"][rows])
            if self.keep_all:
                self.all_scores.append({"doc_id": batch["doc_id"][rows], "chunk": batch["chunk"][rows],
                                        "scores": scores[:, :q]})
        return count

    def _add_entries(self, batch: dict) -> int:
        """A batch of reduce_to_top_k rows: its entries into the top-k of their query (column q of Q x (1 + B):
        the run's query q mod Q, of the run itself or of baseline q div Q), its tallies into the counts."""
        tally = (batch["query"] < 0) & (batch["marker_total"] < 0)
        skipped = tally & batch["non_finite"]
        self.non_finite += [f"{d}#{c}" for d, c in zip(batch["doc_id"][skipped], batch["chunk"][skipped])]
        count = int(batch["sequences"][tally].sum())
        self.received += count
        q, topks = len(self.query_ids), [self.topk, *self.baselines.values()]
        for column, rows in enumerate(rows_by_query(batch["query"], q * len(topks))):  # tallies (query -1) dropped
            if len(rows):
                topks[column // q].update_query(column % q, batch["doc_id"][rows], batch["chunk"][rows],
                                                batch["score"][rows], batch["layer_scores"][rows],
                                                batch["fragment"][rows])
        return count

    def write(self, part_path: Callable[[str, int], Path]) -> None:
        """Write this fragment's parts to part_path(kind, fragment); the top-k part last."""
        metadata = {"fragment": str(self.fragment), "sequences": str(self.received),
                    NON_FINITE: json.dumps(self.non_finite)}
        for method, topk in self.baselines.items():
            write_part(topk_table(topk, metadata), part_path(baseline_part(method), self.fragment))
        if self.keep_all:
            write_part(self._scores(), part_path(SCORES_PART, self.fragment))
        write_part(topk_table(self.topk, metadata), part_path(TOPK_PART, self.fragment))

    def _scores(self) -> pa.Table:
        # Per arrived batch, query-major: its rows for the first query, then for the second, ...
        columns = {"query_id": [], "doc_id": [], "chunk": [], "score": []}
        queries = len(self.query_ids)
        for part in self.all_scores:
            columns["query_id"] += [query_id for query_id in self.query_ids for _ in range(len(part["doc_id"]))]
            columns["doc_id"] += [str(doc_id) for doc_id in part["doc_id"]] * queries
            columns["chunk"].append(np.tile(np.asarray(part["chunk"], dtype=np.int64), queries))
            columns["score"].append(np.asarray(part["scores"], dtype=np.float64).T.ravel())  # (N, Q) -> Q x N
        for name in ("chunk", "score"):
            columns[name] = np.concatenate(columns[name]) if columns[name] else []
        return scores_table(columns)


def reduce_to_top_k(scored: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """A scorer's output batch cut to what the driver's top-k can use, so the driver receives O(k x Q') rows per
    fragment and batch instead of every score. `scored` has a row per sequence (scores (N, Q'), layer_scores
    (N, Q', L); Q' columns: the queries and any baselines'). The result has a row per kept entry instead:
        entry rows   query >= 0 (its column in scores), doc_id, chunk, score, layer_scores (L,), fragment
        tally rows   query -1, marker_total -1: one per fragment, `sequences` and `num_tokens` of its rows here
        skip rows    query -1, marker_total -1, non_finite: a sequence skipped for NaN or inf, named
        markers      passed through (marker_total >= 0)
    Exact: an entry of the final top-k is in the top-k of its own batch (the same order, ties by key; whence.topk),
    so the driver's top-k of these rows equals its top-k of every row."""
    markers = scored["marker_total"] >= 0
    skipped = ~markers & scored["non_finite"]
    num_queries, num_layers = scored["layer_scores"].shape[1:]
    rows: list[dict] = []
    for fragment in np.unique(scored["fragment"][~markers]).tolist():
        mine = ~markers & (scored["fragment"] == fragment)
        kept = mine & ~skipped
        topk = TopK.empty([str(q) for q in range(num_queries)], k, num_layers)
        topk.update(scored["doc_id"][kept], scored["chunk"][kept], scored["scores"][kept],
                    scored["layer_scores"][kept], scored["fragment"][kept])
        rows.append(topk.long_columns())
        rows.append({"fragment": [fragment], "sequences": [int(mine.sum())],
                     "num_tokens": [int(scored["num_tokens"][mine].sum())]})
        rows.append({"fragment": scored["fragment"][mine & skipped], "doc_id": scored["doc_id"][mine & skipped],
                     "chunk": scored["chunk"][mine & skipped], "non_finite": np.ones(int((mine & skipped).sum()), bool)})
    rows.append({name: scored[name][markers] for name in ("fragment", "doc_id", "chunk", "marker_total")})
    return _stack_rows(rows, num_layers)


def _stack_rows(parts: list[dict], num_layers: int) -> dict[str, np.ndarray]:
    """reduce_to_top_k's row groups as one batch; a column a group lacks takes its default."""
    defaults = {"fragment": -1, "doc_id": "", "chunk": 0, "marker_total": -1, "query": -1, "score": 0.0,
                "sequences": 0, "num_tokens": 0, "non_finite": False}
    dtypes = {"doc_id": object, "score": np.float64, "non_finite": bool}
    lengths = [len(next(iter(part.values()))) for part in parts]
    out = {name: np.concatenate([np.asarray(part[name], dtype=dtypes.get(name, np.int64)) if name in part
                                 else np.full(n, default, dtype=dtypes.get(name, np.int64))
                                 for part, n in zip(parts, lengths)]) for name, default in defaults.items()}
    out["layer_scores"] = np.concatenate([np.asarray(part["layer_scores"], dtype=np.float64).reshape(n, num_layers)
                                          if "layer_scores" in part else np.zeros((n, num_layers))
                                          for part, n in zip(parts, lengths)])
    return out


def write_part(table: pa.Table, path: Path) -> None:
    """A part, written atomically, then its checksum."""
    write_table_atomically(table, path)
    write_checksum(path)


def verified_parts(finished: dict[int, Path], part_path: Callable[[str, int], Path], with_scores: bool,
                   baselines: Sequence[str] = ()) -> dict[int, Path]:
    """The finished top-k parts (fragment -> path) whose files, scores parts when `with_scores` and the parts of
    the `baselines`, match their checksums. A damaged or unverifiable fragment's parts are deleted with a warning naming the file, so that the
    fragment is scored again: a damaged part costs time, not results."""
    kept = {}
    for fragment, path in finished.items():
        files = [path] + ([part_path(SCORES_PART, fragment)] if with_scores else [])
        files += [part_path(baseline_part(method), fragment) for method in baselines]
        problems = [(file, problem) for file in files if (problem := checksum_problem(file)) is not None]
        if not problems:
            kept[fragment] = path
            continue
        for file, problem in problems:
            log.warning("%s: %s; scoring fragment %d again", file, problem, fragment)
        for file in files:
            remove_with_checksum(file)
    return kept


def _read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise WhenceError(f"{path} is damaged ({error}); rerun the same command to score its fragment again"
                          ) from error


def part_non_finite(path: str | Path) -> list[str]:
    """The sequences ("doc_id#chunk") a finished top-k part's fragment skipped for NaN or inf."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(NON_FINITE.encode(), b"[]"))


def part_sequences(path: str | Path) -> int:
    """How many sequences the fragment of a finished top-k part scored."""
    try:
        return int(pq.read_schema(path).metadata[b"sequences"])
    except (pa.ArrowInvalid, OSError, KeyError, TypeError) as error:
        raise WhenceError(f"{path} is damaged ({error}); rerun the same command to score its fragment again"
                          ) from error


def merge_parts(parts: dict[int, Path], query_ids: list[str], k: int | None, num_layers: int) -> TopK:
    """The finished top-k parts (fragment -> path) merged into one TopK, whose entries remember their fragment."""
    merged = TopK.empty(query_ids, k, num_layers)
    for fragment, path in parts.items():
        merged.merge(TopK.from_table(_read_part(path), query_ids, k, num_layers, fragment=fragment))
    return merged


def reduce_topk(parts: dict[int, Path], query_ids: list[str], k: int | None, num_layers: int, out: Path,
                fisher_sequences: int | None = None) -> TopK:
    """Merge the finished top-k parts (fragment -> path) into topk.parquet at `out` (with its predicted_change
    column from `fisher_sequences`, whence.results.topk_table); returns the merged TopK."""
    merged = merge_parts(parts, query_ids, k, num_layers)
    write_table_atomically(topk_table(merged, fisher_sequences=fisher_sequences), out)
    return merged


def concatenate_scores(parts: dict[int, Path], out: Path) -> None:
    """The scores parts, in fragment order, as scores.parquet at `out`."""
    tables = [_read_part(path) for path in parts.values()]
    empty = {"query_id": [], "doc_id": [], "chunk": [], "score": []}
    write_table_atomically(pa.concat_tables(tables) if tables else scores_table(empty), out)
