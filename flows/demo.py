"""`whence demo`: the main job on the bundled corpus, end to end.

    1. fit EK-FAC factors of the bundled model on the bundled corpus (a deterministic subset of sequences)
    2. TF-IDF filtering and EK-FAC scoring of the bundled queries, with per-token scores
    3. the same candidates scored by the gradient dot product (identity), for comparison
    4. report.html, the top 3 documents per query in the terminal, and for the verbatim quotations whether the
       quoted document is in the top 10 by EK-FAC, by TF-IDF alone and by the gradient dot product
Every stage is a resumable run directory under --out, so a second run reuses what the first one made.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from pathlib import Path

from flows.options import positive_int

log = logging.getLogger("whence.demo")

ASSETS = Path(__file__).resolve().parent / "demo_assets"
TOP_N_CHECK = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="whence-demo", metavar="DIR", help="where the demo writes (default: %(default)s)")
    parser.add_argument("--model", default=str(ASSETS / "model"), help="model directory (default: the bundled one)")
    parser.add_argument("--corpus", default=str(ASSETS / "corpus.jsonl.gz"), help="corpus (default: the bundled one)")
    parser.add_argument("--queries", default=str(ASSETS / "queries.jsonl"), help="queries (default: the bundled ones)")
    parser.add_argument("--docs", type=positive_int, default=None,
                        help="use only the first N documents (plus the quoted ones): a quick look")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per training sequence")
    parser.add_argument("--fit-sequences", type=positive_int, default=2500,
                        help="sequences the factors are fitted on (the corpus's first, in order)")
    parser.add_argument("--candidates", type=positive_int, default=300, help="TF-IDF candidates per query")
    parser.add_argument("--top-k", type=positive_int, default=10, help="influential sequences kept per query")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per batch")
    parser.add_argument("--workers", type=positive_int, default=1, help="scoring workers")
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

    log.info("1/4 fitting EK-FAC factors on up to %d sequences", args.fit_sequences)
    fit_corpus(args.model, [corpus], str(out / "factors"),
               FitConfig(seq_len=args.seq_len, max_sequences=args.fit_sequences, batch_size=args.batch_size),
               cluster, overwrite=args.overwrite)
    log.info("2/4 TF-IDF filtering and EK-FAC scoring of %d queries", len(queries))
    common = dict(tfidf_candidates=args.candidates, top_k=args.top_k, batch_size=args.batch_size)
    score_corpus(args.model, str(out / "factors"), args.queries, [corpus], str(out / "results"),
                 ScoreConfig(per_token=True, save_all_scores=True, **common), cluster, overwrite=args.overwrite)
    log.info("3/4 the same candidates by the gradient dot product (identity)")
    score_corpus(args.model, str(out / "factors"), args.queries, [corpus], str(out / "results-identity"),
                 ScoreConfig(method="identity", **common), cluster, overwrite=args.overwrite,
                 candidates_from=str(out / "results"))
    log.info("4/4 report")
    report = write_report(out / "results")
    comparison = compare_methods(out, queries)
    (out / "demo_summary.json").write_text(json.dumps({"verbatim": comparison, "seconds": time.monotonic() - started,
                                                       "report": str(report)}, indent=2))
    print_summary(out, queries, comparison, report, time.monotonic() - started)
    return 0


def corpus_slice(corpus: str, docs: int, queries: list[dict], out: Path) -> Path:
    """The first `docs` documents plus every document a query quotes, as a small corpus file."""
    wanted = {q["source"] for q in queries if q.get("source")}
    path = out / f"corpus-first-{docs}.jsonl.gz"
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    with gzip.open(corpus, "rt", encoding="utf-8") as source, gzip.open(partial, "wt", encoding="utf-8") as sink:
        for index, line in enumerate(source):
            if index < docs or json.loads(line).get("id") in wanted:
                sink.write(line)
    partial.replace(path)
    return path


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
               "identity_rank": source_rank(out / "results-identity" / "topk.parquet", query["id"], source)[0]}
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

