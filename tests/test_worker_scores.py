"""`whence score --save-all-scores` with the scorers writing every score themselves (whence.fragment_parts
.ScoresPieces): the driver receives only each batch's top-k, scores.parquet is that of the driver-written parts
and of the core engine, in corpus order, and a resume never trusts a damaged, missing or stale piece."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cluster import ClusterSettings
from flows.score import score_corpus
from tests.pipeline_fixtures import QUERIES, copy_workspace
from tests.test_faults_pipeline import Recorded
from whence import ScoreConfig, load_causal_lm, prepare, score
from whence.checksums import checksum_problem, sidecar
from whence.corpus import CorpusSource, id_hashes
from whence.errors import WhenceError
from whence.factors import Factors
from whence.fragment_parts import (
    PIECES_SUFFIX,
    FragmentResults,
    ScoresPieces,
    SequenceOrder,
    reduce_to_top_k,
)
from whence.model import find_tracked_layers
from whence.results import scores_table

SEQ_LEN = 16
TOP_K = 3
REL = 1e-9  # float64 on the CPU: the pipeline's scores and the in-process engine's agree to rounding


# ------------------------------------------------------------------------------------------- without Ray


def scored_rows(fragment: int, doc_ids: list[str], rng, queries: int = 2, marker: int | None = None) -> dict:
    """A RowScorer output batch: a row per sequence of `fragment` (chunk 0 each), then optionally its marker."""
    n = len(doc_ids)
    layer_scores = rng.normal(size=(n, queries, 2))
    batch = {"fragment": np.full(n, fragment), "doc_id": np.asarray(doc_ids, object), "chunk": np.zeros(n, np.int64),
             "marker_total": np.full(n, -1), "scores": layer_scores.sum(axis=2), "layer_scores": layer_scores,
             "non_finite": np.asarray([i == 1 for i in range(n)]), "num_tokens": np.full(n, 5)}
    if marker is not None:
        row = {"fragment": [fragment], "doc_id": [""], "chunk": [-1], "marker_total": [marker],
               "scores": np.zeros((1, queries)), "layer_scores": np.zeros((1, queries, 2)), "non_finite": [False],
               "num_tokens": [0]}
        batch = {name: np.concatenate([values, np.asarray(row[name], values.dtype)]) for name, values in batch.items()}
    return batch


def test_pieces_joined_in_corpus_order_equal_the_driver_written_part(tmp_path):
    """Three batches of one fragment arriving out of order: the pieces the scorers write, joined by the driver,
    equal the scores part the driver writes from every row arriving in order; a damaged piece is named."""
    rng = np.random.default_rng(0)
    documents = [f"doc{i:02d}" for i in range(9)][::-1]  # line order is not the ids' order
    batches = [scored_rows(4, documents[0:3], rng), scored_rows(4, documents[3:7], rng),
               scored_rows(4, documents[7:9], rng, marker=9)]
    order = SequenceOrder({4: id_hashes(documents)})
    pieces = ScoresPieces(str(tmp_path / "pieces"), ("q0", "q1"))
    reduced = FragmentResults(4, ["q0", "q1"], 2, 2, keep_all=False, order=order)
    for batch in (batches[2], batches[0], batches[1]):  # the order they arrive in
        pieces.write(batch)
        reduced.add(reduce_to_top_k(batch, 2))
    assert reduced.complete
    joined = lambda kind, index: tmp_path / "joined" / f"{kind}-{index:06d}.parquet"  # noqa: E731
    (tmp_path / "joined").mkdir()
    assert reduced.write(joined, pieces) is None
    assert not pieces.fragment_directory(4).exists(), "joined pieces are removed"

    rows = FragmentResults(4, ["q0", "q1"], 2, 2, keep_all=True)
    for batch in batches:
        rows.add(batch)
    driver = lambda kind, index: tmp_path / f"driver-{kind}.parquet"  # noqa: E731
    rows.write(driver)
    for kind in ("scores", "topk"):
        assert pq.read_table(joined(kind, 4)).equals(pq.read_table(driver(kind, 0))), kind
        assert checksum_problem(joined(kind, 4)) is None

    pieces.write(batches[0])
    too_few = pieces.join(4, [(documents[0], 0)], tmp_path / "again.parquet", rows=2 * 7)  # 7 of 9 not skipped
    assert too_few.endswith("its pieces hold 4 scores, not 14") and not (tmp_path / "again.parquet").exists()
    damaged = pieces.piece_path(4, documents[0], 0)
    damaged.write_bytes(damaged.read_bytes()[:-9])
    problem = pieces.join(4, [(documents[0], 0)], tmp_path / "again.parquet")
    assert problem.startswith(f"{damaged}: checksum mismatch") and not (tmp_path / "again.parquet").exists()


# ---------------------------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, fitted_workspace):
    return copy_workspace(fitted_workspace, tmp_path_factory.mktemp("worker-scores"))


def run_score(space, out, workers=1, top_k=TOP_K, actor_env=None):
    config = ScoreConfig(top_k=top_k, tfidf_candidates=0, query_rank="full", batch_size=4, save_all_scores=True)
    return score_corpus(space["model"], space["factors"], space["queries"], CorpusSource([space["corpus"]]),
                        str(out), config, ClusterSettings(workers=workers, dtype="float64",
                                                          actor_env=actor_env or {}))


@pytest.fixture(scope="module")
def pieces_run(workspace, tmp_path_factory):
    """(results directory, the batches the driver took: per fragment of a batch, its columns and entry rows) of a
    run on two workers whose scorers wrote every score."""
    out = tmp_path_factory.mktemp("pieces") / "results"
    taken, add = [], FragmentResults.add

    def recorded(self, batch):
        taken.append({"columns": set(batch), "entries": int((batch["query"] >= 0).sum()) if "query" in batch
                      else None, "sequences": int(batch["sequences"].sum()) if "sequences" in batch else None})
        return add(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FragmentResults, "add", recorded)
        summary = run_score(workspace, out, workers=2)
    return out, taken, summary


def engine_table(space):
    model, tokenizer = load_causal_lm(space["model"], device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    prepared = prepare(model, tokenizer, layers, Factors.load(space["factors"]), QUERIES,
                       ScoreConfig(query_rank="full"))
    return score(model, tokenizer, layers, prepared, space["documents"], ScoreConfig(seq_len=SEQ_LEN))


def test_worker_written_scores_equal_the_driver_path_and_the_core_engine(workspace, pieces_run, tmp_path):
    out, _, _ = pieces_run
    scores = pq.read_table(out / "scores.parquet")
    assert not list((out / "parts").glob(f"*{PIECES_SUFFIX}")), "every fragment's pieces were joined"
    assert all(checksum_problem(path) is None for path in (out / "parts").glob("scores-*.parquet"))
    # --top-k all: every score reaches the driver, which writes the parts from its rows (one worker).
    run_score(workspace, tmp_path / "driver", top_k=None)
    assert scores.equals(pq.read_table(tmp_path / "driver" / "scores.parquet"))

    table = engine_table(workspace)
    corpus_order = [(str(d), int(c)) for d, c in zip(table.doc_ids, table.chunks)]
    frame = scores.to_pandas()
    for j, query in enumerate(QUERIES):  # each query's rows: every sequence once, in corpus order
        rows = frame[frame.query_id == query["id"]]
        assert list(zip(rows.doc_id, rows.chunk.astype(int))) == corpus_order
        np.testing.assert_allclose(rows.score.to_numpy(), table.scores[:, j], rtol=REL, atol=1e-12)


def test_the_driver_receives_only_reduced_rows(pieces_run):
    _, taken, summary = pieces_run
    assert taken and all("scores" not in batch["columns"] and "query" in batch["columns"] for batch in taken)
    assert max(batch["entries"] for batch in taken) <= TOP_K * len(QUERIES), "at most k entries per query"
    assert sum(batch["sequences"] for batch in taken) == summary["sequences_scored"]


def unfinished(out) -> None:
    """As if the driver had been killed before the end: run.json says running, no topk.parquet or scores.parquet."""
    run_file = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_file, "status": "running"}))
    (out / "topk.parquet").unlink()
    (out / "scores.parquet").unlink()


def copy_of(pieces_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pieces_run[0], out)
    return out


def test_a_damaged_or_missing_piece_leaves_its_fragment_to_score_again(workspace, pieces_run, tmp_path,
                                                                      monkeypatch):
    reference, out = pieces_run[0], copy_of(pieces_run, tmp_path)
    unfinished(out)
    for fragment in (1, 2):  # unfinished: scored again by the next run
        for kind in ("topk", "scores"):
            path = out / "parts" / f"{kind}-{fragment:06d}.parquet"
            path.unlink()
            sidecar(path).unlink()
    kept = (out / "parts" / "topk-000000.parquet").stat().st_mtime_ns
    join = ScoresPieces.join

    def harmed(self, fragment, keys, target, rows=None):  # the driver finds a piece damaged (1) or gone (2)
        path = self.piece_path(fragment, *keys[-1])
        if fragment == 1:
            path.write_bytes(path.read_bytes()[:-9])
        else:
            path.unlink()
        return join(self, fragment, keys, target, rows)

    monkeypatch.setattr(ScoresPieces, "join", harmed)
    warnings = Recorded()
    logging.getLogger("whence.score").addHandler(warnings)
    try:
        with pytest.raises(WhenceError, match=r"fragments \[1, 2\] did not complete"):
            run_score(workspace, out)
    finally:
        logging.getLogger("whence.score").removeHandler(warnings)
    assert any("checksum mismatch" in line and "fragment 1 is left unfinished" in line for line in warnings.lines)
    assert any(": missing; fragment 2 is left unfinished" in line for line in warnings.lines), warnings.lines
    assert not (out / "parts" / "topk-000001.parquet").exists() and not (out / "parts" / "topk-000002.parquet").exists()
    monkeypatch.setattr(ScoresPieces, "join", join)
    summary = run_score(workspace, out)
    assert summary["sequences_scored"] == pieces_run[2]["sequences_scored"]
    assert (out / "parts" / "topk-000000.parquet").stat().st_mtime_ns == kept, "a finished fragment is kept"
    for name in ("scores.parquet", "topk.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(reference / name)), name


def test_an_interrupted_runs_pieces_are_never_joined_with_a_resumed_one(workspace, pieces_run, tmp_path):
    """Fragment 1 interrupted with pieces on disk (one under the key this run writes again, one under a key it
    does not); the resume scores it again, with a scoring actor killed once, and the results are unchanged."""
    reference, out = pieces_run[0], copy_of(pieces_run, tmp_path)
    unfinished(out)
    for kind in ("topk", "scores"):
        (out / "parts" / f"{kind}-000001.parquet").unlink()
    pieces = ScoresPieces(str(out / "parts"), tuple(q["id"] for q in QUERIES))
    bogus = scores_table({"query_id": ["whale"], "doc_id": ["doc10"], "chunk": [0], "score": [1e9]})
    stale = [pieces.piece_path(1, "doc10", 0), pieces.piece_path(1, "gone", 7)]  # doc10: fragment 1's first
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(bogus, path)
    marker = tmp_path / "died-once"
    run_score(workspace, out, actor_env={"WHENCE_FAULT_AFTER_BATCHES": f"1:{marker}"})
    assert marker.exists(), "the fault was injected"
    assert not any(path.exists() for path in stale) and not pieces.fragment_directory(1).exists()
    for name in ("scores.parquet", "topk.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(reference / name)), name
