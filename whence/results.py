"""The RESULTS_DIR contract of `whence score` (DESIGN.md): its file names, Parquet schemas, writers and reader.

A results directory:
    run.json            the run's arguments and status (flows.run_state)
    manifest.json       command, arguments, tracked layers, queries, model, method, summary, versions
    queries.safetensors the preconditioned queries (whence.queries.PreparedQueries)
    candidates.parquet  query_id, rank, doc_id, chunk, bm25                   (TF-IDF filtering)
    topk.parquet        query_id, rank, doc_id, chunk, score, layer_scores, predicted_change   (always)
    tokens.parquet      query_id, rank, doc_id, chunk, tokens, token_ids, token_scores   (--per-token)
    scores.parquet      query_id, doc_id, chunk, score                       (--save-all-scores)
    documents.parquet   doc_id, title                                        (optional, provided by the user)
    report.html         `whence report`
    parts/              one top-k (and scores) part per finished corpus fragment (whence.fragment_parts)
    baselines/METHOD/   with --baseline METHOD: the same sequences scored by METHOD in the same pass, itself a
                        results directory (manifest.json, queries.safetensors, candidates.parquet, topk.parquet)

Writing: `topk_table`, `scores_table`, `tokens_table`, `candidates_table` build tables in these schemas and
`write_table_atomically` writes one; `write_tables_atomically` writes one that arrives in pieces (scores.parquet,
streamed from its parts with `read_row_groups`, so the writer never holds every score). Reading: `load_results`
gives a `Results` whose rows are `Influence`s;
`read_table` gives one file as a pyarrow Table (for pandas in notebooks). Pure pyarrow and numpy: no Ray.

predicted_change (float64, nats; null when the factors do not record N) is what a score means
(whence.evaluation.interpret): the first-order change of log p(completion | prompt) if the sequence were added
once more to the N training sequences the Fisher was averaged over, score / N; N is manifest.json's
"fisher_sequences". Directories written before the column existed are read with it computed from N when the
manifest has it, else None.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from whence.errors import WhenceError
from whence.text import Query
from whence.topk import TopK

MANIFEST_FILE = "manifest.json"
QUERIES_FILE = "queries.safetensors"
CANDIDATES_FILE = "candidates.parquet"
CANDIDATE_SEQUENCES_FILE = "candidate_sequences.parquet"  # the candidates' token ids: passes after the first read them
TOPK_FILE = "topk.parquet"
TOKENS_FILE = "tokens.parquet"
SCORES_FILE = "scores.parquet"
DOCUMENTS_FILE = "documents.parquet"
REPORT_FILE = "report.html"
BASELINES_DIR = "baselines"

TOPK_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int64()), ("doc_id", pa.string()),
                         ("chunk", pa.int64()), ("score", pa.float64()), ("layer_scores", pa.list_(pa.float64())),
                         ("predicted_change", pa.float64())])
SCORES_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("chunk", pa.int64()),
                           ("score", pa.float64())])
TOKENS_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int64()), ("doc_id", pa.string()),
                           ("chunk", pa.int64()), ("tokens", pa.list_(pa.string())),
                           ("token_ids", pa.list_(pa.int64())), ("token_scores", pa.list_(pa.float64()))])
CANDIDATES_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int64()), ("doc_id", pa.string()),
                               ("chunk", pa.int64()), ("bm25", pa.float64())])
CANDIDATE_SEQUENCES_SCHEMA = pa.schema([("fragment", pa.int64()), ("doc_id", pa.string()), ("chunk", pa.int64()),
                                        ("input_ids", pa.list_(pa.int64()))])

# The columns the reader needs from each file (a file may carry more; topk.parquet's predicted_change is
# optional, as older directories lack it).
TOPK_COLUMNS = ("query_id", "rank", "doc_id", "chunk", "score", "layer_scores")
PREDICTED_CHANGE = "predicted_change"
FISHER_SEQUENCES = "fisher_sequences"  # manifest.json: N, the sequences the Fisher was averaged over
TOKENS_COLUMNS = ("query_id", "rank", "tokens", "token_scores")
SCORES_COLUMNS = ("query_id", "score")
DOCUMENTS_COLUMNS = ("doc_id", "title")
READ_COLUMNS = {TOPK_FILE: TOPK_COLUMNS, TOKENS_FILE: TOKENS_COLUMNS, SCORES_FILE: SCORES_COLUMNS,
                DOCUMENTS_FILE: DOCUMENTS_COLUMNS, CANDIDATES_FILE: tuple(CANDIDATES_SCHEMA.names)}
# Rows per row group of a file written in pieces (write_tables_atomically): scores.parquet holds about 40 bytes a
# row, so ~10 MB of rows in memory at a time.
ROWS_PER_GROUP = 1 << 18


# ----------------------------------------------------------------------------------------------- writing


def table_of(schema: pa.Schema, columns: dict) -> pa.Table:
    """A table in `schema` from a dict of column values (lists or 1-d arrays), one per field."""
    return pa.table({name: pa.array(columns[name], schema.field(name).type) for name in schema.names}, schema=schema)


def topk_table(topk: TopK, metadata: dict[str, str] | None = None, fisher_sequences: int | None = None
               ) -> pa.Table:
    """The topk.parquet table of a TopK (rank order, query by query); parts add `metadata` to its schema.
    fisher_sequences: N for the predicted_change column (score / N nats); None leaves the column null."""
    from whence.evaluation.interpret import predicted_change

    columns = topk.to_columns()
    layer_scores = columns["layer_scores"]  # (n, L)
    n, width = layer_scores.shape
    arrays = [pa.array(columns[name], TOPK_SCHEMA.field(name).type) for name in TOPK_COLUMNS[:-1]]
    # Row i's layer scores are values[offsets[i]:offsets[i + 1]]: a list column without a Python loop.
    arrays.append(pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * width),
                                           pa.array(layer_scores.ravel(), pa.float64())))
    change = predicted_change(columns["score"], fisher_sequences) if fisher_sequences else None
    arrays.append(pa.array(change, pa.float64()) if change is not None else pa.nulls(n, pa.float64()))
    table = pa.Table.from_arrays(arrays, schema=TOPK_SCHEMA)
    return table.replace_schema_metadata(metadata) if metadata else table


def scores_table(columns: dict) -> pa.Table:
    """scores.parquet: columns query_id, doc_id, chunk, score."""
    return table_of(SCORES_SCHEMA, columns)


def tokens_table(columns: dict) -> pa.Table:
    """tokens.parquet: columns query_id, rank, doc_id, chunk, tokens, token_ids, token_scores."""
    return table_of(TOKENS_SCHEMA, columns)


def candidates_table(columns: dict) -> pa.Table:
    """candidates.parquet: columns query_id, rank, doc_id, chunk, bm25."""
    return table_of(CANDIDATES_SCHEMA, columns)


def candidate_sequences_table(columns: dict) -> pa.Table:
    """candidate_sequences.parquet: columns fragment, doc_id, chunk, input_ids; per fragment in corpus order."""
    return table_of(CANDIDATE_SEQUENCES_SCHEMA, columns)


def read_candidate_keys(path: str | Path) -> set[tuple[str, int]]:
    """The (doc_id, chunk) keys of a candidates.parquet, pooled over its queries."""
    table = pq.read_table(path, columns=["doc_id", "chunk"])
    return set(zip(table["doc_id"].to_pylist(), table["chunk"].to_pylist()))


def write_table_atomically(table: pa.Table, path: str | Path) -> None:
    """Write to PATH.partial, then rename: a reader (or a resumed run) never sees half a file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    partial.replace(path)


def write_tables_atomically(tables: Iterable[pa.Table], schema: pa.Schema, path: str | Path) -> None:
    """As write_table_atomically, for one table that arrives in pieces (each in `schema`): written as they come
    with a ParquetWriter, small pieces joined into row groups of about ROWS_PER_GROUP rows, so at most that many
    rows are in memory at a time. No pieces: an empty table in `schema`."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with pq.ParquetWriter(partial, schema) as writer:
        waiting: list[pa.Table] = []
        rows = 0  # in `waiting`
        for table in tables:
            waiting.append(table)
            rows += table.num_rows
            if rows >= ROWS_PER_GROUP:
                writer.write_table(pa.concat_tables(waiting))
                waiting, rows = [], 0
        if waiting:
            writer.write_table(pa.concat_tables(waiting))
    partial.replace(path)


def read_row_groups(paths: Iterable[str | Path]) -> Iterator[pa.Table]:
    """The row groups of the Parquet files at `paths`, in order, one table each: a large file read a piece at a
    time (for write_tables_atomically). pa.ArrowInvalid or OSError for an unreadable file."""
    for path in paths:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group)


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Influence:
    """One row of topk.parquet, joined with its per-token scores (tokens.parquet) and title when present."""

    query_id: str
    rank: int
    doc_id: str
    chunk: int
    score: float
    layer_scores: np.ndarray  # (L,) in manifest layer order; sums to `score`
    title: str | None = None
    tokens: list[str] | None = None
    token_scores: np.ndarray | None = None  # (T,) sums to `score`
    predicted_change: float | None = None  # nats: score / N, N the Fisher's sequences (None: N unknown)

    def highlight_html(self, *, standalone: bool = True) -> str:
        """The sequence's text with tokens coloured by influence; '' when there are no per-token scores."""
        from whence.report.highlight import highlight_tokens_html

        if self.tokens is None or self.token_scores is None:
            return ""
        return highlight_tokens_html(self.tokens, self.token_scores, standalone=standalone)

    def _repr_html_(self) -> str:  # Jupyter renders an Influence as its header and highlighted text
        from whence.report.highlight import format_score

        name = html.escape(self.title or self.doc_id)
        header = (
            f"<div><b>#{self.rank}</b> {name} <code>{html.escape(self.doc_id)}</code> "
            f"chunk {self.chunk}, score {format_score(self.score)}{_change_note(self.predicted_change)}</div>"
        )
        return header + (self.highlight_html() or "<div><i>no per-token scores</i></div>")


def _change_note(change: float | None) -> str:
    return "" if change is None else f" (predicted change {change:+.3g} nats)"


@dataclass
class Results:
    """A loaded results directory. `top(query_id)` gives that query's influences, best first."""

    results_dir: Path
    manifest: dict[str, Any]
    layers: list[str]
    queries: list[Query]
    influences: dict[str, list[Influence]]  # query id -> rows sorted by rank
    all_scores: dict[str, np.ndarray] | None = None  # query id -> every saved score (scores.parquet)
    has_tokens: bool = False
    titles: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.manifest.get("method", "unknown"))

    @property
    def fisher_sequences(self) -> int | None:
        """N, the training sequences the Fisher was averaged over (each row's predicted_change is score / N);
        None when the manifest does not say."""
        count = self.manifest.get(FISHER_SEQUENCES)
        return int(count) if count else None

    def query(self, query_id: str) -> Query:
        for query in self.queries:
            if query.id == query_id:
                return query
        raise KeyError(f"no query {query_id!r} in {self.results_dir}")

    def top(self, query_id: str) -> list[Influence]:
        """The query's top-k influences, rank 1 (largest score) first."""
        if query_id not in self.influences:
            raise KeyError(f"no top-k rows for query {query_id!r} in {self.results_dir / TOPK_FILE}")
        return self.influences[query_id]

    def layer_matrix(self, query_id: str) -> np.ndarray:
        """(k, L) per-layer scores of the query's top-k sequences, rank-major."""
        rows = self.top(query_id)
        if not rows:
            return np.zeros((0, len(self.layers)))
        return np.stack([row.layer_scores for row in rows])

    def score_distribution(self, query_id: str) -> tuple[np.ndarray, str]:
        """The query's scores to study the distribution of, and where they come from.

        Every scored sequence when scores.parquet was saved, else only the top-k scores (a biased sample).
        """
        if self.all_scores is not None and query_id in self.all_scores:
            return self.all_scores[query_id], "all scored sequences"
        return np.array([row.score for row in self.influences.get(query_id, [])]), "top-k only"

    def highlight(self, query_id: str, rank: int) -> str:
        """HTML of the rank-th sequence's tokens coloured by influence, with its CSS (for IPython.display.HTML)."""
        for row in self.top(query_id):
            if row.rank == rank:
                if row.tokens is None:
                    raise WhenceError(
                        f"no per-token scores for query {query_id!r} rank {rank}: "
                        f"{self.results_dir / TOKENS_FILE} is missing (score with --per-token)"
                    )
                return row.highlight_html()
        raise KeyError(f"query {query_id!r} has no rank {rank}")


def load_results(results_dir: str | Path) -> Results:
    """Load manifest.json, topk.parquet and, when present, tokens/scores/documents.parquet.

    Raises WhenceError naming the file when a required file or column is missing.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise WhenceError(f"results directory {results_dir} does not exist (write it with `whence score`)")
    manifest = _read_manifest(results_dir / MANIFEST_FILE)
    layers = [str(name) for name in manifest.get("layers", [])]
    titles = _read_titles(results_dir / DOCUMENTS_FILE)
    tokens = _read_tokens(results_dir / TOKENS_FILE)
    influences = _read_influences(results_dir / TOPK_FILE, len(layers), titles, tokens,
                                  manifest.get(FISHER_SEQUENCES))
    if not layers and influences:  # an older manifest without layer names: number them
        width = next(iter(influences.values()))[0].layer_scores.shape[0]
        layers = [f"layer {i}" for i in range(width)]

    queries = [
        Query(id=str(q.get("id")), prompt=str(q.get("prompt", "")), completion=str(q.get("completion", "")))
        for q in manifest.get("queries", [])
    ]
    known = {query.id for query in queries}
    queries += [Query(id=query_id, prompt="", completion="") for query_id in influences if query_id not in known]
    return Results(results_dir=results_dir, manifest=manifest, layers=layers, queries=queries,
                   influences=influences, all_scores=_read_all_scores(results_dir / SCORES_FILE),
                   has_tokens=tokens is not None, titles=titles)


def read_table(results_dir: str | Path, name: str) -> pa.Table:
    """One Parquet file of a results directory (TOPK_FILE, SCORES_FILE, ...) with all its columns; WhenceError
    naming the file when it is missing or lacks a column the contract requires."""
    return _read_table(Path(results_dir) / name, READ_COLUMNS[name], required=True, every_column=True)


def _read_influences(path: Path, num_layers: int, titles: dict[str, str],
                     tokens: dict[tuple[str, int], tuple[list[str], np.ndarray]] | None,
                     fisher_sequences: int | None = None) -> dict[str, list[Influence]]:
    """topk.parquet's rows grouped by query, sorted by rank; num_layers 0 when the manifest names no layers.
    predicted_change from its column, or (older files) score / fisher_sequences when the manifest gives N."""
    topk = _read_table(path, TOPK_COLUMNS, required=True, every_column=True)
    influences: dict[str, list[Influence]] = {}
    columns = {name: topk.column(name).to_pylist() for name in TOPK_COLUMNS}
    if PREDICTED_CHANGE in topk.column_names:
        changes = topk.column(PREDICTED_CHANGE).to_pylist()
    else:
        changes = [score / int(fisher_sequences) if fisher_sequences else None for score in columns["score"]]
    for i in range(topk.num_rows):
        query_id, rank = str(columns["query_id"][i]), int(columns["rank"][i])
        layer_scores = np.asarray(columns["layer_scores"][i] or [], dtype=np.float64)
        if num_layers and layer_scores.shape[0] != num_layers:
            raise WhenceError(
                f"{path}: query {query_id!r} rank {rank} has {layer_scores.shape[0]} layer scores "
                f"but {MANIFEST_FILE} lists {num_layers} layers"
            )
        doc_id = str(columns["doc_id"][i])
        token_row = tokens.get((query_id, rank)) if tokens is not None else None
        influences.setdefault(query_id, []).append(Influence(
            query_id=query_id, rank=rank, doc_id=doc_id, chunk=int(columns["chunk"][i]),
            score=float(columns["score"][i]), layer_scores=layer_scores, title=titles.get(doc_id),
            tokens=token_row[0] if token_row else None, token_scores=token_row[1] if token_row else None,
            predicted_change=changes[i],
        ))
    for rows in influences.values():
        rows.sort(key=lambda row: row.rank)
    return influences


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WhenceError(f"{path} is missing: not a `whence score` results directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise WhenceError(f"{path} is not valid JSON: line {error.lineno}: {error.msg}") from error
    if not isinstance(manifest, dict):
        raise WhenceError(f"{path} must hold a JSON object")
    return manifest


def _read_table(path: Path, columns: Sequence[str], *, required: bool, every_column: bool = False
                ) -> pa.Table | None:
    if not path.is_file():
        if required:
            raise WhenceError(f"{path} is missing: `whence score` writes it; was the run finished?")
        return None
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise WhenceError(f"{path} is not a readable Parquet file: {error}") from error
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise WhenceError(f"{path} lacks column(s) {', '.join(missing)}")
    return pq.read_table(path, columns=None if every_column else list(columns))


def _read_titles(path: Path) -> dict[str, str]:
    table = _read_table(path, DOCUMENTS_COLUMNS, required=False)
    if table is None:
        return {}
    ids, titles = table.column("doc_id").to_pylist(), table.column("title").to_pylist()
    return {str(doc_id): str(title) for doc_id, title in zip(ids, titles) if title is not None}


def _read_tokens(path: Path) -> dict[tuple[str, int], tuple[list[str], np.ndarray]] | None:
    table = _read_table(path, TOKENS_COLUMNS, required=False)
    if table is None:
        return None
    rows: dict[tuple[str, int], tuple[list[str], np.ndarray]] = {}
    columns = {name: table.column(name).to_pylist() for name in TOKENS_COLUMNS}
    for i in range(table.num_rows):
        key = (str(columns["query_id"][i]), int(columns["rank"][i]))
        tokens = [str(token) for token in columns["tokens"][i] or []]
        scores = np.asarray(columns["token_scores"][i] or [], dtype=np.float64)
        if len(tokens) != scores.shape[0]:
            raise WhenceError(
                f"{path}: query {key[0]!r} rank {key[1]} has {len(tokens)} tokens but {scores.shape[0]} scores"
            )
        rows[key] = (tokens, scores)
    return rows


def _read_all_scores(path: Path) -> dict[str, np.ndarray] | None:
    """Group scores.parquet by query without a Python loop over its (possibly many million) rows."""
    table = _read_table(path, SCORES_COLUMNS, required=False)
    if table is None:
        return None
    encoded = table.column("query_id").combine_chunks().cast(pa.string()).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = [str(name) for name in encoded.dictionary.to_pylist()]
    scores = table.column("score").to_numpy().astype(np.float64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    return {name: scores[order[bounds[j] : bounds[j + 1]]] for j, name in enumerate(names)}
