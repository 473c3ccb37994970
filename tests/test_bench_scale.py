"""`whence bench --only scale` (flows.bench.scale) on a small corpus: a 3-node Ray cluster, the real `whence score`
runs observed, and figures that say what they should. Nothing asserts on a timing.

The measurement starts and stops its own multi-node cluster (a driver joins one cluster at a time), so it leaves
this process without Ray: the test is kept in its own module, and the flows that run after it start their own.
"""

import math

import pytest

from flows.bench.scale import SCORE_RUNS, ScaleSettings, scale_costs

SEQUENCES = 1_000  # the bench's 200,000, cut to a test's size
FRAGMENT_BYTES = 40_000  # the read measurement's byte ranges: several fragments even for this small file


@pytest.fixture(scope="module")
def measured():
    # One scoring actor (the small corpus is one fragment: a second would idle); the cluster still has 3 nodes.
    settings = ScaleSettings(sequences=SEQUENCES, fragment_bytes=FRAGMENT_BYTES, read_repeats=1, workers=1)
    return scale_costs(settings)


def test_every_figure_is_a_finite_positive_ratio(measured):
    figures, details = measured
    expected = {"scale_driver_bytes_topk_vs_all", "scale_driver_cpu_topk_vs_all",
                "scale_read_fragments_vs_one_file", "scale_driver_peak_memory_4x_vs_1x",
                "scale_actor_peak_memory_4x_vs_1x"}
    assert set(figures) == expected
    for name, value in figures.items():
        assert math.isfinite(value) and value > 0, (name, value)
    assert details["nodes"] == 3


def test_the_scorers_top_k_sends_the_driver_fewer_bytes(measured):
    _, details = measured
    every, cut = details["driver"]["all"], details["driver"]["topk"]
    assert every["sequences"] == cut["sequences"] >= SEQUENCES  # each document is one sequence, a few two
    assert 0 < cut["bytes_per_sequence"] < every["bytes_per_sequence"]
    # Every score: a row per sequence, at least Q x (L + 1) float64 scores (8 queries, 3 MLP layers).
    assert every["bytes_per_sequence"] >= 8 * (3 + 1) * 8
    for run in (every, cut):
        assert run["batches"] >= run["fragments"] >= 1 and run["driver_cpu_s"] > 0


def test_reads_and_memory_cover_the_corpus_and_four_times_it(measured):
    _, details = measured
    read = details["read"]
    assert read["one_file"]["fragments"] == 1 and read["fragments"]["fragments"] > 1  # gzip: one fragment
    one, four = details["memory"]["1x"], details["memory"]["4x"]
    assert four["sequences"] == 4 * one["sequences"] == read["one_file"]["sequences"] == read["fragments"]["sequences"]
    for run in (one, four):
        assert run["driver_peak_rss"] > 0
        assert 1 <= len(run["actor_peak_rss"]) and min(run["actor_peak_rss"]) > 0  # the scoring actors, sampled
    assert set(SCORE_RUNS) == {"1x_all", "1x_topk", "4x_topk"}
