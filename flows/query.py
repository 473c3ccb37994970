"""`whence query`: answer queries from an index (`whence index`) by matrix products; write the RESULTS_DIR files
of `whence score` (topk.parquet, manifest.json, tokens.parquet with --per-token), so `whence report` works.

    prepare     the model and factors the index records are loaded once, in this process (checked against the
                index's fingerprints); the queries' gradients are projected and preconditioned (whence.index)
    candidates  with --tfidf-candidates N, the pooled BM25 candidates as `whence score` selects them (Ray)
    score       every shard against the query rows: in process, or one Ray task per shard with --workers > 1;
                the per-query top-k of the shards merged (ties by doc id and chunk: independent of workers)
    rescore     with --rescore N, every query's top N by the index (pooled) are run through the model again and
                scored exactly, with the full (rank --query-rank) preconditioned queries, and ranked by that:
                the index shortlists, the model ranks (flows.query_model)
    per-token   with --per-token, the top-k sequences are scored token by token the same way: tokens.parquet.
                Those scores sum to the full EK-FAC score: topk.parquet's with --rescore, else the index's
                score is an estimate of it.
A finished run with the same arguments is not redone; other arguments are refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

from flows.cluster import ClusterSettings, surface_user_errors
from flows.options import positive_int
from whence.config import ScoreConfig, help_for
from whence.errors import SettingsError
from whence.index.search import SEARCH_MODES, check_search_mode
from whence.queries import METHODS
from whence.redact import redact_uri
from whence.settings import setting

log = logging.getLogger("whence.query")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flows.score import _top_k

    parser.add_argument("--index", required=True, metavar="INDEX_DIR", help="index directory written by `whence index`")
    parser.add_argument("--queries", required=True, metavar="QUERIES.jsonl",
                        help='JSON lines {"id": ..., "prompt": ..., "completion": ...}')
    parser.add_argument("--out", required=True, metavar="RESULTS_DIR", help="results directory (as `whence score`)")
    parser.add_argument("--top-k", type=_top_k, default=10, metavar="K|all", help=help_for(ScoreConfig, "top_k"))
    parser.add_argument("--method", default="ekfac", choices=METHODS,
                        help="preconditioner: ekfac, kfac, identity (any index); diagonal (random and lowrank indexes)")
    parser.add_argument("--damping", default="heuristic", metavar="heuristic|FLOAT", help=help_for(ScoreConfig, "damping"))
    parser.add_argument("--tfidf-candidates", type=int, default=0, metavar="N|0",
                        help=help_for(ScoreConfig, "tfidf_candidates") + " (default here: 0)")
    parser.add_argument("--per-token", action="store_true", help=help_for(ScoreConfig, "per_token"))
    parser.add_argument("--rescore", type=int, default=0, metavar="N",
                        help=help_for(QuerySettings, "rescore"))
    parser.add_argument("--search-dtype", default="auto", choices=SEARCH_MODES,
                        help=help_for(QuerySettings, "search_dtype"))
    parser.add_argument("--query-rank", default=32, metavar="R|full",
                        help="rank of each preconditioned query (SVD), as `whence score` takes: a lowrank index's search "
                             "meets the rank-R factors (faster than the whole matrix for a few queries at a time), "
                             "--rescore and --per-token score with them; full: the whole matrix")
    parser.add_argument("--workers", type=positive_int, default=1, help="score shards in this many Ray tasks at once")
    parser.add_argument("--model", default=None, metavar="DIR_OR_ID",
                        help="the index's model, if moved (its fingerprint must match the index's)")
    parser.add_argument("--factors", default=None, metavar="DIR",
                        help="the index's factors, if moved (their fingerprint must match the index's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float64", "bfloat16"],
                        help="model precision for preparing the queries: auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--address", default=None, metavar="RAY_ADDRESS", help="Ray cluster to join")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output directory that holds a run with other arguments")


def run(args: argparse.Namespace) -> int:
    from flows.options import settings_from_args

    config = settings_from_args(ScoreConfig, args)
    cluster = ClusterSettings(workers=args.workers, dtype=args.dtype, address=args.address)
    summary = query_index(args.index, args.queries, args.out, config, cluster, args.overwrite,
                          QuerySettings(args.model, args.factors, args.rescore, args.search_dtype))
    print(f"scored {summary['sequences_scored']:,} indexed sequences against {summary['queries']} queries in "
          f"{summary['search_s']:.2f}s ({summary['seconds']:.1f}s in all); results in {args.out}")
    return 0


@dataclass(frozen=True)
class QuerySettings:
    """What `whence query` takes beyond whence.config.ScoreConfig."""

    model: str | None = setting("the model to load instead of the path the index records (its fingerprint must "
                                "match the index's)", None)
    factors: str | None = setting("the factors directory to load instead of the one the index records (its "
                                  "fingerprint must match the index's)", None)
    rescore: int = setting("0: rank by the index's scores. N: score the pooled top N of every query exactly with "
                           "the model (full EK-FAC, --query-rank), and rank those", 0)
    search_dtype: str = setting("dtype of the search's products: auto = bfloat16 where the device has it in hardware (GPUs, "
                                "CPUs with AVX512-BF16 or AMX; several times faster, scores within about 0.5%), else "
                                "float32 (float64 for a float64 model); float32 for the stored rows' exact score",
                                "auto")

    def __post_init__(self):
        if self.rescore < 0:
            raise SettingsError(f"rescore must be >= 0, got {self.rescore}", "rescore")
        check_search_mode(self.search_dtype)


@surface_user_errors
def query_index(index_dir: str, queries_path: str, out: str, config: ScoreConfig = ScoreConfig(tfidf_candidates=0),  # noqa: B008
                cluster: ClusterSettings = ClusterSettings(), overwrite: bool = False,  # noqa: B008
                inputs: QuerySettings = QuerySettings()) -> dict:  # noqa: B008
    """Score the queries against the index; returns the summary also stored in RESULTS_DIR/manifest.json."""
    from flows.run_state import RunDirectory
    from whence.fingerprints import queries_fingerprint
    from whence.index.search import Index, load_index_manifest
    from whence.text import load_queries

    started, timings = time.monotonic(), {}
    queries = load_queries(queries_path)
    manifest, manifest_sha256 = load_index_manifest(index_dir)
    arguments = {"index": redact_uri(str(index_dir)), "queries": str(queries_path), "top_k": config.top_k,
                 "method": config.method, "damping": config.damping, "tfidf_candidates": config.tfidf_candidates,
                 "per_token": config.per_token, "query_rank": config.query_rank, "dtype": cluster.dtype,
                 "rescore": inputs.rescore, "search_dtype": inputs.search_dtype,
                 "model": inputs.model or manifest["model"]["path"],
                 "factors": redact_uri(str(inputs.factors or manifest["factors"]["path"])),
                 "queries_sha256": queries_fingerprint(queries),
                 "index_sha256": manifest_sha256}
    state = RunDirectory(out, "query", arguments)
    if state.reuse_or_open(overwrite):
        return state.saved_summary()
    tick = time.monotonic()
    index = Index.open(index_dir, inputs.model, inputs.factors, dtype=cluster.dtype, manifest=manifest)
    prepared = index.prepare(queries, config.method, config.damping, config.query_rank)
    timings["prepare_s"] = time.monotonic() - tick
    needs_model = config.per_token or inputs.rescore
    corpus = IndexedCorpus.of(manifest) if config.tfidf_candidates or needs_model else None
    keys = _candidate_keys(state, corpus, queries, config, cluster) if config.tfidf_candidates else None
    tick = time.monotonic()
    shortlist = None if config.top_k is None or not inputs.rescore else max(inputs.rescore, config.top_k)
    topk, scored = _search(index, [q.id for q in queries], prepared, shortlist if inputs.rescore else config.top_k,
                           keys, cluster, inputs.search_dtype, config.query_rank)
    timings["search_s"] = time.monotonic() - tick
    if needs_model:
        from flows.query_model import ModelScorer

        tick = time.monotonic()
        model_scorer = ModelScorer(index, corpus, queries, config)
        if inputs.rescore:
            topk = model_scorer.rescore(topk, config.top_k)
            timings["rescore_s"] = time.monotonic() - tick
    _write_topk(state, topk, manifest)
    if config.per_token:
        tick = time.monotonic()
        model_scorer.per_token(state, queries, topk)
        timings["per_token_s"] = time.monotonic() - tick
    summary = {"queries": len(queries), "sequences_scored": scored, "workers": cluster.workers,
               "search_s": timings["search_s"], "seconds": time.monotonic() - started, "timings": timings}
    state.write_json("manifest.json", _manifest(state, manifest, index, queries, config, summary))
    state.finish(summary)
    return summary


@dataclass(frozen=True)
class IndexedCorpus:
    """The corpus an index was built from, read as its build read it (for candidates and per-token scores)."""

    fragments: list  # whence.corpus.Fragment, corpus order
    settings: object  # flows.corpus_pipeline.ReadSettings

    @classmethod
    def of(cls, manifest: dict) -> IndexedCorpus:
        """The index's corpus; a RunStateError when its files changed since the index was built."""
        from flows.corpus_pipeline import ReadSettings
        from whence.corpus import CorpusSource, list_fragments
        from whence.errors import RunStateError
        from whence.fingerprints import corpus_fingerprint

        arguments = manifest["arguments"]
        corpus = CorpusSource(arguments["corpus"], arguments["id_field"], arguments["text_field"], arguments["strict"])
        fragments = list_fragments(list(corpus.paths))
        if corpus_fingerprint([f.path for f in fragments]) != arguments["corpus_fingerprint"]:
            raise RunStateError(f"the corpus {', '.join(corpus.paths)} changed since the index was built; "
                                "rebuild it (`whence index --overwrite`) before --tfidf-candidates or --per-token")
        return cls(fragments, ReadSettings.for_corpus(arguments["model"], int(arguments["seq_len"]), corpus))

    def scan(self, tfidf_features: int = 0):
        """(per-fragment scans, duplicate lines per fragment, document frequencies) as `whence score` scans
        the corpus (flows.scan_cache: cached by the index build)."""
        from flows.corpus_pipeline import reduce_scans
        from flows.scan_cache import cached_scan

        scans, _ = cached_scan(self.fragments, self.settings, tfidf_features)
        _, skip, _, frequencies = reduce_scans(scans)
        return scans, skip, frequencies


@dataclass(frozen=True)
class _CandidateRun:
    """What flows.candidates reads of a scoring run (it writes candidates.parquet to state)."""

    state: object
    queries: list
    config: ScoreConfig
    fragments: list
    settings: object

    @property
    def query_ids(self) -> list[str]:
        return [query.id for query in self.queries]


def _candidate_keys(state, corpus: IndexedCorpus, queries, config: ScoreConfig, cluster: ClusterSettings):
    """The pooled TF-IDF candidates (doc_id, chunk), selected exactly as `whence score` selects them."""
    from flows.candidates import candidate_keys
    from flows.cluster import connect
    from whence.tfidf import DEFAULT_FEATURES

    connect(cluster.address)
    scans, skip, frequencies = corpus.scan(DEFAULT_FEATURES)
    return candidate_keys(_CandidateRun(state, queries, config, corpus.fragments, corpus.settings), scans, skip,
                          frequencies)


def _search(index, query_ids: list[str], prepared, top_k: int | None, keys, cluster: ClusterSettings,
            compute: str = "auto", query_rank: int | str = "full"):
    """(merged TopK, sequences scored): in process, or one Ray task per shard part with more than one worker, of
    query rows prepared at `query_rank` (Index.prepare)."""
    from whence.topk import TopK

    scored = len(keys) if keys is not None else sum(part.sequences for part in index.parts)
    if cluster.workers <= 1:
        return index.search(query_ids, prepared, top_k, keys, compute, query_rank), scored
    import ray

    from flows.cluster import cluster_gpus, connect, gpu_share
    from whence.index.search import score_shard_file

    connect(cluster.address)
    # Each search task reserves a share of the GPUs when the cluster has them, and scores its shard there.
    gpus = {"num_gpus": gpu_share(cluster.workers)} if cluster_gpus() >= 1 else {}
    task = ray.remote(score_shard_file).options(num_cpus=1, max_retries=2, **gpus)
    rows, key_ref = ray.put(prepared.numpy()), ray.put(keys)
    layout = index.projections.layout(query_rank)
    pending = [task.remote(part.path, rows, layout, query_ids, top_k, key_ref, compute)
               for part in index.parts]
    merged = TopK.empty(query_ids, top_k, len(index.layer_names))
    # At most `workers` parts in flight: each task reads one part into memory.
    while pending:
        running, pending = pending[: cluster.workers], pending[cluster.workers :]
        for part in ray.get(running):
            merged.merge(part)
    return merged, scored


def _write_topk(state, topk, manifest: dict) -> None:
    from whence.results import TOPK_FILE, topk_table, write_table_atomically

    write_table_atomically(topk_table(topk, fisher_sequences=manifest.get("fisher_sequences")),
                           state.path / TOPK_FILE)


def _manifest(state, index_manifest: dict, index, queries, config: ScoreConfig, summary: dict) -> dict:
    from flows.provenance import versions
    from whence.results import FISHER_SEQUENCES

    return {
        "command": "query", "arguments": state.arguments, "layers": index.layer_names, "method": config.method,
        "queries": [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in queries],
        "model": index_manifest["model"], "factors": index_manifest["factors"],
        "index": {"path": state.arguments["index"], "projection": index_manifest["projection"],
                  "dtype": index_manifest["dtype"], "width": index_manifest["width"]},
        FISHER_SEQUENCES: index_manifest.get(FISHER_SEQUENCES), "summary": summary, "versions": versions(),
    }


