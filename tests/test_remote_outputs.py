"""Factors and indexes on an object store: `whence fit` and `whence index` write to s3:// (any pyarrow filesystem)
and `whence score`, `whence query` and `whence.Index.open` read from it.

The store is an S3 server on loopback (moto's), reached by the Ray actors as a cluster's workers reach S3 or GCS:
each owner of a layer writes its factors straight into the bucket, each indexer its shards.
"""

from __future__ import annotations

import json
import pickle

import pyarrow.fs as pafs
import pytest
import torch

from tests.pipeline_fixtures import FIT_CONFIG, copy_workspace
from whence.errors import SettingsError
from whence.factor_files import FACTOR_FILES, FactorsDamagedError, read_manifest
from whence.factors import Factors
from whence.storage import Location

SECRET = "not-a-real-secret"


@pytest.fixture(scope="module")
def s3():
    """uri(key) -> an s3:// URI of `key` in a fresh bucket, with the server's endpoint and credentials."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    filesystem, _ = pafs.FileSystem.from_uri(f"s3://test:{SECRET}@whence?{options}&allow_bucket_creation=true")
    filesystem.create_dir("whence")
    yield lambda key: f"s3://test:{SECRET}@whence/{key}?{options}"
    server.stop()


def test_a_location_on_s3_reads_writes_lists_and_hides_its_credentials(s3):
    from whence.checksums import checksum_problem, write_checksum

    root = Location.of(s3("plain"))
    assert not root.exists() and root.children() == []
    (root / "a" / "b.txt").write_text("hello")
    assert (root / "a" / "b.txt").read_text() == "hello" and (root / "a").is_dir()
    assert [child.name for child in root.children()] == ["a"]
    checksum = (root / "a" / "c.bin").write_through(lambda local: open(local, "wb").write(b"\x00" * 10))
    file = pickle.loads(pickle.dumps(root / "a" / "c.bin"))  # as an actor receives it
    assert file.read_bytes() == b"\x00" * 10 and file.sha256() == checksum
    write_checksum(file, checksum)
    assert checksum_problem(file) is None
    file.write_bytes(b"\x01" * 10)
    assert "checksum mismatch" in checksum_problem(file)
    assert SECRET not in str(file) and str(file).startswith("s3://REDACTED@whence/plain/a/c.bin")
    root.remove()
    assert not (root / "a" / "b.txt").exists()


def test_factors_saved_to_s3_load_as_saved_and_damage_is_named(s3, fitted_workspace):
    local = Factors.load(fitted_workspace["factors"])
    remote = s3("saved")
    local.save(remote)
    loaded = Factors.load(remote)
    for name in local.layer_names:
        assert torch.equal(loaded.eigenvalues[name], local.eigenvalues[name])
        for kept, read in zip(local.bases[name].gradient_vectors, loaded.bases[name].gradient_vectors):
            assert torch.equal(kept, read)
    record = read_manifest(remote)[FACTOR_FILES][local.layer_names[0]]["lambda"]
    (Location.of(remote) / record["file"]).write_bytes(b"truncated")
    with pytest.raises(FactorsDamagedError, match="s3://REDACTED@whence/saved/layers/") as raised:
        Factors.load(remote)
    assert SECRET not in str(raised.value)


def fitted_to(out: str, space: dict) -> dict:
    from flows.cluster import ClusterSettings
    from flows.fit import fit_corpus

    return fit_corpus(space["model"], [space["corpus"]], out, FIT_CONFIG, ClusterSettings(workers=2, dtype="float64"))


def test_a_fit_writes_its_factors_to_s3_as_to_a_disk_and_resumes_there(s3, fitted_workspace, tmp_path):
    """2 workers' owners write the layers into the bucket: the files are those of the same fit on a local disk,
    byte for byte (the manifests' checksums). An interrupted fit missing one layer's file rewrites only that."""
    space = copy_workspace({k: fitted_workspace[k] for k in ("model", "corpus")}, tmp_path)
    out = s3("fit")
    fitted_to(out, space)
    records = read_manifest(out)[FACTOR_FILES]
    assert records == read_manifest(fitted_workspace["factors"])[FACTOR_FILES]
    assert SECRET not in (Location.of(out) / "run.json").read_text() + (Location.of(out) / "manifest.json").read_text()

    # Interrupted before the last layer's correction was written: run.json still says "running".
    directory, last = Location.of(out), list(records)[-1]
    run = json.loads((directory / "run.json").read_text())
    (directory / "run.json").write_text(json.dumps({**run, "status": "running"}))
    (directory / records[last]["lambda"]["file"]).remove()
    kept = {name: (directory / r["basis"]["file"]).info().mtime_ns for name, r in records.items()}
    fitted_to(out, space)
    assert read_manifest(out)[FACTOR_FILES] == records
    assert {name: (directory / r["basis"]["file"]).info().mtime_ns for name, r in records.items()} == kept


def test_an_index_on_s3_built_from_factors_on_s3_answers_as_exact_scoring(s3, fitted_workspace, tmp_path):
    """At a dimension that keeps every direction the index's scores are EK-FAC's (tests/test_index.py), up to
    float32 storage; here
    its factors, projections and shards are all in the bucket, and `Index.open` reads them from there."""
    import numpy as np

    import whence
    from flows.cluster import ClusterSettings
    from flows.index import build_index
    from tests.pipeline_fixtures import QUERIES
    from whence.index.config import IndexConfig
    from whence.index.shards import SHARDS_DIR

    factors, out = s3("index-factors"), s3("index")
    Factors.load(fitted_workspace["factors"]).save(factors, manifest=read_manifest(fitted_workspace["factors"]))
    build_index(fitted_workspace["model"], factors, [fitted_workspace["corpus"]], out,
                IndexConfig(dim=10_000, dtype="float32", batch_size=4), ClusterSettings(workers=1, dtype="float64"))
    assert [child.name for child in (Location.of(out) / SHARDS_DIR).children()][:3] == [
        "shard-000000-0000.safetensors", "shard-000000-0000.safetensors.sha256", "shard-000000.json"]
    with pytest.raises(SettingsError, match="credentials were redacted"):  # never written, so given again
        whence.Index.open(out, dtype="float64")
    index = whence.Index.open(out, factors=factors, dtype="float64")
    found = index.query(QUERIES, top_k=None)

    model, tokenizer = whence.load_causal_lm(fitted_workspace["model"], dtype="float64")
    layers = whence.find_tracked_layers(model, "mlp")
    prepared = whence.prepare(model, tokenizer, layers, Factors.load(factors), QUERIES)
    exact = whence.score(model, tokenizer, layers, prepared, fitted_workspace["documents"], seq_len=FIT_CONFIG.seq_len)
    for query in QUERIES:
        top = found.top(query["id"], 5)
        expected = exact.top(query["id"], 5)
        assert [(r["doc_id"], r["chunk"]) for r in top] == [(r["doc_id"], r["chunk"]) for r in expected]
        np.testing.assert_allclose([r["score"] for r in top], [r["score"] for r in expected], rtol=1e-6)

    # `whence query` over the same shards, as Ray tasks that read them from the bucket.
    from flows.cli import main
    from whence.results import load_results

    assert main(["query", "--index", out, "--factors", factors, "--queries", fitted_workspace["queries"],
                 "--out", str(tmp_path / "query"), "--top-k", "5", "--tfidf-candidates", "0",
                 "--dtype", "float64"]) == 0
    results = load_results(tmp_path / "query")
    for query in QUERIES:
        assert [(r.doc_id, r.chunk) for r in results.top(query["id"])] == [
            (r["doc_id"], r["chunk"]) for r in found.top(query["id"], 5)]
    assert SECRET not in (tmp_path / "query" / "manifest.json").read_text()


def test_an_unreachable_bucket_is_a_clear_error(s3, fitted_workspace, capsys):
    from flows.cli import main

    out = s3("x").replace("@whence/", "@no-such-bucket/")
    code = main(["fit", "--model", fitted_workspace["model"], "--corpus", fitted_workspace["corpus"], "--out", out,
                 "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "@no-such-bucket/x" in err and SECRET not in err
