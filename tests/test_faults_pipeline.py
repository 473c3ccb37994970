"""`whence score` on Ray under faults: changed inputs refuse a resume, damaged files are redone, NaN is an error.

The pieces are tested without Ray in tests/test_faults.py.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.cluster import ClusterSettings
from flows.fit import fit_corpus
from flows.score import score_corpus
from tests.pipeline_fixtures import copy_workspace
from whence import FitConfig, ScoreConfig
from whence.checksums import checksum_problem
from whence.corpus import CorpusSource
from whence.errors import NonFiniteError, RunStateError
from whence.model import load_causal_lm

SCORE_CONFIG = ScoreConfig(top_k=3, tfidf_candidates=0, query_rank="full", batch_size=4)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, fitted_workspace):
    return copy_workspace(fitted_workspace, tmp_path_factory.mktemp("faults"))


def run_score(space, out, factors=None, queries=None, model=None, overwrite=False):
    return score_corpus(model or space["model"], factors or space["factors"], queries or space["queries"],
                        CorpusSource([space["corpus"]]), str(out), SCORE_CONFIG, ClusterSettings(dtype="float64"),
                        overwrite=overwrite)


def mark_unfinished(out) -> None:
    """As if the driver had been killed before the end: run.json still says running, no topk.parquet."""
    run_file = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_file, "status": "running"}))
    (out / "topk.parquet").unlink()


def test_changed_inputs_refuse_the_resume_and_unchanged_ones_resume(workspace, tmp_path):
    queries, factors, out = tmp_path / "queries.jsonl", tmp_path / "factors", tmp_path / "run"
    shutil.copyfile(workspace["queries"], queries)
    shutil.copytree(workspace["factors"], factors)
    run_score(workspace, out, factors=str(factors), queries=str(queries))
    reference = pq.read_table(out / "topk.parquet")
    parts = sorted((out / "parts").glob("topk-*.parquet"))
    kept = {p: p.stat().st_mtime_ns for p in parts}
    mark_unfinished(out)
    run_score(workspace, out, factors=str(factors), queries=str(queries))  # unchanged: resumed, nothing rescored
    assert pq.read_table(out / "topk.parquet").equals(reference)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())

    mark_unfinished(out)
    original = queries.read_text()
    queries.write_text("".join(reversed(original.splitlines(keepends=True))))  # edited in place: lines reordered
    with pytest.raises(RunStateError, match=r"differing: queries_sha256"):
        run_score(workspace, out, factors=str(factors), queries=str(queries))
    queries.write_text(original)

    # The factors refitted in place with --overwrite (another seed): old parts must not be mixed with new.
    fit_corpus(workspace["model"], [workspace["corpus"]], str(factors), FitConfig(seq_len=16, batch_size=4, seed=1),
               ClusterSettings(dtype="float64"), overwrite=True)
    with pytest.raises(RunStateError, match=r"differing: factors_fingerprint"):
        run_score(workspace, out, factors=str(factors), queries=str(queries))


def test_damaged_parts_and_queries_are_redone_and_topk_carries_the_predicted_change(workspace, tmp_path):
    out = tmp_path / "run"
    run_score(workspace, out)
    reference = pq.read_table(out / "topk.parquet")
    sequences = json.loads((workspace["root"] / "factors" / "manifest.json").read_text())["sequences"]
    assert json.loads((out / "manifest.json").read_text())["fisher_sequences"] == sequences > 0
    np.testing.assert_array_equal(reference.column("predicted_change").to_numpy(),
                                  reference.column("score").to_numpy() / sequences)

    part = sorted((out / "parts").glob("topk-*.parquet"))[1]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    queries = out / "queries.safetensors"
    queries.write_bytes(queries.read_bytes()[:-64])
    mark_unfinished(out)
    warnings = Recorded()
    logging.getLogger("whence.score").addHandler(warnings)
    try:
        run_score(workspace, out)
    finally:
        logging.getLogger("whence.score").removeHandler(warnings)
    assert checksum_problem(part) is None and checksum_problem(queries) is None, "both written again"
    assert pq.read_table(out / "topk.parquet").equals(reference), "redone, the results are the same"
    assert any(f"{part}: checksum mismatch" in line for line in warnings.lines), warnings.lines
    assert any(f"{queries}: checksum mismatch" in line and "preparing the queries again" in line
               for line in warnings.lines), warnings.lines


class Recorded(logging.Handler):
    """The warnings a logger emits, as formatted lines."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_nan_weight_stops_scoring_with_the_parameter_named(workspace, tmp_path):
    model, tokenizer = load_causal_lm(workspace["model"], device="cpu", dtype="float32")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.view(-1)[7] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"parameter model\.layers\.0\.mlp\.up_proj\.weight .* 1 NaN"):
        run_score(workspace, out, model=str(tmp_path / "model"))
    assert not (out / "topk.parquet").exists() and not (out / "queries.safetensors").exists()
