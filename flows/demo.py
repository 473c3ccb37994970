"""`whence demo`: the main job on the bundled corpus, end to end.

    0. scan the corpus once (bad rows, duplicates, sequences, TF-IDF document frequencies) into flows.scan_cache
    1. fit EK-FAC factors of the bundled model on the bundled corpus (a deterministic subset of sequences)
    2. TF-IDF filtering and EK-FAC scoring of the bundled queries, with per-token scores; the same pass scores the
       candidates by the gradient dot product too (`--baseline identity`: results/baselines/identity/)
    3. report.html, the top 3 documents per query in the terminal, and for the verbatim quotations whether the
       quoted document is in the top 10 by EK-FAC, by TF-IDF alone and by the gradient dot product
Every stage is a resumable run directory under --out, so a second run reuses what the first one made. The
bundled corpus is flows/demo_assets/corpus/, eight gzipped JSON-lines shards (a gzip file is one fragment, so
shards let the corpus passes use every core); the printed summary and demo_summary.json give each stage's
seconds (STAGES).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import time
from pathlib import Path

from flows.options import positive_int

log = logging.getLogger("whence.demo")

ASSETS = Path(__file__).resolve().parent / "demo_assets"
TOP_N_CHECK = 10
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
# The stages whose seconds the summary reports, in order; "fit" is a whole command, the others the parts of the
# EK-FAC scoring run (its manifest's timings, TIMING_OF; its score stage scores the identity baseline too).
STAGES = ("fit", "prepare", "scan", "candidates", "gather", "score", "per-token", "report")
TIMING_OF = {"prepare": "prepare_queries_s", "scan": "scan_s", "candidates": "tfidf_s", "gather": "gather_s",
             "score": "score_s", "per-token": "per_token_s"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="whence-demo", metavar="DIR", help="where the demo writes (default: %(default)s)")
    parser.add_argument("--model", default=str(ASSETS / "model"), help="model directory (default: the bundled one)")
    parser.add_argument("--corpus", default=str(ASSETS / "corpus"), help="corpus (default: the bundled one)")
    parser.add_argument("--queries", default=str(ASSETS / "queries.jsonl"), help="queries (default: the bundled ones)")
    parser.add_argument("--docs", type=positive_int, default=None,
                        help="use only the first N documents (plus the quoted ones): a quick look")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per training sequence")
    # 1,000 sequences (128 k tokens for covariances of at most 512 x 512): the demo's top 10 agree 9 or 10 in 10
    # with a fit on 2,500 and every top 1 is the same, at 40% of the fitting time (README).
    parser.add_argument("--fit-sequences", type=positive_int, default=1000,
                        help="sequences the factors are fitted on (the corpus's first, in order)")
    parser.add_argument("--candidates", type=positive_int, default=300, help="TF-IDF candidates per query")
    parser.add_argument("--top-k", type=positive_int, default=10, help="influential sequences kept per query")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per batch")
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS,
                        help="fitting and scoring actors (default: %(default)s, one per core up to two: one actor "
                             "fits on one thread, so a second core would otherwise idle)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float64", "bfloat16"])
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a new local one)")
    parser.add_argument("--overwrite", action="store_true", help="redo every stage")


def run(args: argparse.Namespace) -> int:
    from flows.cluster import ClusterSettings
    from flows.fit import fit_corpus
    from flows.score import score_corpus
    from whence.config import FitConfig, ScoreConfig
    from whence.report import write_report

    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    queries = [json.loads(line) for line in open(args.queries, encoding="utf-8") if line.strip()]
    corpus = args.corpus if args.docs is None else str(corpus_slice(args.corpus, args.docs, queries, out))
    cluster = ClusterSettings(workers=args.workers, dtype=args.dtype, address=args.address)

    seconds: dict[str, float | None] = {}
    tick = time.monotonic()
    scan_once(args.model, corpus, args.seq_len, cluster)
    scanned = time.monotonic() - tick
    tick = time.monotonic()
    log.info("1/3 fitting EK-FAC factors on up to %d sequences", args.fit_sequences)
    fit_corpus(args.model, [corpus], str(out / "factors"),
               FitConfig(seq_len=args.seq_len, max_sequences=args.fit_sequences, batch_size=args.batch_size),
               cluster, overwrite=args.overwrite)
    seconds["fit"] = time.monotonic() - tick
    log.info("2/3 TF-IDF filtering and scoring of %d queries by EK-FAC and by the gradient dot product", len(queries))
    config = ScoreConfig(tfidf_candidates=args.candidates, top_k=args.top_k, batch_size=args.batch_size,
                         per_token=True, save_all_scores=True, baselines=["identity"])
    summary = score_corpus(args.model, str(out / "factors"), args.queries, [corpus], str(out / "results"), config,
                           cluster, overwrite=args.overwrite)
    seconds.update({stage: summary.get("timings", {}).get(key) for stage, key in TIMING_OF.items()})
    seconds["scan"] = scanned + (seconds["scan"] or 0.0)
    log.info("3/3 report")
    tick = time.monotonic()
    report = write_report(out / "results")
    comparison = compare_methods(out, queries)
    seconds["report"] = time.monotonic() - tick
    total = time.monotonic() - started
    (out / "demo_summary.json").write_text(json.dumps({"verbatim": comparison, "seconds": total,
                                                       "stage_seconds": seconds, "report": str(report)}, indent=2))
    print_summary(out, queries, comparison, report, total)
    print_stages(seconds)
    return 0


def scan_once(model: str, corpus: str, seq_len: int, cluster) -> None:
    """The corpus scan, with TF-IDF document frequencies, once into flows.scan_cache: the fit, the EK-FAC scoring
    run and the identity baseline then all reuse it instead of reading the corpus for the same facts again."""
    from flows.cluster import connect
    from flows.corpus_pipeline import ReadSettings
    from flows.scan_cache import cache_dir, cached_scan
    from whence.corpus import CorpusSource, list_fragments
    from whence.tfidf import DEFAULT_FEATURES

    if cache_dir() is None:  # no cache (WHENCE_CACHE=off): each run scans for itself
        return
    connect(cluster.address)
    source = CorpusSource((corpus,))
    log.info("0/3 scanning the corpus once (bad rows, duplicates, sequences, TF-IDF document frequencies)")
    cached_scan(list_fragments(source.paths), ReadSettings.for_corpus(model, seq_len, source), DEFAULT_FEATURES)


def print_stages(seconds: dict[str, float | None]) -> None:
    """One line per stage (STAGES) with its seconds; '-' for a stage this run did not time."""
    print("seconds per stage:")
    for stage in STAGES:
        value = seconds.get(stage)
        print(f"   {stage:<18} {'-' if value is None else f'{value:7.1f}'}")


def corpus_files(corpus: str) -> list[Path]:
    """The corpus files `corpus` names, in corpus order: itself, or the .jsonl(.gz) files under it, sorted."""
    path = Path(corpus)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))


def corpus_slice(corpus: str, docs: int, queries: list[dict], out: Path) -> Path:
    """The first `docs` documents plus every document a query quotes, as a small corpus file."""
    wanted = {q["source"] for q in queries if q.get("source")}
    path = out / f"corpus-first-{docs}.jsonl.gz"
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    index = 0
    with gzip.open(partial, "wt", encoding="utf-8") as sink:
        for file in corpus_files(corpus):
            opener = gzip.open if file.name.endswith(".gz") else open
            with opener(file, "rt", encoding="utf-8") as source:
                for line in source:
                    if not line.strip():
                        continue
                    if index < docs or json.loads(line).get("id") in wanted:
                        sink.write(line if line.endswith("\n") else line + "\n")
                    index += 1
    partial.replace(path)
    return path


def identity_results(out: Path) -> Path:
    """The results directory of the gradient-dot-product baseline scored in the EK-FAC run's pass."""
    from whence.results import BASELINES_DIR

    return out / "results" / BASELINES_DIR / "identity"


def source_rank(table_path: Path, query_id: str, source: str) -> tuple[int | None, float | None]:
    """(rank, score) of the best sequence of document `source` for the query, or (None, None) if absent.
    Works on topk.parquet (column score) and candidates.parquet (column bm25)."""
    import pyarrow.parquet as pq

    table = pq.read_table(table_path).to_pandas()
    rows = table[(table.query_id == query_id) & (table.doc_id == source)].sort_values("rank")
    if rows.empty:
        return None, None
    score = rows.iloc[0]["score"] if "score" in rows else rows.iloc[0]["bm25"]
    return int(rows.iloc[0]["rank"]), float(score)


def compare_methods(out: Path, queries: list[dict]) -> list[dict]:
    """For each quotation: the rank of the quoted document's best sequence by EK-FAC, by TF-IDF alone and by
    the gradient dot product, and for a word-order-flipped quotation, its EK-FAC score relative to the
    original's (the paper found that flipping the word order removes most of the influence)."""
    rows, by_id = [], {q["id"]: q for q in queries}
    for query in queries:
        if query.get("kind") not in ("verbatim", "flipped"):
            continue
        source = query["source"]
        ekfac_rank, ekfac_score = source_rank(out / "results" / "topk.parquet", query["id"], source)
        row = {"query": query["id"], "kind": query["kind"], "source": source,
               "ekfac_rank": ekfac_rank,
               "tfidf_rank": source_rank(out / "results" / "candidates.parquet", query["id"], source)[0],
               "identity_rank": source_rank(identity_results(out) / "topk.parquet", query["id"], source)[0]}
        original = by_id.get(query.get("flipped_from", ""))
        if original is not None and ekfac_score is not None:
            _, original_score = source_rank(out / "results" / "topk.parquet", original["id"], source)
            if original_score:
                row["score_vs_original"] = ekfac_score / original_score
        rows.append(row)
    return rows


def print_summary(out: Path, queries: list[dict], comparison: list[dict], report: Path, seconds: float) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(out / "results" / "topk.parquet").to_pandas()
    print()
    for query in queries:
        print(f"{query['id']}: {query['prompt'][-60:]!r} -> {query['completion'][:50]!r}")
        for row in table[table.query_id == query["id"]].sort_values("rank").head(3).itertuples():
            print(f"   {row.rank}. {row.score:+.3e}  {row.doc_id} (chunk {row.chunk})")
    print(f"\nrank of the quoted document's best sequence ('-': not in the top {TOP_N_CHECK}):")
    print(f"   {'query':<20} {'EK-FAC':>7} {'TF-IDF':>7} {'grad dot':>9}")
    for row in comparison:
        ranks = [row[m] if row[m] is not None and row[m] <= TOP_N_CHECK else "-"
                 for m in ("ekfac_rank", "tfidf_rank", "identity_rank")]
        note = f"   score {row['score_vs_original']:.2f} x the original's" if "score_vs_original" in row else ""
        print(f"   {row['query']:<20} {ranks[0]:>7} {ranks[1]:>7} {ranks[2]:>9}{note}")
    print(f"\nreport: {report}\n(done in {seconds:.0f}s; a second run reuses {out})")

