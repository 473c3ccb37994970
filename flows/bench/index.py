"""`whence bench --only index`: the gradient index (`whence index`, `whence query`) against `whence score`, on
the pipeline fixture's 4x corpus (flows.bench.pipeline) with its 8 queries, in the same run:

    index_build_vs_score_throughput   sequences per second of a whole `whence index` run over those of a whole
                                      `whence score --tfidf-candidates 0` run (the same sequences, one worker)
    query_vs_score_speedup            seconds of that `whence score` run over a whole `whence query` run of the
                                      same queries once the index exists (model load and query preparation
                                      included; the issue's target is >= 20, not in
                                      flows.bench.table.TARGETS, which tiny runs without Ray must all meet)
    query_search_vs_score_pass        the score pass's seconds over the index search's (matrix products only)
"""

from __future__ import annotations

import time

from flows.bench.fixtures import Bench
from flows.bench.pipeline import DOCUMENTS_PER_FILE, fixture, run_score


def index_speed(bench: Bench) -> tuple[dict, dict]:
    from flows.cluster import ClusterSettings
    from flows.index import build_index
    from flows.query import query_index
    from whence.config import ScoreConfig
    from whence.index.config import IndexConfig

    fx = fixture(bench)
    score = run_score(bench, "4x_1w")
    tick = time.perf_counter()
    built = build_index(str(fx.model_dir), str(fx.factors_dir), [str(fx.corpora[4])], str(fx.root / "index_4x"),
                        IndexConfig(batch_size=DOCUMENTS_PER_FILE), ClusterSettings(workers=1), overwrite=True)
    build_s = time.perf_counter() - tick
    tick = time.perf_counter()
    answered = query_index(str(fx.root / "index_4x"), str(fx.queries_path), str(fx.root / "query_4x"),
                           ScoreConfig(top_k=10, tfidf_candidates=0), ClusterSettings(workers=1), overwrite=True)
    query_s = time.perf_counter() - tick
    score_rate = score["sequences_scored"] / score["seconds"]
    figures = {"index_build_vs_score_throughput": built["sequences"] / build_s / score_rate,
               "query_vs_score_speedup": score["seconds"] / query_s,
               "query_search_vs_score_pass": score["timings"]["score_s"] / max(answered["search_s"], 1e-9)}
    details = {"sequences": built["sequences"], "bytes_per_sequence": built["bytes_per_sequence"],
               "index_build_s": build_s, "score_s": score["seconds"], "score_pass_s": score["timings"]["score_s"],
               "query_s": query_s, "search_s": answered["search_s"], "query_timings": answered["timings"]}
    print(f"  index: built {built['sequences']} sequences in {build_s:.1f}s ({built['bytes_per_sequence']:,} "
          f"bytes each) against `whence score` in {score['seconds']:.1f}s: throughput "
          f"{figures['index_build_vs_score_throughput']:.2f}; `whence query` {query_s:.1f}s "
          f"(search {answered['search_s']:.3f}s): {figures['query_vs_score_speedup']:.1f}x faster")
    return figures, details
