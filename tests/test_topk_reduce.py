"""Scorers send their batches' per-query top-k (whence.fragment_parts.reduce_to_top_k), not every score: the
fragment's parts are the same as from every row, with ties, baselines, markers and skipped sequences."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from whence.fragment_parts import FragmentResults, reduce_to_top_k

QUERY_IDS = ["q0", "q1", "q2"]
BASELINES = ["identity"]
LAYERS = 4


def scored_batch(rng, fragment: int, n: int, with_marker: int | None) -> dict:
    """A scorer's output batch: n sequence rows of `fragment` (scores rounded so that ties occur), some skipped
    for NaN, and a marker row saying the fragment holds `with_marker` sequences."""
    columns = len(QUERY_IDS) * (1 + len(BASELINES))
    layer_scores = np.round(rng.normal(size=(n, columns, LAYERS)), 1)
    batch = {"fragment": np.full(n, fragment), "doc_id": np.asarray([f"d{fragment}-{i % 7}" for i in range(n)], object),
             "chunk": np.arange(n) // 7, "marker_total": np.full(n, -1), "scores": layer_scores.sum(axis=2),
             "layer_scores": layer_scores, "non_finite": rng.random(n) < 0.1, "num_tokens": np.full(n, 12)}
    if with_marker is not None:
        marker = {"fragment": [fragment], "doc_id": [""], "chunk": [0], "marker_total": [with_marker],
                  "scores": np.zeros((1, columns)), "layer_scores": np.zeros((1, columns, LAYERS)),
                  "non_finite": [False], "num_tokens": [0]}
        batch = {name: np.concatenate([values, np.asarray(marker[name], dtype=values.dtype)])
                 for name, values in batch.items()}
    return batch


@pytest.mark.parametrize("k", [1, 3, 50])
def test_the_top_k_of_reduced_batches_equals_the_top_k_of_every_row(tmp_path, k):
    rng = np.random.default_rng(k)
    batches = [scored_batch(rng, 0, 40, None), scored_batch(rng, 0, 25, 65)]
    tables, counts = {}, {}
    for name, transform in (("rows", lambda b: b), ("reduced", lambda b: reduce_to_top_k(b, k))):
        results = FragmentResults(0, QUERY_IDS, k, LAYERS, keep_all=False, baselines=BASELINES)
        for batch in batches:
            results.add(transform(batch))
        assert results.complete
        counts[name] = (results.received, results.non_finite)
        paths = {}
        results.write(lambda kind, index, name=name, paths=paths: paths.setdefault(kind, tmp_path / f"{name}-{kind}.parquet"))
        tables[name] = {kind: pq.read_table(path) for kind, path in paths.items()}
    assert counts["reduced"] == counts["rows"] and counts["rows"][0] == 65
    for kind, table in tables["rows"].items():
        assert tables["reduced"][kind].equals(table, check_metadata=True), kind
    reduced = reduce_to_top_k(batches[0], k)
    if k < 40:  # fewer rows than sequences: the driver receives at most k entries per column
        assert (reduced["query"] >= 0).sum() <= k * len(QUERY_IDS) * (1 + len(BASELINES))
