"""`whence bench --only index`: the gradient index (`whence index`, `whence query`) against `whence score`, on
the pipeline fixture's 4x corpus (flows.bench.pipeline) with its 8 queries, in the same run:

    index_build_vs_score_throughput   sequences per second of a whole `whence index` run over those of a whole
                                      `whence score --tfidf-candidates 0` run (the same sequences, one worker)
    query_vs_score_speedup            seconds of that `whence score` run over a whole `whence query` run of the
                                      same queries once the index exists (model load and query preparation
                                      included; the issue's target is >= 20, not in
                                      flows.bench.table.TARGETS, which tiny runs without Ray must all meet)
    query_search_vs_score_pass        the score pass's seconds over the index search's (matrix products only)

for the default kind (lowrank), and the same three with the suffix _eigen for `--projection eigen` at its default
K, built and queried in the same run.
"""

from __future__ import annotations

import time

from flows.bench.fixtures import Bench
from flows.bench.pipeline import DOCUMENTS_PER_FILE, fixture, run_score
from whence.index.projection import DEFAULT_KIND


def index_speed(bench: Bench) -> tuple[dict, dict]:
    from flows.cluster import ClusterSettings
    from flows.index import build_index
    from flows.query import query_index
    from whence.config import ScoreConfig
    from whence.index.config import IndexConfig

    fx = fixture(bench)
    score = run_score(bench, "4x_1w")
    score_rate = score["sequences_scored"] / score["seconds"]
    figures, details = {}, {"score_s": score["seconds"], "score_pass_s": score["timings"]["score_s"]}
    for kind, suffix in ((DEFAULT_KIND, ""), ("eigen", "_eigen")):
        name = f"index_4x_{kind}"
        tick = time.perf_counter()
        built = build_index(str(fx.model_dir), str(fx.factors_dir), [str(fx.corpora[4])], str(fx.root / name),
                            IndexConfig(projection=kind, batch_size=DOCUMENTS_PER_FILE), ClusterSettings(workers=1),
                            overwrite=True)
        build_s = time.perf_counter() - tick
        tick = time.perf_counter()
        answered = query_index(str(fx.root / name), str(fx.queries_path), str(fx.root / f"query_4x_{kind}"),
                               ScoreConfig(top_k=10, tfidf_candidates=0), ClusterSettings(workers=1), overwrite=True)
        query_s = time.perf_counter() - tick
        figures.update({f"index_build_vs_score_throughput{suffix}": built["sequences"] / build_s / score_rate,
                        f"query_vs_score_speedup{suffix}": score["seconds"] / query_s,
                        f"query_search_vs_score_pass{suffix}": score["timings"]["score_s"]
                        / max(answered["search_s"], 1e-9)})
        details[kind] = {"sequences": built["sequences"], "bytes_per_sequence": built["bytes_per_sequence"],
                         "index_build_s": build_s, "query_s": query_s, "search_s": answered["search_s"],
                         "query_timings": answered["timings"]}
        print(f"  index ({kind}): built {built['sequences']} sequences in {build_s:.1f}s "
              f"({built['bytes_per_sequence']:,} bytes each) against `whence score` in {score['seconds']:.1f}s: "
              f"throughput {figures[f'index_build_vs_score_throughput{suffix}']:.2f}; `whence query` {query_s:.1f}s "
              f"(search {answered['search_s']:.3f}s): {figures[f'query_vs_score_speedup{suffix}']:.1f}x faster")
    return figures, details
