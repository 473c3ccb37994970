"""`whence bench --config tiny` runs end to end and reports every figure as a finite, positive ratio.

Timings depend on the machine, so nothing here asserts on a value or a target: only that each measurement
produced its ratios and that the JSON says what it measured.
"""

import json
import math

import pytest

from flows.bench import PIPELINE_MEASUREMENTS, TARGETS
from flows.bench.measure import NAMED_ONLY
from flows.cli import main

EXPECTED_FIGURES = {
    "fitting_vs_training", "fitting_passes_vs_training", "eigendecomposition_vs_training",
    "lissa_vs_ekfac_preparation", "tfidf_peak_memory_4x_vs_1x", "tfidf_throughput_4x_vs_1x",
    *(f"scoring_q{q}_rank{r}" for q in (1, 8, 32, 128) for r in (32, "full")),
}


def test_tiny_bench_writes_finite_ratios(tmp_path, capsys):
    out = tmp_path / "b.json"
    # One timed repetition of each step: a ratio of two timings all the same (nothing asserts on values).
    assert main(["bench", "--config", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    body = json.loads(out.read_text())
    figures = body["figures"]
    assert EXPECTED_FIGURES <= set(figures), f"missing: {sorted(EXPECTED_FIGURES - set(figures))}"
    for name, value in figures.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    pipeline_targets = {"score_peak_memory_4x_vs_1x", "pipeline_throughput_vs_in_process",  # Ray: not in tiny
                        "scale_driver_peak_memory_4x_vs_1x", "scale_actor_peak_memory_4x_vs_1x",
                        "index_bundled_query_vs_score_speedup"}  # and an hour's run, only when named
    assert set(TARGETS) - pipeline_targets <= set(figures), "every target has its figure"
    for name, reason in body["pending"].items():  # a measurement that could not run says why instead
        assert reason, name
    assert body["config"]["name"] == "tiny" and "Llama" in body["shape"]
    printed = capsys.readouterr().out
    assert "scoring_q32_rank32" in printed and "figure (ratio)" in printed


def test_the_hour_long_measurements_run_only_when_named():
    import argparse

    from flows.bench import chosen_config, chosen_measurements

    for config in ("tiny", "medium"):
        args = argparse.Namespace(config=config, only=None, repeats=None)
        selected, _ = chosen_measurements(args, chosen_config(args))
        assert not set(NAMED_ONLY) & set(selected)
    args = argparse.Namespace(config="tiny", only="index_bundled", repeats=None)
    assert chosen_measurements(args, chosen_config(args)) == (["index_bundled"], [])


@pytest.mark.slow
def test_pipeline_measurements_write_finite_ratios(tmp_path, ray_cluster):
    """Measurements 5-8 run `whence score` and sharded workers (Ray) several times: minutes, whatever the
    model size."""
    out = tmp_path / "pipeline.json"
    # Measurements 5-8 (the memory measurement fits six models in subprocesses: it is run by hand, not here; the
    # scale one, 200,000 sequences on its own cluster, has tests/test_bench_scale.py at a small size; the index
    # over the whole bundled corpus, NAMED_ONLY, takes an hour).
    measurements = [name for name in PIPELINE_MEASUREMENTS if name not in ("memory", "scale", *NAMED_ONLY)]
    assert main(["bench", "--config", "tiny", "--only", ",".join(measurements), "--repeats", "1",
                 "--out", str(out)]) == 0
    body = json.loads(out.read_text())
    assert not body["pending"], body["pending"]
    expected = {"pipeline_throughput_vs_in_process", "pipeline_throughput_1x_vs_in_process",
                "pipeline_whole_run_vs_in_process",
                "score_peak_memory_4x_vs_1x", "score_largest_process_memory_4x_vs_1x",
                "score_throughput_2_workers_vs_1", "shards_throughput_2_vs_1", "shards_stage_idle_share_mean",
                "shards_stage_idle_share_max"}
    assert expected <= set(body["figures"])
    for name, value in body["figures"].items():
        assert math.isfinite(value) and value >= 0, (name, value)
    for name in ("shards_stage_idle_share_mean", "shards_stage_idle_share_max"):
        assert body["figures"][name] <= 1.0, name  # a share of wall time
    timings = body["details"]["shards"]["2_stages"]["stage_timings"]
    assert [t["stage"] for t in timings] == [0, 1] and all(t["busy_s"] > 0 for t in timings)
