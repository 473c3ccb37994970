"""A scoring run's per-fragment parts (RESULTS_DIR/parts/) and their reduce into topk.parquet and scores.parquet.

While `whence score` runs, each corpus fragment that completes leaves
    parts/topk-NNNNNN.parquet    its per-query top-k in the topk.parquet schema (whence.results), with schema
                                 metadata `fragment` (its index) and `sequences` (how many sequences it scored)
    parts/scores-NNNNNN.parquet  every (query, sequence) score of it, in the scores.parquet schema (only with
                                 --save-all-scores): per scored batch, in the corpus order of the batches' first
                                 sequences (SequenceOrder), its rows for the first query, then for the second, ...
    parts/baseline.METHOD-NNNNNN.parquet   with --baseline METHOD: its top-k by that method's scores, made in
                                 the same pass (the scorers score the run's queries and each baseline's side by side)
Each part has a sha256 sidecar (whence.checksums), written once the part is in place. The top-k part is written
last, so its existence marks the fragment as finished; a resumed run skips it if it and its scores part match
their checksums (`verified_parts`), and scores the fragment again otherwise, with a warning naming the part.

Who writes every score (--save-all-scores). The scorers do, so that the driver receives only each batch's per-query
top-k and a tally (reduce_to_top_k), whatever the corpus size:
    parts/scores-NNNNNN.pieces/KEY.parquet   one piece per scored batch and fragment in it (ScoresPieces), with its
                                 checksum; KEY names the batch's first sequence of the fragment (doc id, chunk),
                                 so a batch Ray Data scores again after a killed actor overwrites its piece
When the fragment completes, the driver joins the pieces its tallies named into the fragment's scores part,
streamed a piece at a time, and removes them (FragmentResults.write); a piece that is missing or does not match
its checksum leaves the fragment unfinished, to be scored again by a rerun. A run removes the pieces of every
fragment it is about to score, so no piece of an earlier attempt is joined with this one's. With --top-k all every
score reaches the driver anyway (it is the top-k), and the driver writes the scores part from the rows it holds.
`concatenate_scores` streams the finished scores parts into scores.parquet, one row group at a time.
Part paths come from the run directory (flows.run_state.RunDirectory.part_path and .finished_parts, or a query
group's: flows.query_groups); this module owns what is in them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from whence.checksums import checksum_problem, remove_with_checksum, write_checksum
from whence.corpus import id_hashes
from whence.errors import WhenceError
from whence.results import (
    SCORES_SCHEMA,
    read_row_groups,
    scores_table,
    topk_table,
    write_table_atomically,
    write_tables_atomically,
)
from whence.topk import TopK, rows_by_query

log = logging.getLogger("whence.score")

TOPK_PART = "topk"
SCORES_PART = "scores"
NON_FINITE = "non_finite"  # top-k part metadata: the sequences skipped for NaN or inf (--skip-non-finite), JSON
PIECES_SUFFIX = ".pieces"  # parts/scores-NNNNNN.pieces/: the scorers' pieces of a fragment's scores part


def baseline_part(method: str) -> str:
    """The part kind of baseline `method`'s top-k (its name does not start with TOPK_PART's "topk-")."""
    return f"baseline.{method}"


class FragmentResults:
    """One fragment's scores as they arrive from the scorers: its per-query top-k, optionally every score, and
    the top-k of each baseline method. With B baselines a batch's scores hold Q x (1 + B) columns: the run's
    queries, then each baseline's same queries in `baselines` order.

    keep_all: the batches carry every score (--top-k all) and the fragment's scores part is written from them;
    when the scorers wrote every score themselves, FragmentResults.write joins their pieces instead. `order`
    puts the batches in corpus order (SequenceOrder); without it they stay in the order they arrived."""

    def __init__(self, fragment: int, query_ids: list[str], k: int | None, num_layers: int, keep_all: bool,
                 baselines: Sequence[str] = (), order: SequenceOrder | None = None):
        self.fragment = fragment
        self.topk = TopK.empty(query_ids, k, num_layers)
        self.baselines = {method: TopK.empty(query_ids, k, num_layers) for method in baselines}
        self.query_ids = list(query_ids)
        self.keep_all = keep_all
        self.order = order
        self.all_scores: list[dict] = []  # per batch: key, doc_id (N,), chunk (N,), scores (N, Q)
        self.batch_keys: list[tuple[str, int]] = []  # per batch holding sequences: its first (doc_id, chunk)
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
        if count:
            self.batch_keys.append(first_sequence(batch, ~markers))
        rows = ~markers & ~skipped
        if rows.any():
            q = len(self.query_ids)
            scores, layer_scores = batch["scores"][rows], batch["layer_scores"][rows]  # (N, Q(1+B)), (N, Q(1+B), L)
            for i, topk in enumerate([self.topk, *self.baselines.values()]):
                topk.update(batch["doc_id"][rows], batch["chunk"][rows], scores[:, i * q : (i + 1) * q],
                            layer_scores[:, i * q : (i + 1) * q], batch["fragment"][rows])
            if self.keep_all:
                self.all_scores.append({"key": self.batch_keys[-1], "doc_id": batch["doc_id"][rows],
                                        "chunk": batch["chunk"][rows], "scores": scores[:, :q]})
        return count

    def _add_entries(self, batch: dict) -> int:
        """A batch of reduce_to_top_k rows: its entries into the top-k of their query (column q of Q x (1 + B):
        the run's query q mod Q, of the run itself or of baseline q div Q), its tallies into the counts and
        their keys (the batch's first sequence of the fragment: its scores piece) into batch_keys."""
        tally = (batch["query"] < 0) & (batch["marker_total"] < 0)
        skipped = tally & batch["non_finite"]
        self.non_finite += [f"{d}#{c}" for d, c in zip(batch["doc_id"][skipped], batch["chunk"][skipped])]
        counted = tally & (batch["sequences"] > 0)
        self.batch_keys += [(str(d), int(c)) for d, c in zip(batch["doc_id"][counted], batch["chunk"][counted])]
        count = int(batch["sequences"][tally].sum())
        self.received += count
        q, topks = len(self.query_ids), [self.topk, *self.baselines.values()]
        for column, rows in enumerate(rows_by_query(batch["query"], q * len(topks))):  # tallies (query -1) dropped
            if len(rows):
                topks[column // q].update_query(column % q, batch["doc_id"][rows], batch["chunk"][rows],
                                                batch["score"][rows], batch["layer_scores"][rows],
                                                batch["fragment"][rows])
        return count

    def batches_in_order(self) -> list[tuple[str, int]]:
        """The keys of the batches that held this fragment's sequences, in corpus order when `order` is given."""
        return self.order.sorted(self.fragment, self.batch_keys) if self.order else list(self.batch_keys)

    def write(self, part_path: Callable[[str, int], Path], pieces: ScoresPieces | None = None) -> str | None:
        """Write this fragment's parts to part_path(kind, fragment); the top-k part last. With `pieces` (the
        scorers wrote every score), the scores part is joined from the pieces the batches named. Returns None, or
        what is wrong with a piece: then no part is written, the fragment's pieces are removed, and the fragment
        stays unfinished (a rerun scores it again)."""
        if pieces is not None:
            rows = (self.received - len(self.non_finite)) * len(self.query_ids)  # skipped sequences have none
            problem = pieces.join(self.fragment, self.batches_in_order(), part_path(SCORES_PART, self.fragment), rows)
            if problem is not None:
                pieces.remove(self.fragment)
                return problem
        metadata = {"fragment": str(self.fragment), "sequences": str(self.received),
                    NON_FINITE: json.dumps(self.non_finite)}
        for method, topk in self.baselines.items():
            write_part(topk_table(topk, metadata), part_path(baseline_part(method), self.fragment))
        if self.keep_all:
            write_part(self._scores(), part_path(SCORES_PART, self.fragment))
        write_part(topk_table(self.topk, metadata), part_path(TOPK_PART, self.fragment))
        return None

    def _scores(self) -> pa.Table:
        # Per batch in batches_in_order, query-major: its rows for the first query, then for the second, ...
        rank = {key: i for i, key in enumerate(self.batches_in_order())}
        tables = [scores_table(scores_columns(self.query_ids, part["doc_id"], part["chunk"], part["scores"]))
                  for part in sorted(self.all_scores, key=lambda part: rank[part["key"]])]
        return pa.concat_tables(tables) if tables else scores_table(scores_columns(self.query_ids, [], [], []))


def scores_columns(query_ids: Sequence[str], doc_ids, chunks, scores) -> dict:
    """The scores.parquet columns of N sequences' scores (N, Q) against the Q queries `query_ids`, query-major:
    the N rows of the first query, then of the second, ..."""
    n, queries = len(doc_ids), len(query_ids)
    return {"query_id": [query_id for query_id in query_ids for _ in range(n)],
            "doc_id": [str(doc_id) for doc_id in doc_ids] * queries,
            "chunk": np.tile(np.asarray(chunks, dtype=np.int64), queries),
            "score": np.asarray(scores, dtype=np.float64).reshape(n, queries).T.ravel()}  # (N, Q) -> Q x N


def first_sequence(batch: dict, rows: np.ndarray) -> tuple[str, int]:
    """(doc_id, chunk) of the first of `rows` (a mask) of a batch: the key of a batch's scores of one fragment."""
    first = int(np.flatnonzero(rows)[0])
    return str(batch["doc_id"][first]), int(batch["chunk"][first])


@dataclass(frozen=True)
class ScoresPieces:
    """Where a query group's scorers write every score themselves (--save-all-scores with a top-k): for each
    batch and fragment in it, one piece in the scores.parquet schema (the run's queries of the group only, not
    the baselines'; query-major; the sequences skipped for NaN or inf left out) at
    DIRECTORY/scores-NNNNNN.pieces/KEY.parquet, with its checksum. KEY is a digest of the batch's first sequence
    of the fragment (first_sequence), which the scorer's tally row for the fragment carries to the driver
    (reduce_to_top_k): the driver joins exactly the pieces it was told of. The same batch scored again (Ray Data
    reruns a killed actor's batches) writes the same KEY, atomically: it overwrites, never duplicates."""

    directory: str  # the query group's parts directory (flows.query_groups.QueryGroup.directory)
    query_ids: tuple[str, ...]  # the group's queries: the first len(query_ids) score columns of a batch

    def fragment_directory(self, fragment: int) -> Path:
        return Path(self.directory) / f"{SCORES_PART}-{fragment:06d}{PIECES_SUFFIX}"

    def piece_path(self, fragment: int, doc_id: str, chunk: int) -> Path:
        """The piece of the batch whose first sequence of `fragment` is (doc_id, chunk)."""
        key = hashlib.blake2b(f"{doc_id}\0{int(chunk)}".encode(), digest_size=12).hexdigest()
        return self.fragment_directory(fragment) / f"{key}.parquet"

    def write(self, scored: dict[str, np.ndarray]) -> None:
        """Write a scorer's output batch (a row per sequence: scores (N, Q'), non_finite, marker rows) as one
        piece per fragment it holds sequences of."""
        sequences = scored["marker_total"] < 0
        queries = len(self.query_ids)
        for fragment in np.unique(scored["fragment"][sequences]).tolist():
            mine = sequences & (scored["fragment"] == fragment)
            kept = mine & ~scored["non_finite"]
            table = scores_table(scores_columns(self.query_ids, scored["doc_id"][kept], scored["chunk"][kept],
                                                scored["scores"][kept, :queries]))
            path = self.piece_path(fragment, *first_sequence(scored, mine))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_part(table, path)

    def join(self, fragment: int, keys: Sequence[tuple[str, int]], out: Path, rows: int | None = None
             ) -> str | None:
        """The fragment's scores part at `out` (with its checksum): the pieces of `keys`, in that order, streamed
        a piece at a time; then the pieces are removed. Returns None, or what is wrong with the pieces (one
        missing, or not matching its checksum, named; or not `rows` rows in all); then nothing is written."""
        paths = [self.piece_path(fragment, doc_id, chunk) for doc_id, chunk in keys]
        for path in paths:
            if (problem := checksum_problem(path)) is not None:
                return f"{path}: {problem}"
        try:
            held = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
            if rows is not None and held != rows:
                return f"{self.fragment_directory(fragment)}: its pieces hold {held} scores, not {rows}"
            write_tables_atomically(read_row_groups(paths), SCORES_SCHEMA, out)
        except (pa.ArrowInvalid, OSError) as error:
            return f"{self.fragment_directory(fragment)}: a piece is unreadable ({error})"
        write_checksum(out)
        self.remove(fragment)
        return None

    def remove(self, fragment: int) -> None:
        """Delete the fragment's pieces (an earlier attempt's, before it is scored again; or joined ones)."""
        shutil.rmtree(self.fragment_directory(fragment), ignore_errors=True)


class SequenceOrder:
    """Each fragment's sequences in the order the corpus pass emits them (flows.corpus_pipeline.sequence_rows):
    its documents in line order, each document's chunks in order. Built from the scan's id hashes of each
    fragment's documents, so a batch's first sequence (doc_id, chunk) says where the batch's rows come, and a
    fragment's scores are laid out the same whatever order its batches arrived in (and so whatever the number of
    workers): a batch holds consecutive sequences of a fragment."""

    def __init__(self, document_hashes: dict[int, np.ndarray]):
        self.document_hashes = document_hashes  # fragment -> whence.corpus.id_hash of its documents, line order

    def sorted(self, fragment: int, keys: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """`keys` (doc_id, chunk) of the fragment's sequences, in corpus order."""
        if not keys:
            return []
        hashes = np.asarray(self.document_hashes[fragment], dtype=np.uint64)  # (D,)
        by_hash = np.argsort(hashes, kind="stable")  # a repeated id keeps line order: its first line is found
        wanted = id_hashes(doc_id for doc_id, _ in keys)  # (P,)
        found = np.minimum(np.searchsorted(hashes[by_hash], wanted), max(len(hashes) - 1, 0))
        if len(hashes) == 0 or not np.array_equal(hashes[by_hash][found], wanted):
            missing = [doc_id for (doc_id, _), ok in zip(keys, hashes[by_hash][found] == wanted) if not ok]
            raise WhenceError(f"fragment {fragment}: documents {missing[:3]} are not in its scan; rerun to resume")
        documents = by_hash[found]  # (P,) each key's document position in the fragment
        chunks = np.asarray([chunk for _, chunk in keys], dtype=np.int64)
        return [keys[i] for i in np.lexsort((chunks, documents))]


def reduce_to_top_k(scored: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """A scorer's output batch cut to what the driver's top-k can use, so the driver receives O(k x Q') rows per
    fragment and batch instead of every score. `scored` has a row per sequence (scores (N, Q'), layer_scores
    (N, Q', L); Q' columns: the queries and any baselines'). The result has a row per kept entry instead:
        entry rows   query >= 0 (its column in scores), doc_id, chunk, score, layer_scores (L,), fragment
        tally rows   query -1, marker_total -1: one per fragment, `sequences` and `num_tokens` of its rows here,
                     doc_id and chunk of its first sequence here (the key of its scores piece: ScoresPieces)
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
        doc_id, chunk = first_sequence(scored, mine)  # the key of the batch's scores piece (ScoresPieces)
        rows.append({"fragment": [fragment], "doc_id": [doc_id], "chunk": [chunk], "sequences": [int(mine.sum())],
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
    """The scores parts, in fragment order, as scores.parquet at `out`: streamed a row group at a time, so the
    writer holds a few hundred thousand rows at most, not every score."""
    write_tables_atomically(_part_row_groups(parts.values()), SCORES_SCHEMA, out)


def _part_row_groups(paths) -> Iterator[pa.Table]:
    for path in paths:
        try:
            yield from read_row_groups([path])
        except (pa.ArrowInvalid, OSError) as error:
            raise WhenceError(f"{path} is damaged ({error}); rerun the same command to score its fragment again"
                              ) from error
