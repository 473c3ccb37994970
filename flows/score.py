"""`whence score`: score corpus sequences against queries with Ray; write the top-k influences per query.

    prepare      a Ray task loads the model and factors, checks they belong together, and writes the
                 preconditioned, rank-r query gradients to RESULTS_DIR/queries.safetensors
    scan         bad rows, duplicates, sequences per fragment, TF-IDF document frequencies
    candidates   per query, the N sequences most similar by BM25 (skipped with --tfidf-candidates 0)
    score        Ray Data streams the (filtered) sequences through SequenceScorer actors; the driver keeps a
                 per-query top-k per corpus fragment and writes it to parts/ when the fragment is complete
    reduce       parts merged into topk.parquet (ties by doc id and chunk: independent of worker count)
    per-token    with --per-token, the top-k sequences are scored again token by token: tokens.parquet
Finished fragments survive an interruption; rerunning with the same arguments scores only the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from flows.cluster import surface_user_errors
from flows.options import add_model_and_corpus, positive_int, score_config_help
from whence.queries import METHODS

log = logging.getLogger("whence.score")

QUERIES_FILE = "queries.safetensors"
CANDIDATES_FILE = "candidates.parquet"
TOPK_FILE = "topk.parquet"
TOKENS_FILE = "tokens.parquet"
SCORES_FILE = "scores.parquet"
TFIDF_FEATURES = 2**20
LISSA_SEQUENCES = 256


def _top_k(text: str) -> int | None:
    return None if text == "all" else positive_int(text)


def _rank(text: str):
    return "full" if text == "full" else positive_int(text)


def _damping(text: str):
    return "heuristic" if text == "heuristic" else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_corpus(parser)
    parser.add_argument("--factors", required=True, metavar="DIR", help="factors directory written by `whence fit`")
    parser.add_argument("--queries", required=True, metavar="QUERIES.jsonl",
                        help='JSON lines {"id": ..., "prompt": ..., "completion": ...}')
    parser.add_argument("--top-k", type=_top_k, default=10, metavar="K|all", help=score_config_help("top_k"))
    parser.add_argument("--tfidf-candidates", type=int, default=10_000, metavar="N|0",
                        help=score_config_help("tfidf_candidates"))
    parser.add_argument("--query-rank", type=_rank, default=32, metavar="R|full", help=score_config_help("query_rank"))
    parser.add_argument("--damping", type=_damping, default="heuristic", metavar="heuristic|FLOAT",
                        help=score_config_help("damping"))
    parser.add_argument("--method", default="ekfac", choices=METHODS, help=score_config_help("method"))
    parser.add_argument("--per-token", action="store_true", help=score_config_help("per_token"))
    parser.add_argument("--save-all-scores", action="store_true",
                        help="also write every (query, sequence) score to scores.parquet")
    parser.add_argument("--seq-len", type=positive_int, default=None, help=score_config_help("seq_len"))


def run(args: argparse.Namespace) -> int:
    from whence.config import ScoreConfig

    config = ScoreConfig(top_k=args.top_k, tfidf_candidates=args.tfidf_candidates, query_rank=args.query_rank,
                         damping=args.damping, method=args.method, per_token=args.per_token, seq_len=args.seq_len,
                         batch_size=args.batch_size)
    summary = score_corpus(args.model, args.factors, args.queries, args.corpus, args.out, config,
                           save_all_scores=args.save_all_scores, workers=args.workers, shards=args.shards,
                           dtype=args.dtype, address=args.address, strict=args.strict, overwrite=args.overwrite,
                           id_field=args.id_field, text_field=args.text_field)
    print(f"scored {summary['sequences_scored']:,} sequences against {summary['queries']} queries "
          f"({summary['bad_rows']} bad rows skipped) in {summary['seconds']:.1f}s; results in {args.out}")
    return 0


@surface_user_errors
def score_corpus(model: str, factors_dir: str, queries_path: str, corpus: list[str], out: str, config,
                 save_all_scores: bool = False, workers: int = 1, shards: int = 1, dtype: str = "auto",
                 address: str | None = None, strict: bool = False, overwrite: bool = False, id_field: str = "id",
                 text_field: str = "text", actor_env: dict | None = None, candidates_from: str | None = None) -> dict:
    """Run the scoring pipeline; returns the summary also stored in RESULTS_DIR/manifest.json.

    candidates_from: another results directory of the same corpus and queries whose TF-IDF candidates to score
    (to compare methods on the same sequences without selecting them again)."""
    from actors.hosting import ModelSpec
    from flows.cluster import connect
    from flows.corpus_pipeline import FragmentPlan, ReadSettings, reduce_scans, run_scan
    from flows.run_state import RunDirectory
    from whence.corpus import list_fragments
    from whence.errors import FactorsMismatchError
    from whence.model import check_model_source
    from whence.text import load_queries

    check_model_source(model)  # before any Ray work: a clear error naming the path
    started = time.monotonic()
    queries = load_queries(queries_path)
    factors_manifest_path = Path(factors_dir) / "manifest.json"
    if not factors_manifest_path.exists():
        raise FactorsMismatchError(f"{factors_dir}: no manifest.json; is this a directory written by `whence fit`?")
    factors_manifest = json.loads(factors_manifest_path.read_text())
    fitted = factors_manifest.get("arguments", {})
    seq_len = config.seq_len or fitted.get("seq_len", 512)
    modules = fitted.get("modules", "mlp")
    arguments = {"model": model, "factors": str(factors_dir), "queries": str(queries_path), "corpus": list(corpus),
                 "save_all_scores": save_all_scores, "dtype": dtype, "id_field": id_field, "text_field": text_field,
                 "strict": strict, **config.to_dict(), "seq_len": seq_len, "candidates_from": candidates_from}
    state = RunDirectory(out, "score", arguments)
    if state.finished and not overwrite:
        log.info("%s already holds a finished run with these arguments; nothing to do", out)
        return state.saved_summary()
    if state.open(overwrite):
        log.info("resuming the run in %s", out)
    connect(address)
    spec = ModelSpec(model, modules, dtype)
    timings = {}

    if candidates_from and not (state.path / CANDIDATES_FILE).exists():
        shutil.copyfile(Path(candidates_from) / CANDIDATES_FILE, state.path / CANDIDATES_FILE)
    queries_file = state.path / QUERIES_FILE
    fragments = list_fragments(corpus)
    settings = ReadSettings(model, seq_len, id_field, text_field, strict)
    if not queries_file.exists():
        tick = time.monotonic()
        _prepare_remotely(spec, factors_dir, queries, config, queries_file, fragments, settings)
        timings["prepare_queries_s"] = time.monotonic() - tick
    tick = time.monotonic()
    tfidf = config.tfidf_candidates > 0
    # Document frequencies are needed only to select candidates, not when a candidate list is already there.
    need_frequencies = tfidf and not (state.path / CANDIDATES_FILE).exists()
    tally, skip, counts, frequencies = reduce_scans(
        run_scan(fragments, settings, TFIDF_FEATURES if need_frequencies else 0))
    timings["scan_s"] = time.monotonic() - tick
    log.info("corpus: %d fragments, %d documents, %d bad rows, %d sequences",
             len(fragments), tally.documents, tally.total_bad, sum(counts.values()))

    keys = None
    if tfidf:
        tick = time.monotonic()
        keys = _candidate_keys(state, fragments, settings, skip, frequencies, queries, config.tfidf_candidates)
        timings["tfidf_s"] = time.monotonic() - tick
    plan = FragmentPlan(skip_lines=skip, keys=keys)
    layer_names = _layer_names(queries_file)

    tick = time.monotonic()
    scored, steady = _score_fragments(state, spec, fragments, settings, plan, queries_file, config, workers, shards,
                                      [q.id for q in queries], len(layer_names), save_all_scores,
                                      expected=len(keys) if keys is not None else sum(counts.values()),
                                      actor_env=actor_env)
    timings["score_s"] = time.monotonic() - tick
    # After start-up: sequences that arrived after the first scored batch, and the seconds they took.
    timings["score_steady_sequences"], timings["score_steady_s"] = steady

    topk = _reduce_parts(state, [q.id for q in queries], config.top_k, len(layer_names))
    if save_all_scores:
        _concatenate_parts(state, "scores", SCORES_FILE)
    if config.per_token:
        tick = time.monotonic()
        _per_token(state, spec, fragments, settings, skip, queries_file, config, workers, topk)
        timings["per_token_s"] = time.monotonic() - tick

    from flows.provenance import versions

    summary = {"queries": len(queries), "sequences_scored": scored, "documents": tally.documents,
               "bad_rows": tally.total_bad, "corpus": tally.as_dict(), "fragments": len(fragments),
               "workers": workers, "shards": shards, "seconds": time.monotonic() - started, "timings": timings}
    state.write_json("manifest.json", {
        "command": "score", "arguments": arguments, "layers": layer_names, "method": config.method,
        "queries": [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in queries],
        "model": {"path": model, "fingerprint": factors_manifest.get("model_fingerprint")},
        "factors": {"path": str(factors_dir), "strategy": factors_manifest.get("strategy")},
        "summary": summary, "versions": versions(),
    })
    state.finish(summary)
    return summary


# ---------------------------------------------------------------------------------------------------------
# prepare


def _prepare_remotely(spec, factors_dir, queries, config, queries_file: Path, fragments, settings) -> None:
    """Query preparation runs where the model can live (a GPU worker on a cluster), not on the driver."""
    import ray

    from flows.cluster import cluster_gpus

    task = ray.remote(prepare_queries_task).options(num_gpus=1 if cluster_gpus() else 0, num_cpus=1, max_retries=1)
    ray.get(task.remote(spec, str(factors_dir), queries, config, str(queries_file), fragments, settings))


def prepare_queries_task(spec, factors_dir, queries, config, queries_file, fragments, settings) -> None:
    from actors.hosting import host_model
    from whence.factors import Factors
    from whence.model import model_fingerprint
    from whence.queries import prepare_queries

    model, tokenizer, layers = host_model(spec)
    factors = Factors.load(factors_dir)
    factors.check_compatible(model_fingerprint(model), [layer.describe() for layer in layers])
    if config.method == "lissa":
        from whence.lissa import lissa_prepare_queries

        prepared = lissa_prepare_queries(model, tokenizer, layers, factors, queries,
                                         _lissa_batches(tokenizer, fragments, settings, config.batch_size),
                                         config.query_rank, config.damping)
    else:
        prepared = prepare_queries(model, tokenizer, layers, factors, queries, config.query_rank, config.damping,
                                   config.method)
    prepared.save(queries_file)


def _lissa_batches(tokenizer, fragments, settings, batch_size: int) -> list[dict]:
    """The corpus's first LISSA_SEQUENCES sequences, collated: LiSSA's Fisher-vector products come from them."""
    from itertools import islice

    from flows.corpus_pipeline import fragment_sequences
    from whence.api import sequence_batches

    def sequences():
        for fragment in fragments:
            yield from fragment_sequences(fragment, settings)

    return [batch for _, batch in sequence_batches(tokenizer, islice(sequences(), LISSA_SEQUENCES), batch_size)]


def _layer_names(queries_file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(queries_file), framework="pt") as handle:
        return handle.metadata()["layers"].split("\x1f")


# ---------------------------------------------------------------------------------------------------------
# candidates


def _candidate_keys(state, fragments, settings, skip, frequencies, queries, num_candidates) -> set:
    import pyarrow as pa

    from flows.corpus_pipeline import run_candidates
    from flows.run_state import write_table_atomically
    from whence.tfidf import TermHasher

    path = state.path / CANDIDATES_FILE
    if path.exists():
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["doc_id", "chunk"])
        return set(zip(table["doc_id"].to_pylist(), table["chunk"].to_pylist()))
    query_terms = TermHasher(TFIDF_FEATURES).transform([f"{q.prompt} {q.completion}" for q in queries])
    selector = run_candidates(fragments, settings, skip, frequencies.idf(), query_terms, [q.id for q in queries],
                              num_candidates, TFIDF_FEATURES)
    rows = {"query_id": [], "rank": [], "doc_id": [], "chunk": [], "bm25": []}
    for q, query in enumerate(queries):
        for rank, (doc_id, chunk, score) in enumerate(selector.candidates(q), start=1):
            for name, value in zip(rows, (query.id, rank, doc_id, chunk, score)):
                rows[name].append(value)
    write_table_atomically(pa.table({"query_id": pa.array(rows["query_id"], pa.string()),
                                     "rank": pa.array(rows["rank"], pa.int64()),
                                     "doc_id": pa.array(rows["doc_id"], pa.string()),
                                     "chunk": pa.array(rows["chunk"], pa.int64()),
                                     "bm25": pa.array(rows["bm25"], pa.float64())}), path)
    keys = selector.all_keys()
    log.info("TF-IDF: %d candidate sequences for %d queries (up to %d each)", len(keys), len(queries), num_candidates)
    return keys


# ---------------------------------------------------------------------------------------------------------
# score


def scoring_dataset(spec, fragments, settings, plan, queries_file, config, workers, shards, per_token=False,
                    actor_env: dict | None = None):
    """The sequences of `fragments` streamed through an actor pool of scorers (actor_env: extra environment
    variables for the scoring actors, e.g. CUDA or fault-injection settings)."""
    import ray.data

    from actors.scorer import SequenceScorer
    from flows.cluster import actor_resources, gpu_share, torch_threads
    from flows.corpus_pipeline import sequences_dataset

    resources = actor_resources(workers)
    scorer_class, constructor = SequenceScorer, {"spec": spec, "queries_path": str(queries_file),
                                                  "per_token": per_token, "batch_size": config.batch_size,
                                                  "num_threads": torch_threads(resources.get("num_cpus", 1))}
    if shards > 1:
        from actors.shard import ShardedSequenceScorer, ShardOptions

        scorer_class = ShardedSequenceScorer
        options = ShardOptions(micro_batch_size=config.batch_size, stage_gpus=gpu_share(workers * shards))
        constructor = {"spec": spec, "queries_path": str(queries_file), "per_token": per_token, "shards": shards,
                       "batch_size": config.batch_size, "options": options}
        resources = {"num_cpus": 0.1}
    # batch_size=None: each block the reader made is one batch, so which sequences are scored together (and so
    # the floating-point result) does not depend on the number of workers or on scheduling. Ray Data refuses
    # None for actors that hold GPUs; there, batches of several scoring batches' rows, which may span blocks (the
    # rows carry their fragment, and GPU arithmetic is not bit-reproducible across batchings anyway).
    ray_batch = 4 * config.batch_size if resources.get("num_gpus") else None
    return sequences_dataset(fragments, settings, plan).map_batches(
        scorer_class,
        batch_size=ray_batch,
        fn_constructor_kwargs=constructor,
        # Ray Data's actor pools restart a dead actor and rerun its lost batches (max_restarts=-1 and
        # max_task_retries=-1 are its defaults in Ray 2.60), so a killed scorer costs time, not results.
        compute=ray.data.ActorPoolStrategy(size=workers),
        runtime_env={"env_vars": actor_env} if actor_env else None,
        **resources,
    )


def _score_fragments(state, spec, fragments, settings, plan, queries_file, config, workers, shards, query_ids,
                     num_layers, save_all_scores, expected: int, actor_env: dict | None = None
                     ) -> tuple[int, tuple[int, float]]:
    """Stream every pending fragment through the scorers; write each fragment's top-k when it completes.
    Returns the sequences scored in all (resumed parts included) and Progress.steady() of this run."""
    from flows.progress import Progress

    done = state.finished_parts("topk")
    pending = [f for f in fragments if f.index not in done]
    already = sum(_part_sequences(path) for path in done.values())
    if not pending:
        log.info("resuming: all %d fragments already scored", len(fragments))
        return already, (0, 0.0)
    if done:
        log.info("resuming: %d of %d fragments already scored", len(done), len(fragments))
    progress = Progress("scoring", max(expected - already, 0) or None)
    open_fragments: dict[int, FragmentResults] = {}
    dataset = scoring_dataset(spec, pending, settings, plan, queries_file, config, workers, shards,
                              actor_env=actor_env)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for fragment in np.unique(batch["fragment"]):
            rows = batch["fragment"] == fragment
            results = open_fragments.setdefault(int(fragment), FragmentResults(query_ids, config.top_k, num_layers,
                                                                               save_all_scores))
            scored = results.add({name: values[rows] for name, values in batch.items()})
            progress.advance(scored, int(batch["num_tokens"][rows].sum()))
            if results.complete:
                results.write(state, int(fragment))
                del open_fragments[int(fragment)]
    if open_fragments:
        raise RuntimeError(f"fragments {sorted(open_fragments)} did not complete; rerun to resume")
    progress.finish()
    return already + progress.done, progress.steady()


class FragmentResults:
    """One fragment's scores as they arrive: its per-query top-k, optionally every score."""

    def __init__(self, query_ids, k, num_layers, keep_all):
        from whence.topk import TopK

        self.topk = TopK.empty(query_ids, k, num_layers)
        self.query_ids = query_ids
        self.keep_all = keep_all
        self.all_rows: list[dict] = []
        self.received = 0
        self.expected: int | None = None

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.received == self.expected

    def add(self, batch: dict) -> int:
        markers = batch["marker_total"] >= 0
        if markers.any():
            self.expected = int(batch["marker_total"][markers][0])
        rows = ~markers
        count = int(rows.sum())
        if count:
            self.received += count
            self.topk.update(batch["doc_id"][rows], batch["chunk"][rows], batch["scores"][rows],
                             batch["layer_scores"][rows], batch["fragment"][rows])
            if self.keep_all:
                self.all_rows.append({"doc_id": batch["doc_id"][rows], "chunk": batch["chunk"][rows],
                                      "scores": batch["scores"][rows]})
        return count

    def write(self, state, fragment: int) -> None:

        from flows.run_state import write_table_atomically

        if self.keep_all:
            columns = {"query_id": [], "doc_id": [], "chunk": [], "score": []}
            for part in self.all_rows:
                for q, query_id in enumerate(self.query_ids):
                    columns["query_id"] += [query_id] * len(part["doc_id"])
                    columns["doc_id"] += [str(d) for d in part["doc_id"]]
                    columns["chunk"] += part["chunk"].tolist()
                    columns["score"] += part["scores"][:, q].tolist()
            write_table_atomically(_scores_table(columns), state.part_path("scores", fragment))
        table = topk_table(list(self.topk.rows()), fragment=fragment, sequences=self.received)
        # The top-k part last: its existence marks the fragment as finished.
        write_table_atomically(table, state.part_path("topk", fragment))


def _scores_table(columns: dict):
    import pyarrow as pa

    return pa.table({"query_id": pa.array(columns["query_id"], pa.string()),
                     "doc_id": pa.array(columns["doc_id"], pa.string()),
                     "chunk": pa.array(columns["chunk"], pa.int64()),
                     "score": pa.array(columns["score"], pa.float64())})


def topk_table(rows: list[dict], fragment: int | None = None, sequences: int | None = None):
    """The topk.parquet schema (DESIGN.md); parts also carry their fragment and its sequence count."""
    import pyarrow as pa

    columns = {
        "query_id": pa.array([r["query_id"] for r in rows], pa.string()),
        "rank": pa.array([r["rank"] for r in rows], pa.int64()),
        "doc_id": pa.array([r["doc_id"] for r in rows], pa.string()),
        "chunk": pa.array([r["chunk"] for r in rows], pa.int64()),
        "score": pa.array([r["score"] for r in rows], pa.float64()),
        "layer_scores": pa.array([r["layer_scores"] for r in rows], pa.list_(pa.float64())),
    }
    table = pa.table(columns)
    if fragment is not None:
        table = table.replace_schema_metadata({"fragment": str(fragment), "sequences": str(sequences)})
    return table


def _part_sequences(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_schema(path).metadata[b"sequences"])


def _reduce_parts(state, query_ids, k, num_layers):
    """Merge every fragment's top-k into topk.parquet; returns the merged TopK."""
    import pyarrow.parquet as pq

    from flows.run_state import write_table_atomically
    from whence.topk import TopK

    merged = TopK.empty(query_ids, k, num_layers)
    for fragment, path in state.finished_parts("topk").items():
        table = pq.read_table(path).to_pydict()
        part = TopK.empty(query_ids, k, num_layers)
        for q, query_id in enumerate(query_ids):
            rows = [i for i, qid in enumerate(table["query_id"]) if qid == query_id]
            part.entries[q] = {
                "doc_id": np.asarray([table["doc_id"][i] for i in rows], dtype=object),
                "chunk": np.asarray([table["chunk"][i] for i in rows], dtype=np.int64),
                "score": np.asarray([table["score"][i] for i in rows], dtype=np.float64),
                "layer_scores": np.asarray([table["layer_scores"][i] for i in rows], dtype=np.float64
                                           ).reshape(len(rows), num_layers),
                "fragment": np.full(len(rows), fragment, dtype=np.int64),
            }
        merged.merge(part)
    write_table_atomically(topk_table(list(merged.rows())), state.path / TOPK_FILE)
    return merged


def _concatenate_parts(state, kind: str, name: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.run_state import write_table_atomically

    tables = [pq.read_table(path) for path in state.finished_parts(kind).values()]
    write_table_atomically(pa.concat_tables(tables) if tables else _scores_table(
        {"query_id": [], "doc_id": [], "chunk": [], "score": []}), state.path / name)


# ---------------------------------------------------------------------------------------------------------
# per-token


def _per_token(state, spec, fragments, settings, skip, queries_file, config, workers, topk) -> None:
    """Score the top-k sequences again, token by token, and write tokens.parquet."""
    import pyarrow as pa

    from flows.corpus_pipeline import FragmentPlan, load_tokenizer
    from flows.run_state import write_table_atomically

    wanted = {}
    for q, entry in enumerate(topk.entries):
        for rank, (doc_id, chunk) in enumerate(zip(entry["doc_id"], entry["chunk"]), start=1):
            wanted.setdefault((str(doc_id), int(chunk)), []).append((q, rank))
    involved = {int(f) for entry in topk.entries for f in entry["fragment"]}
    plan = FragmentPlan(skip_lines=skip, keys=set(wanted))
    dataset = scoring_dataset(spec, [f for f in fragments if f.index in involved], settings, plan, queries_file,
                              config, workers, 1, per_token=True)
    tokenizer = load_tokenizer(settings.tokenizer_path)
    rows = {"query_id": [], "rank": [], "doc_id": [], "chunk": [], "tokens": [], "token_ids": [], "token_scores": []}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i in np.flatnonzero(batch["marker_total"] < 0):
            key = (str(batch["doc_id"][i]), int(batch["chunk"][i]))
            ids = [int(t) for t in batch["input_ids"][i]]
            pieces = [tokenizer.decode([t]) for t in ids]
            for q, rank in wanted.get(key, []):
                for name, value in zip(rows, (topk.query_ids[q], rank, key[0], key[1], pieces, ids,
                                              batch["token_scores"][i][q].tolist())):
                    rows[name].append(value)
    order = sorted(range(len(rows["rank"])), key=lambda i: (topk.query_ids.index(rows["query_id"][i]), rows["rank"][i]))
    table = pa.table({
        "query_id": pa.array([rows["query_id"][i] for i in order], pa.string()),
        "rank": pa.array([rows["rank"][i] for i in order], pa.int64()),
        "doc_id": pa.array([rows["doc_id"][i] for i in order], pa.string()),
        "chunk": pa.array([rows["chunk"][i] for i in order], pa.int64()),
        "tokens": pa.array([rows["tokens"][i] for i in order], pa.list_(pa.string())),
        "token_ids": pa.array([rows["token_ids"][i] for i in order], pa.list_(pa.int64())),
        "token_scores": pa.array([rows["token_scores"][i] for i in order], pa.list_(pa.float64())),
    })
    write_table_atomically(table, state.path / TOKENS_FILE)
