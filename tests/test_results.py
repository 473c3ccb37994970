"""The RESULTS_DIR contract without Ray: fragment parts, their reduce, and the top-k table to and from Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from whence.fragment_parts import (
    TOPK_PART,
    FragmentResults,
    concatenate_scores,
    part_sequences,
    reduce_topk,
)
from whence.results import SCORES_SCHEMA, TOPK_SCHEMA, topk_table
from whence.topk import TopK

QUERY_IDS = ["q0", "q1", "q2"]
NUM_LAYERS = 4
K = 5
FISHER_N = 50  # fitting sequences: predicted_change = score / N


def scored_fragment(rng: np.random.Generator, fragment: int, sequences: int) -> dict:
    """A scorer's output for one whole fragment: its sequence rows, then its marker row."""
    n = sequences + 1
    scores = rng.normal(size=(n, len(QUERY_IDS)))
    scores[1] = scores[0]  # a tie, broken by doc id
    layer_scores = rng.normal(size=(n, len(QUERY_IDS), NUM_LAYERS))
    return {"fragment": np.full(n, fragment), "doc_id": np.asarray([f"d{fragment}-{i:03d}" for i in range(n)], object),
            "chunk": np.arange(n) % 2, "marker_total": np.asarray([-1] * sequences + [sequences]),
            "scores": scores, "layer_scores": layer_scores}


def part_path_in(directory: Path):
    return lambda kind, index: directory / f"{kind}-{index:06d}.parquet"


def test_reduced_parts_equal_one_top_k_over_everything(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batches = [scored_fragment(rng, fragment, sequences) for fragment, sequences in enumerate((7, 3, 12))]
    part_path = part_path_in(tmp_path)
    expected = TopK.empty(QUERY_IDS, K, NUM_LAYERS)
    for batch in batches:
        results = FragmentResults(int(batch["fragment"][0]), QUERY_IDS, K, NUM_LAYERS, keep_all=True)
        half = len(batch["doc_id"]) // 2  # arriving in two pieces, the marker last
        for rows in (slice(0, half), slice(half, None)):
            results.add({name: values[rows] for name, values in batch.items()})
        assert results.complete
        results.write(part_path)
        rows = batch["marker_total"] < 0
        expected.update(batch["doc_id"][rows], batch["chunk"][rows], batch["scores"][rows],
                        batch["layer_scores"][rows], batch["fragment"][rows])

    parts = {index: part_path(TOPK_PART, index) for index in range(len(batches))}
    assert [part_sequences(path) for path in parts.values()] == [7, 3, 12]
    merged = reduce_topk(parts, QUERY_IDS, K, NUM_LAYERS, tmp_path / "topk.parquet", fisher_sequences=FISHER_N)
    table = pq.read_table(tmp_path / "topk.parquet")
    assert table.schema.equals(TOPK_SCHEMA)
    assert table.equals(topk_table(expected, fisher_sequences=FISHER_N))
    assert table.to_pylist() == [{**row, "predicted_change": row["score"] / FISHER_N} for row in expected.rows()]
    for mine, theirs in zip(merged.entries, expected.entries):
        np.testing.assert_array_equal(mine["fragment"], theirs["fragment"])

    concatenate_scores({index: part_path("scores", index) for index in range(len(batches))},
                       tmp_path / "scores.parquet")
    scores = pq.read_table(tmp_path / "scores.parquet")
    assert scores.schema.equals(SCORES_SCHEMA) and scores.num_rows == len(QUERY_IDS) * (7 + 3 + 12)


def test_top_k_from_its_table_is_the_same_top_k() -> None:
    rng = np.random.default_rng(1)
    batch = scored_fragment(rng, 0, 20)
    rows = batch["marker_total"] < 0
    topk = TopK.empty(QUERY_IDS, None, NUM_LAYERS)
    topk.update(batch["doc_id"][rows], batch["chunk"][rows], batch["scores"][rows], batch["layer_scores"][rows])
    table = topk_table(topk)
    shuffled = table.take(rng.permutation(table.num_rows))
    again = TopK.from_table(shuffled, QUERY_IDS, None, NUM_LAYERS)
    assert topk_table(again).equals(table)
    assert topk_table(TopK.from_table(shuffled, QUERY_IDS[1:], 3, NUM_LAYERS)).num_rows == 2 * 3
    assert topk_table(TopK.empty(QUERY_IDS, K, NUM_LAYERS)).schema.equals(TOPK_SCHEMA)
