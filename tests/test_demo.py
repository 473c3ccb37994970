"""`whence demo` on a slice of the bundled corpus with a tiny model: outputs exist and agree with each other."""

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from flows.cli import main
from flows.demo import ASSETS, STAGES, identity_results
from tests.tiny import make_model, make_tokenizer


def test_demo_on_a_corpus_slice(tmp_path, ray_cluster, capsys, monkeypatch):
    monkeypatch.setenv("WHENCE_CACHE", str(tmp_path / "cache"))
    tokenizer = make_tokenizer(300)
    model = make_model("llama", len(tokenizer), hidden=32, context=512, dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--model", str(tmp_path / "model"), "--docs", "25",
                 "--fit-sequences", "120", "--candidates", "25", "--seq-len", "96"])
    assert code == 0
    printed = capsys.readouterr().out
    queries = [json.loads(line) for line in open(ASSETS / "queries.jsonl")]

    topk = pq.read_table(out / "results" / "topk.parquet").to_pandas()
    assert set(topk.query_id) == {q["id"] for q in queries}
    for _, group in topk.groupby("query_id"):
        assert list(group["rank"]) == list(range(1, len(group) + 1))
        assert (np.diff(group["score"].to_numpy()) <= 0).all(), "top-k sorted by descending score"
    np.testing.assert_allclose([sum(s) for s in topk.layer_scores], topk.score, rtol=1e-6, atol=1e-6)

    tokens = pq.read_table(out / "results" / "tokens.parquet").to_pandas()
    merged = tokens.merge(topk, on=["query_id", "rank", "doc_id", "chunk"])
    assert len(merged) == len(topk), "every top-k sequence has per-token scores"
    scale = np.abs(merged["score"]).max()
    np.testing.assert_allclose([sum(s) for s in merged.token_scores], merged.score, rtol=1e-4, atol=1e-6 * scale)

    report = (out / "results" / "report.html").read_text()
    for query in queries:
        assert query["id"] in report
        assert f"{query['id']}:" in printed, "the terminal shows each query's top documents"
    summary = json.loads((out / "demo_summary.json").read_text())
    assert {row["query"] for row in summary["verbatim"]} == {q["id"] for q in queries if q["kind"] in ("verbatim", "flipped")}
    assert all(set(row) >= {"ekfac_rank", "tfidf_rank", "identity_rank"} for row in summary["verbatim"])
    assert "report:" in printed
    # A line per stage with its seconds, in the terminal and in demo_summary.json.
    assert list(summary["stage_seconds"]) == list(STAGES)
    assert all(isinstance(summary["stage_seconds"][stage], float) for stage in STAGES)
    for stage in STAGES:
        assert f"   {stage} " in printed
    # The corpus is scanned once: the fit and the scoring run reuse the scan; the identity baseline is scored in
    # the EK-FAC run's pass, on the same candidates, into a results directory of its own.
    assert json.loads((out / "results" / "manifest.json").read_text())["summary"]["timings"]["scan_cached"] is True
    identity = pq.read_table(identity_results(out) / "topk.parquet").to_pandas()
    assert set(identity.query_id) == set(topk.query_id)
    candidates = pq.read_table(out / "results" / "candidates.parquet").to_pandas()
    assert set(zip(identity.doc_id, identity.chunk)) <= set(zip(candidates.doc_id, candidates.chunk))
    assert json.loads((identity_results(out) / "manifest.json").read_text())["method"] == "identity"
    assert json.loads((out / "factors" / "manifest.json").read_text())["summary"]["scan_cached"] is True
    assert len(list((tmp_path / "cache" / "scans").glob("*.pkl"))) == 1

    # A second run reuses every finished stage.
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "model"), "--docs", "25",
                 "--fit-sequences", "120", "--candidates", "25", "--seq-len", "96"]) == 0
