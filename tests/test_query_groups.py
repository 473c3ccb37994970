"""`whence score --query-batch N`: the queries scored in groups, one pass each, give the results of all queries at
once (top-k, per-token scores, every score, baselines), and a group's actors hold only its queries."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch

from flows.cluster import ClusterSettings
from flows.query_groups import QueryGroup, plan_groups
from flows.score import score_corpus
from tests.pipeline_fixtures import copy_workspace
from whence import ScoreConfig
from whence.corpus import CorpusSource
from whence.queries import PreparedQueries, bytes_per_query
from whence.results import BASELINES_DIR


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, fitted_workspace):
    return copy_workspace(fitted_workspace, tmp_path_factory.mktemp("groups"))


def run_score(space, out, **settings):
    config = ScoreConfig(top_k=4, tfidf_candidates=0, query_rank="full", batch_size=4, per_token=True,
                         save_all_scores=True, baselines=["identity"], **settings)
    return score_corpus(space["model"], space["factors"], space["queries"], CorpusSource([space["corpus"]]),
                        str(out), config, ClusterSettings(dtype="float64"))


def test_groups_of_queries_give_the_results_of_all_at_once(workspace, tmp_path):
    together = run_score(workspace, tmp_path / "together")
    apart = run_score(workspace, tmp_path / "apart", query_batch=2)
    assert together["query_groups"] == [[0, 3]] and apart["query_groups"] == [[0, 2], [2, 3]]
    assert apart["sequences_scored"] == together["sequences_scored"]
    for name, column in (("topk.parquet", "score"), ("tokens.parquet", "token_scores"),
                         (f"{BASELINES_DIR}/identity/topk.parquet", "score")):
        a, b = pq.read_table(tmp_path / "apart" / name), pq.read_table(tmp_path / "together" / name)
        assert a.select(["query_id", "doc_id", "chunk"]).equals(b.select(["query_id", "doc_id", "chunk"])), name
        values = [pa.compute.list_flatten(t.column(column)) if column == "token_scores" else t.column(column)
                  for t in (a, b)]
        assert values[0].to_pylist() == pytest.approx(values[1].to_pylist(), rel=1e-9, abs=1e-12), name
    key = ["query_id", "doc_id", "chunk"]
    scores = [pq.read_table(tmp_path / d / "scores.parquet").to_pandas().sort_values(key).reset_index(drop=True)
              for d in ("apart", "together")]
    assert scores[0][key].equals(scores[1][key])
    assert scores[0].score.tolist() == pytest.approx(scores[1].score.tolist(), rel=1e-9, abs=1e-12)


def test_a_group_loads_only_its_queries_and_groups_fit_the_budget(tmp_path, monkeypatch):
    full = {"layer": torch.randn(5, 3, 4, dtype=torch.float64)}
    path = tmp_path / "queries.safetensors"
    PreparedQueries([f"q{i}" for i in range(5)], ["layer"], "full", {}, {}, full).save(path)
    group = PreparedQueries.load(path, queries=(2, 4))
    assert group.query_ids == ["q2", "q3"] and torch.equal(group.full["layer"], full["layer"][2:4])
    assert bytes_per_query(path) == 3 * 4 * 8
    assert [g.range for g in plan_groups(5, 2, path, 1, 1)] == [(0, 2), (2, 4), (4, 5)]
    # A node of 3,072 bytes, 2 actors: a quarter of each one's half is 384 bytes, two queries of 96 bytes x 2 copies.
    monkeypatch.setattr("flows.query_groups._largest_node_memory", lambda: 3072)
    groups = plan_groups(5, None, path, copies=2, workers=2)
    assert [g.range for g in groups] == [(0, 2), (2, 4), (4, 5)] and not any(g.only for g in groups)
    assert plan_groups(5, 10, path, 1, 1) == [QueryGroup(0, 5, True)]
