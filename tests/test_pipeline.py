"""The Ray pipeline (`whence fit`, `whence score`) against the core engine, and its reliability."""

import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.cluster import ClusterSettings
from flows.fit import fit_corpus
from flows.score import score_corpus
from tests.pipeline_fixtures import FIT_CONFIG, QUERIES, copy_workspace
from whence import FitConfig, ScoreConfig, fit, load_causal_lm, prepare, score
from whence.corpus import CorpusSource
from whence.errors import CorpusError, RunStateError, SettingsError
from whence.factor_files import LAMBDA, LAYERS_DIR, layer_file
from whence.factors import MANIFEST_FILE, Factors
from whence.model import find_tracked_layers
from whence.queries import PreparedQueries

SEQ_LEN = 16
# On a GPU machine the actors run on the GPU and the in-process references on the CPU: their eigensolvers settle
# the eigenvectors of nearly equal eigenvalues differently (tests/test_cuda.py), so factors agree to ~1e-4 there
# (seen on an H100: 1.4e-4 at worst), and GPU sums are not bit-reproducible across batchings.
ON_GPU = torch.cuda.is_available()
FLOAT64 = dict(rtol=1e-3, atol=1e-8) if ON_GPU else dict(rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, fitted_workspace):
    """A copy of the session's workspace, its factors fitted on Ray by 2 workers (conftest.fitted_workspace)."""
    return copy_workspace(fitted_workspace, tmp_path_factory.mktemp("pipeline"))


CLUSTER_FIELDS = {f.name for f in dataclasses.fields(ClusterSettings)}


def run_score(space, out, strict=False, overwrite=False, **overrides):
    """score_corpus with the test's settings; `overrides` are ScoreConfig or ClusterSettings fields."""
    settings = dict(top_k=5, tfidf_candidates=0, query_rank="full", batch_size=4)
    cluster = {k: overrides.pop(k) for k in list(overrides) if k in CLUSTER_FIELDS}
    settings.update(overrides)
    return score_corpus(space["model"], space["factors"], space["queries"],
                        CorpusSource([space["corpus"]], strict=strict), str(out), ScoreConfig(**settings),
                        ClusterSettings(dtype="float64", **cluster), overwrite=overwrite)


def test_fit_equals_the_in_process_fit(workspace):
    model, tokenizer = load_causal_lm(workspace["model"], device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    expected = fit(model, tokenizer, layers, workspace["documents"], FitConfig(seq_len=SEQ_LEN))
    fitted = Factors.load(workspace["factors"])
    assert fitted.metadata["summary"]["bad_rows"] == workspace["bad_rows"]
    for layer in layers:
        torch.testing.assert_close(fitted.eigenvalues[layer.name], expected.eigenvalues[layer.name], **FLOAT64)
        v = torch.randn(layer.d_out, layer.d_in, dtype=torch.float64)
        torch.testing.assert_close(fitted.precondition(layer.name, v), expected.precondition(layer.name, v), **FLOAT64)


def test_interrupted_fit_resumes_without_recomputing_finished_layers(workspace, fitted_workspace, tmp_path):
    out = tmp_path / "factors"
    shutil.copytree(workspace["factors"], out)
    names = Factors.load(out).layer_names
    # An interruption during the write of the correction pass's results: the first layers are finished, the
    # others have their bases only, and the manifest is not written yet.
    kept = {p: p.stat().st_mtime_ns for p in (out / LAYERS_DIR).iterdir() if names[0] in p.name or "basis" in p.name}
    for name in names[1:]:
        (out / layer_file(name, LAMBDA)).unlink()
    (out / MANIFEST_FILE).unlink()
    run_file = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_file, "status": "running"}))
    # The run's arguments name the model and corpus the session's factors were fitted from (not this copy's).
    fit_corpus(fitted_workspace["model"], [fitted_workspace["corpus"]], str(out), FIT_CONFIG,
               ClusterSettings(workers=2, dtype="float64"))
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items()), "finished files are not rewritten"
    expected, resumed = Factors.load(workspace["factors"]), Factors.load(out)
    for name in expected.layer_names:
        assert torch.equal(resumed.eigenvalues[name], expected.eigenvalues[name])


def test_fit_on_one_worker_equals_two_and_survives_a_killed_actor_in_either_pass(workspace, tmp_path):
    two = Factors.load(workspace["factors"])
    # One actor holds every layer and reads ~80 batches per pass: killed after 5 (covariance) or 100 (correction).
    killed = {}
    for after in (5, 100):
        marker = tmp_path / f"died-{after}"
        fit_corpus(workspace["model"], [workspace["corpus"]], str(tmp_path / f"killed-{after}"), FIT_CONFIG,
                   ClusterSettings(workers=1, dtype="float64",
                                   actor_env={"WHENCE_FAULT_AFTER_BATCHES": f"{after}:{marker}"}))
        assert marker.exists(), "the fault was injected"
        killed[after] = Factors.load(tmp_path / f"killed-{after}")
    for name in two.layer_names:
        # One worker's factors are two workers' (their sums add in another order: equal to rounding).
        torch.testing.assert_close(killed[5].eigenvalues[name], two.eigenvalues[name], **FLOAT64)
        # A rerun pass reads the same batches in the same order: a fault in either pass gives the same bits, which a
        # pass counted twice or a batch lost would not.
        assert torch.equal(killed[5].eigenvalues[name], killed[100].eigenvalues[name]), name
        assert all(torch.equal(a, b) for a, b in zip(killed[5].bases[name].gradient_vectors,
                                                     killed[100].bases[name].gradient_vectors))


def test_two_fits_are_bit_identical(workspace, tmp_path, monkeypatch):
    """Also when the second takes its sequences from the token ids a cached TF-IDF scan kept (no corpus read)."""
    import flows.corpus_pipeline
    from flows.corpus_pipeline import ReadSettings
    from flows.scan_cache import cached_scan
    from whence.corpus import list_fragments
    from whence.tfidf import DEFAULT_FEATURES

    source = CorpusSource([workspace["corpus"]])
    cached_scan(list_fragments(source.paths), ReadSettings.for_corpus(workspace["model"], SEQ_LEN, source),
                DEFAULT_FEATURES)
    stored, from_scans = [], flows.corpus_pipeline.sequences_from_scans
    monkeypatch.setattr(flows.corpus_pipeline, "sequences_from_scans",
                        lambda *args, **kwargs: stored.append(from_scans(*args, **kwargs)) or stored[-1])
    fit_corpus(workspace["model"], [workspace["corpus"]], str(tmp_path / "again"), FIT_CONFIG,
               ClusterSettings(workers=2, dtype="float64"))
    assert len(stored) == 1 and stored[0] is not None
    first, again = Factors.load(workspace["factors"]), Factors.load(tmp_path / "again")
    for name in first.layer_names:
        assert torch.equal(first.eigenvalues[name], again.eigenvalues[name])
        assert all(torch.equal(a, b) for a, b in zip(first.bases[name].activation_vectors,
                                                     again.bases[name].activation_vectors))


def test_fit_with_two_shards_equals_and_survives_a_killed_stage(workspace, tmp_path):
    marker = tmp_path / "stage-died"
    out = tmp_path / "sharded"
    fit_corpus(workspace["model"], [workspace["corpus"]], str(out), FIT_CONFIG,
               ClusterSettings(workers=1, shards=2, dtype="float64",
                               actor_env={"WHENCE_FAULT_AFTER_BATCHES": f"30:{marker}"}))
    assert marker.exists(), "the fault was injected"
    expected, sharded = Factors.load(workspace["factors"]), Factors.load(out)
    for name in expected.layer_names:
        torch.testing.assert_close(sharded.eigenvalues[name], expected.eigenvalues[name], **FLOAT64)
    # The stages owned and finished their layers: each recorded its finish phases (one pipeline of two stages).
    stages = sharded.metadata["summary"]["memory"]["peak_rss"]["stages"]
    assert [[s["stage"] for s in pipeline] for pipeline in stages] == [[0, 1]]
    assert all({"covariance finish", "correction finish"} <= set(s["phases"]) for s in stages[0])


def test_fit_with_activation_checkpointing_equals_and_survives_a_killed_actor(workspace, tmp_path):
    """Each block's graph rebuilt at its backward (one stage per block in the actor): the same factors as the
    session's fit, and a fault in the middle of the covariance pass costs its rerun only."""
    marker = tmp_path / "died"
    out = tmp_path / "checkpointed"
    fit_corpus(workspace["model"], [workspace["corpus"]], str(out), FIT_CONFIG,
               ClusterSettings(workers=1, dtype="float64", checkpointing=True,
                               actor_env={"WHENCE_FAULT_AFTER_BATCHES": f"5:{marker}"}))
    assert marker.exists(), "the fault was injected"
    expected, checkpointed = Factors.load(workspace["factors"]), Factors.load(out)
    assert checkpointed.metadata["summary"]["activation_checkpointing"] is True
    assert expected.metadata["summary"]["activation_checkpointing"] is False
    for name in expected.layer_names:
        torch.testing.assert_close(checkpointed.eigenvalues[name], expected.eigenvalues[name], **FLOAT64)
    with pytest.raises(SettingsError, match="--activation-checkpointing cannot be combined with --shards"):
        fit_corpus(workspace["model"], [workspace["corpus"]], str(tmp_path / "refused"), FIT_CONFIG,
                   ClusterSettings(shards=2, checkpointing=True))
    assert not (tmp_path / "refused").exists()


def test_score_everything_equals_the_core_engine(workspace, tmp_path):
    summary = run_score(workspace, tmp_path / "all", top_k=None, save_all_scores=True, per_token=True)
    model, tokenizer = load_causal_lm(workspace["model"], device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    factors = Factors.load(workspace["factors"])
    prepared = prepare(model, tokenizer, layers, factors, QUERIES, ScoreConfig(query_rank="full"))
    table = score(model, tokenizer, layers, prepared, workspace["documents"], ScoreConfig(seq_len=SEQ_LEN))
    topk = pq.read_table(tmp_path / "all" / "topk.parquet").to_pandas()
    assert summary["sequences_scored"] == len(table.doc_ids) == len(topk) // len(QUERIES)
    expected = {(q["id"], d, int(c)): table.scores[i, j] for j, q in enumerate(QUERIES)
                for i, (d, c) in enumerate(zip(table.doc_ids, table.chunks))}
    for row in topk.itertuples():
        assert row.score == pytest.approx(expected[(row.query_id, row.doc_id, row.chunk)], rel=FLOAT64["rtol"],
                                          abs=FLOAT64["atol"])
        assert sum(row.layer_scores) == pytest.approx(row.score, rel=1e-9, abs=1e-9)
    for _, group in topk.groupby("query_id"):  # ranks are 1..N by descending score
        assert list(group["rank"]) == list(range(1, len(group) + 1))
        assert (np.diff(group["score"].to_numpy()) <= 0).all()
    tokens = pq.read_table(tmp_path / "all" / "tokens.parquet").to_pandas()
    merged = tokens.merge(topk, on=["query_id", "rank", "doc_id", "chunk"])
    assert len(merged) == len(topk)
    np.testing.assert_allclose([sum(s) for s in merged["token_scores"]], merged["score"], rtol=1e-9, atol=1e-9)
    assert len(pq.read_table(tmp_path / "all" / "scores.parquet")) == len(topk)


def test_ekfac_cg_on_ray_equals_the_core_engine(workspace, tmp_path):
    """`whence score --method ekfac-cg`: the preparation task's Fisher is the fitted one, over the fitting corpus's
    sequences with its bad rows and duplicate (doc03 again, line 14) skipped, as the in-process API's."""
    refine = dict(method="ekfac-cg", refine_steps=3, refine_sequences=10_000)
    run_score(workspace, tmp_path / "cg", top_k=None, **refine)
    model, tokenizer = load_causal_lm(workspace["model"], device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    factors = Factors.load(workspace["factors"])
    config = ScoreConfig(query_rank="full", seq_len=SEQ_LEN, batch_size=4, **refine)
    prepared = prepare(model, tokenizer, layers, factors, QUERIES, config, fitting=workspace["documents"])
    table = score(model, tokenizer, layers, prepared, workspace["documents"], config)
    expected = {(q["id"], d, int(c)): table.scores[i, j] for j, q in enumerate(QUERIES)
                for i, (d, c) in enumerate(zip(table.doc_ids, table.chunks))}
    topk = pq.read_table(tmp_path / "cg" / "topk.parquet").to_pandas()
    assert len(topk) == len(expected)
    for row in topk.itertuples():
        assert row.score == pytest.approx(expected[(row.query_id, row.doc_id, row.chunk)], rel=1e-7, abs=1e-9)
    refined = json.loads((tmp_path / "cg" / "manifest.json").read_text())["refine"]
    assert refined["steps"] == 3 and refined["sequences"] == len(table.doc_ids)
    # With --shards 2 the Fisher-vector products are summed over two pipeline stages: the same queries.
    run_score(workspace, tmp_path / "cg2", top_k=None, shards=2, **refine)
    staged = json.loads((tmp_path / "cg2" / "manifest.json").read_text())["refine"]
    assert staged["product_stages"] == 2
    np.testing.assert_allclose(staged["relative_residuals"], refined["relative_residuals"], rtol=1e-9)
    for name, queries in PreparedQueries.load(tmp_path / "cg" / "queries.safetensors").full.items():
        torch.testing.assert_close(PreparedQueries.load(tmp_path / "cg2" / "queries.safetensors").full[name],
                                   queries, rtol=1e-9, atol=1e-12)


def test_results_do_not_depend_on_the_number_of_workers(workspace, tmp_path, monkeypatch):
    """Nor on where the candidates and their sequences came from: one: the scan's kept term rows and token ids
    (flows.candidates); two: a fresh scan that keeps none (WHENCE_CACHE=off, limits below zero), so a candidates
    pass and one gathering read; again: as two, but every pass reads the corpus (beyond MAX_STORED_TOKENS)."""
    import flows.candidates
    import flows.corpus_pipeline

    run_score(workspace, tmp_path / "one", workers=1, tfidf_candidates=6, query_rank=4, per_token=True)
    assert (tmp_path / "one" / "candidate_sequences.parquet").exists()
    monkeypatch.setenv("WHENCE_CACHE", "off")
    monkeypatch.setattr(flows.corpus_pipeline, "MAX_CACHED_TERM_ENTRIES", -1)
    reads = {"candidates": 0, "gather": 0}

    def counted(name, function):
        return lambda *args: reads.__setitem__(name, reads[name] + 1) or function(*args)

    monkeypatch.setattr(flows.candidates, "run_candidates", counted("candidates", flows.candidates.run_candidates))
    monkeypatch.setattr(flows.corpus_pipeline, "gather_sequences",
                        counted("gather", flows.corpus_pipeline.gather_sequences))
    run_score(workspace, tmp_path / "two", workers=2, tfidf_candidates=6, query_rank=4, per_token=True)
    assert reads == {"candidates": 1, "gather": 1}
    monkeypatch.setattr(flows.corpus_pipeline, "MAX_STORED_TOKENS", 0)
    run_score(workspace, tmp_path / "again", workers=1, tfidf_candidates=6, query_rank=4, per_token=True)
    assert not (tmp_path / "again" / "candidate_sequences.parquet").exists() and reads["candidates"] == 2
    one = pq.read_table(tmp_path / "one" / "topk.parquet")
    for other in ("two", "again"):
        assert pq.read_table(tmp_path / "one" / "candidates.parquet").equals(
            pq.read_table(tmp_path / other / "candidates.parquet"))
        if not ON_GPU:
            assert pq.read_table(tmp_path / "one" / "tokens.parquet").equals(
                pq.read_table(tmp_path / other / "tokens.parquet"))
        table = pq.read_table(tmp_path / other / "topk.parquet")
        if ON_GPU:  # the same rows, scores equal up to the order of GPU reductions
            expected, got = one.to_pandas(), table.to_pandas()
            assert list(expected["doc_id"]) == list(got["doc_id"])
            np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-9, atol=1e-12)
        else:
            assert one.equals(table)
    assert len(one) == 5 * len(QUERIES)


@pytest.fixture(scope="module")
def calm_run(workspace, tmp_path_factory):
    """(summary, results directory) of one plain run (top_k=4, no fault): the bad-row counts of one test and
    the reference of the killed-actor test."""
    out = tmp_path_factory.mktemp("calm") / "results"
    return run_score(workspace, out, top_k=4), out


def test_bad_rows_are_counted_or_stop_a_strict_run(workspace, calm_run, tmp_path):
    summary, _ = calm_run
    assert summary["bad_rows"] == workspace["bad_rows"]
    reasons = summary["corpus"]["bad_by_reason"]
    assert reasons["duplicate id"] == 1 and reasons["missing field 'text'"] == 1
    with pytest.raises(CorpusError, match=r"a\.jsonl:11: invalid JSON"):
        run_score(workspace, tmp_path / "strict", strict=True)


def test_interrupted_run_resumes_and_other_arguments_are_refused(workspace, tmp_path):
    out = tmp_path / "run"
    run_score(workspace, out, top_k=3)
    reference = pq.read_table(out / "topk.parquet")
    parts = sorted((out / "parts").glob("topk-*.parquet"))
    assert len(parts) == 3, "one part per fragment"
    # An interruption after two of the three fragments: the last part and the outputs are missing, and the
    # run is still marked as running.
    parts[-1].unlink()
    (out / "topk.parquet").unlink()
    run_file = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_file, "status": "running"}))
    kept = {p: p.stat().st_mtime_ns for p in parts[:-1]}
    summary = run_score(workspace, out, top_k=3)
    assert pq.read_table(out / "topk.parquet").equals(reference)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items()), "finished parts are not redone"
    assert summary["sequences_scored"] > 0
    with pytest.raises(RunStateError, match="other arguments.*top_k"):
        run_score(workspace, out, top_k=4)
    run_score(workspace, out, top_k=4, overwrite=True)
    assert len(pq.read_table(out / "topk.parquet")) == 4 * len(QUERIES)


def test_a_killed_scoring_actor_does_not_change_the_results(workspace, calm_run, tmp_path):
    _, calm = calm_run
    marker = tmp_path / "died-once"
    run_score(workspace, tmp_path / "killed", top_k=4,
              actor_env={"WHENCE_FAULT_AFTER_BATCHES": f"1:{marker}"})
    assert marker.exists(), "the fault was injected"
    assert pq.read_table(tmp_path / "killed" / "topk.parquet").equals(pq.read_table(calm / "topk.parquet"))


def test_a_fit_that_cannot_fit_in_memory_is_refused_before_any_work(workspace, tmp_path):
    from flows.memory_check import InsufficientMemoryError

    out = tmp_path / "huge"
    # 10^7 sequences per batch: their logits alone need hundreds of GiB; batches of 4 would fit.
    with pytest.raises(InsufficientMemoryError, match=r"options that would fit: .*--batch-size 4"):
        fit_corpus(workspace["model"], [workspace["corpus"]], str(out), dataclasses.replace(FIT_CONFIG, batch_size=10**7),
                   ClusterSettings(workers=1, dtype="float64"))
    assert not (out / LAYERS_DIR).exists() and not (out / MANIFEST_FILE).exists()


@pytest.mark.skipif(ON_GPU, reason="a CUDA context adds memory that the CPU estimate does not model")
def test_the_memory_estimate_is_within_a_quarter_of_the_measured_peaks(workspace):
    # The tiny model's peaks are mostly the processes' baselines; the medium and 30-block shapes, where the sums
    # dominate, are measured by `whence bench --only memory` (flows.bench.memory).
    memory = Factors.load(workspace["factors"]).metadata["summary"]["memory"]
    for estimated, measured in zip(memory["estimate"]["actors"], memory["peak_rss"]["actors"], strict=True):
        assert abs(estimated - measured) <= MEMORY_ESTIMATE_TOLERANCE * measured
    # Over what the test process held when the fit began (earlier tests ran in it): no sums or factors.
    assert memory["peak_rss"]["driver"] - memory["peak_rss"]["driver_at_start"] <= 2**29, "the driver holds none"


MEMORY_ESTIMATE_TOLERANCE = 0.25
