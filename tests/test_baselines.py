"""`whence score --baseline METHOD`: other methods scored in the same pass as the run's, each into its own results
directory, equal to the core engine's scores by that method; a damaged baseline part is rescored on resume."""

import json

import pyarrow.parquet as pq
import pytest

from flows.cluster import ClusterSettings
from flows.score import score_corpus
from tests.pipeline_fixtures import QUERIES, copy_workspace
from whence import ScoreConfig, load_causal_lm, prepare, score
from whence.checksums import checksum_problem
from whence.corpus import CorpusSource
from whence.errors import SettingsError
from whence.factors import Factors
from whence.model import find_tracked_layers
from whence.results import BASELINES_DIR, load_results

SEQ_LEN = 16
BASELINES = ["identity", "kfac"]
TOP_K = 5


@pytest.fixture(scope="module")
def scored(tmp_path_factory, fitted_workspace):
    """The session's fitted workspace (conftest.fitted_workspace) scored by EK-FAC with two baselines, top TOP_K kept (the scorers
    send their batches' top-k only: whence.fragment_parts.reduce_to_top_k)."""
    root = tmp_path_factory.mktemp("baselines")
    space = copy_workspace(fitted_workspace, root)
    space["out"] = root / "results"
    space["config"] = ScoreConfig(top_k=TOP_K, tfidf_candidates=0, query_rank="full", batch_size=4,
                                  baselines=BASELINES)
    run_score(space)
    return space


def run_score(space):
    return score_corpus(space["model"], space["factors"], space["queries"], CorpusSource([space["corpus"]]),
                        str(space["out"]), space["config"], ClusterSettings(workers=2, dtype="float64"))


def engine_scores(space, method: str) -> dict:
    """(query id, doc id, chunk) -> the in-process API's score by `method`."""
    model, tokenizer = load_causal_lm(space["model"], device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    prepared = prepare(model, tokenizer, layers, Factors.load(space["factors"]), QUERIES,
                       ScoreConfig(query_rank="full", method=method))
    table = score(model, tokenizer, layers, prepared, space["documents"], ScoreConfig(seq_len=SEQ_LEN))
    return {(q["id"], d, int(c)): table.scores[i, j] for j, q in enumerate(QUERIES)
            for i, (d, c) in enumerate(zip(table.doc_ids, table.chunks))}


@pytest.mark.parametrize("method", ["ekfac", *BASELINES])
def test_each_method_of_the_pass_equals_the_core_engine(scored, method):
    directory = scored["out"] if method == "ekfac" else scored["out"] / BASELINES_DIR / method
    topk = pq.read_table(directory / "topk.parquet").to_pandas()
    expected = engine_scores(scored, method)
    for query in QUERIES:  # the TOP_K best of every sequence's scores, in order
        best = sorted((score for key, score in expected.items() if key[0] == query["id"]), reverse=True)[:TOP_K]
        rows = topk[topk.query_id == query["id"]].sort_values("rank")
        assert rows.score.tolist() == pytest.approx(best, rel=1e-9, abs=1e-12)
    for row in topk.itertuples():
        assert row.score == pytest.approx(expected[(row.query_id, row.doc_id, row.chunk)], rel=1e-9, abs=1e-12)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["method"] == method
    results = load_results(directory)  # a baseline's directory reads like any results directory (whence report)
    assert results.method == method
    assert sum(len(rows) for rows in results.influences.values()) == len(topk)


def test_the_methods_rank_differently(scored):
    """The baselines are not copies of the run's scores: identity's ranking differs from EK-FAC's."""
    ekfac = pq.read_table(scored["out"] / "topk.parquet").to_pandas()
    identity = pq.read_table(scored["out"] / BASELINES_DIR / "identity" / "topk.parquet").to_pandas()
    assert not ekfac["score"].equals(identity["score"])


def test_a_damaged_baseline_part_is_rescored_on_resume(scored):
    """Its fragment is scored again (the warning naming the part: tests/test_faults.py); results unchanged."""
    out = scored["out"]
    reference = {m: pq.read_table(out / BASELINES_DIR / m / "topk.parquet") for m in BASELINES}
    damaged = sorted((out / "parts").glob("baseline.kfac-*.parquet"))[0]
    damaged.write_bytes(b"not a parquet file")
    run_file = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_file, "status": "running"}))
    summary = run_score(scored)
    assert checksum_problem(damaged) is None, "the damaged fragment was scored again"
    assert 0 < summary["sequences_scored"]
    for method in BASELINES:
        assert pq.read_table(out / BASELINES_DIR / method / "topk.parquet").equals(reference[method])


@pytest.mark.parametrize("baselines, message", [(["lissa"], "must be among"), (["ekfac"], "not the scored method"),
                                                (["kfac", "kfac"], "each method once")])
def test_bad_baselines_are_settings_errors(baselines, message):
    with pytest.raises(SettingsError, match=message):
        ScoreConfig(baselines=baselines)
