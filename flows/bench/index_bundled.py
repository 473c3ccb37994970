"""`whence bench --only index_bundled`: the gradient index against `whence score` over the whole bundled corpus,
in one run, as issue #13 states its target: 8 new queries (the first 8 of flows/eval_assets/queries.jsonl, not
the demo's), the bundled model (flows/demo_assets/model, 128-token sequences) and all of flows/demo_assets/corpus.

    index_bundled_build_vs_score_throughput   sequences per second of the whole `whence index` run (default
                                              projection) over those of the whole `whence score
                                              --tfidf-candidates 0 --top-k 10` run, the same sequences
    index_bundled_query_vs_score_speedup      that `whence score` run's seconds over a whole `whence query --top-k
                                              10` of the same queries once the index exists (model load and query
                                              preparation included; the issue's target is >= 20)
    index_bundled_search_vs_score_pass        the score pass's seconds over the index search's

The factors are fitted first, as the README's whole-corpus figures were (1,000 sequences, one worker; not timed
against anything). Every other run uses WORKERS actors (or search tasks). The model is the bundled one whatever
--config says. 38 minutes on this project's 2-core machine, and the index takes about 16 GB of disk in a temporary
directory (TMPDIR; removed afterwards): this runs only when named.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent
MODEL = ASSETS / "demo_assets" / "model"
CORPUS = ASSETS / "demo_assets" / "corpus"
NEW_QUERIES = ASSETS / "eval_assets" / "queries.jsonl"
QUERIES = 8
SEQ_LEN = 128  # the bundled model's training length, as `whence demo` uses it
FIT_SEQUENCES = 1000
WORKERS = 2  # one actor a core on this machine, for every run compared


def bundled_index_speed(bench=None) -> tuple[dict, dict]:
    from flows.bench.index_agreement import compare_results
    from flows.cluster import ClusterSettings
    from flows.fit import fit_corpus
    from flows.index import build_index
    from flows.query import query_index
    from flows.score import score_corpus
    from whence.config import FitConfig, ScoreConfig
    from whence.index.config import IndexConfig

    root = Path(tempfile.mkdtemp(prefix="whence-bench-bundled-"))
    try:
        queries = root / "queries.jsonl"
        lines = [line for line in NEW_QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()][:QUERIES]
        queries.write_text("\n".join(lines) + "\n", encoding="utf-8")
        factors, corpus, cluster = root / "factors", [str(CORPUS)], ClusterSettings(workers=WORKERS)
        tick = time.perf_counter()
        fit_corpus(str(MODEL), corpus, str(factors), FitConfig(seq_len=SEQ_LEN, max_sequences=FIT_SEQUENCES),
                   ClusterSettings(workers=1))
        fit_s = time.perf_counter() - tick
        config = ScoreConfig(top_k=10, tfidf_candidates=0, seq_len=SEQ_LEN)
        tick = time.perf_counter()
        scored = score_corpus(str(MODEL), str(factors), str(queries), corpus, str(root / "score"), config, cluster)
        score_s = time.perf_counter() - tick
        tick = time.perf_counter()
        built = build_index(str(MODEL), str(factors), corpus, str(root / "index"), IndexConfig(seq_len=SEQ_LEN),
                            cluster)
        build_s = time.perf_counter() - tick
        tick = time.perf_counter()
        answered = query_index(str(root / "index"), str(queries), str(root / "query"), config, cluster)
        query_s = time.perf_counter() - tick
        overlap = {q: top10 for q, (_, top10) in compare_results(str(root / "score"), str(root / "query")).items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    score_rate = scored["sequences_scored"] / score_s
    figures = {"index_bundled_build_vs_score_throughput": built["sequences"] / build_s / score_rate,
               "index_bundled_query_vs_score_speedup": score_s / query_s,
               "index_bundled_search_vs_score_pass": scored["timings"]["score_s"] / max(answered["search_s"], 1e-9)}
    details = {"queries": QUERIES, "workers": WORKERS, "fit_s": fit_s, "score_s": score_s,
               "score_pass_s": scored["timings"]["score_s"], "sequences_scored": scored["sequences_scored"],
               "index_sequences": built["sequences"], "bytes_per_sequence": built["bytes_per_sequence"],
               "index_build_s": build_s, "query_s": query_s, "search_s": answered["search_s"],
               "query_timings": answered["timings"], "top10_overlap": overlap}
    print(f"  index (bundled corpus, {built['sequences']} sequences): built in {build_s:.0f}s against `whence score` "
          f"in {score_s:.0f}s: throughput {figures['index_bundled_build_vs_score_throughput']:.2f}; `whence query` "
          f"{query_s:.1f}s (search {answered['search_s']:.1f}s): "
          f"{figures['index_bundled_query_vs_score_speedup']:.1f}x faster; top-10 overlap with the score run "
          f"{sum(overlap.values()) / len(overlap):.2f}")
    return figures, details


if __name__ == "__main__":  # the measurement alone, printing its JSON
    print(json.dumps(bundled_index_speed(), indent=2, default=str))
