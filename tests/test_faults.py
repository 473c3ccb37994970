"""Faults cost time, never results, and never leave a NaN: changed inputs, damaged files, non-finite values.

In-process checks of the pieces (fingerprints, checksums, finiteness checks, the predicted_change column);
tests/test_faults_pipeline.py runs the same faults through `whence score` on Ray.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows.fit import fit_corpus
from tests.pipeline_fixtures import OneBatchDataset
from tests.tiny import TEXTS, make_model, make_tokenizer
from whence import FitConfig
from whence.api import sequence_batches
from whence.checksums import checksum_problem, sidecar, write_checksum
from whence.errors import ModelError, NonFiniteError
from whence.fingerprints import corpus_fingerprint, factors_fingerprint, queries_fingerprint
from whence.fragment_parts import SCORES_PART, TOPK_PART, FragmentResults, verified_parts
from whence.model import check_finite_checkpoint, find_tracked_layers, load_causal_lm, model_fingerprint
from whence.queries import PreparedQueries
from whence.results import FISHER_SEQUENCES, MANIFEST_FILE, TOPK_FILE, load_results
from whence.scoring import check_finite_queries, check_finite_scores, prepared_queries_problem
from whence.task import LanguageModelingTask
from whence.text import Query, iter_sequences
from whence.tracking import LayerTracker

QUERY_IDS = ["q0", "q1"]
NUM_LAYERS = 2
# bfloat16's largest finite value is about 3.4e38; weights scaled by this overflow the forward pass.
BF16_OVERFLOW_SCALE = 1e30


# ------------------------------------------------------------------------------------------ fingerprints


def test_queries_fingerprint_follows_content_and_order():
    queries = [Query("a", "The whale", " swam"), Query("b", "A fox", " jumps")]
    same = [Query("a", "The whale", " swam"), Query("b", "A fox", " jumps")]
    assert queries_fingerprint(queries) == queries_fingerprint(same)
    assert queries_fingerprint(queries[::-1]) != queries_fingerprint(queries), "reordered"
    assert queries_fingerprint([queries[0], Query("b", "A fox", " runs")]) != queries_fingerprint(queries)


def test_factors_and_corpus_fingerprints_change_when_the_files_are_rewritten(tmp_path):
    factors = tmp_path / "factors"
    factors.mkdir()
    (factors / "manifest.json").write_text('{"strategy": "ekfac"}')
    (factors / "factors.safetensors").write_bytes(b"x" * 100)
    before = factors_fingerprint(factors)
    assert factors_fingerprint(factors) == before
    (factors / "factors.safetensors").write_bytes(b"y" * 101)  # a refit in place
    assert factors_fingerprint(factors) != before

    corpus = tmp_path / "a.jsonl"
    corpus.write_text('{"id": "d", "text": "one"}\n')
    first = corpus_fingerprint([str(corpus)])
    stat = corpus.stat()
    corpus.write_text('{"id": "d", "text": "two"}\n')
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert corpus_fingerprint([str(corpus)]) != first


# ------------------------------------------------------------------------------------------ damaged files


def _write_fragment(part_path, fragment: int, sequences: int = 4) -> None:
    rng = np.random.default_rng(fragment)
    n = sequences + 1
    results = FragmentResults(fragment, QUERY_IDS, 3, NUM_LAYERS, keep_all=True)
    results.add({"fragment": np.full(n, fragment), "doc_id": np.asarray([f"d{fragment}-{i}" for i in range(n)], object),
                 "chunk": np.zeros(n, dtype=np.int64), "marker_total": np.asarray([-1] * sequences + [sequences]),
                 "scores": rng.normal(size=(n, 2)), "layer_scores": rng.normal(size=(n, 2, NUM_LAYERS))})
    results.write(part_path)


def test_damaged_parts_are_named_and_left_to_score_again(tmp_path, caplog):
    part_path = lambda kind, index: tmp_path / f"{kind}-{index:06d}.parquet"  # noqa: E731
    for fragment in range(3):
        _write_fragment(part_path, fragment)
    finished = {i: part_path(TOPK_PART, i) for i in range(3)}
    assert verified_parts(finished, part_path, with_scores=True) == finished
    data = finished[1].read_bytes()
    finished[1].write_bytes(data[: len(data) // 2])  # truncated
    scores = part_path(SCORES_PART, 2).read_bytes()
    part_path(SCORES_PART, 2).write_bytes(scores[:100] + bytes([scores[100] ^ 1]) + scores[101:])  # one bit flipped
    with caplog.at_level(logging.WARNING, logger="whence.score"):
        kept = verified_parts(finished, part_path, with_scores=True)
    assert kept == {0: finished[0]}
    assert "topk-000001.parquet: checksum mismatch" in caplog.text
    assert "scores-000002.parquet: checksum mismatch" in caplog.text
    for fragment in (1, 2):  # removed with their sidecars: the fragment counts as unfinished
        assert not part_path(TOPK_PART, fragment).exists() and not sidecar(part_path(TOPK_PART, fragment)).exists()
        assert not part_path(SCORES_PART, fragment).exists()


def test_a_part_without_its_checksum_is_not_trusted(tmp_path):
    path = tmp_path / "topk-000000.parquet"
    pq.write_table(pa.table({"x": [1]}), path)
    assert checksum_problem(path).startswith("no checksum")
    write_checksum(path)
    assert checksum_problem(path) is None


def _prepared(values: torch.Tensor, ids=QUERY_IDS) -> PreparedQueries:
    return PreparedQueries(list(ids), ["layer"], "full", {}, {}, {"layer": values})


def test_damaged_or_foreign_prepared_queries_are_detected(tmp_path):
    path = tmp_path / "queries.safetensors"
    _prepared(torch.ones(2, 3, 4, dtype=torch.float64)).save(path)
    write_checksum(path)
    assert prepared_queries_problem(path, QUERY_IDS) == (None, False)
    problem, stale = prepared_queries_problem(path, QUERY_IDS[::-1])
    assert "made for other queries" in problem and stale
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    problem, stale = prepared_queries_problem(path, QUERY_IDS)
    assert "checksum mismatch" in problem and not stale


def test_a_resume_prepares_damaged_or_foreign_queries_again(tmp_path, caplog):
    from types import SimpleNamespace

    from flows.score_checks import discard_damaged_queries

    path = tmp_path / "queries.safetensors"
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "topk-000000.parquet").write_bytes(b"scored against the file's queries")
    run = SimpleNamespace(queries_file=path, queries_files=[path], query_ids=QUERY_IDS,
                          state=SimpleNamespace(path=tmp_path))
    _prepared(torch.ones(2, 3, 4, dtype=torch.float64)).save(path)
    write_checksum(path)
    discard_damaged_queries(run)
    assert path.exists(), "intact and these queries: kept"
    path.write_bytes(path.read_bytes()[:-8])
    with caplog.at_level(logging.WARNING, logger="whence.score"):
        discard_damaged_queries(run)
    assert f"{path}: checksum mismatch" in caplog.text and "preparing the queries again" in caplog.text
    assert not path.exists() and not sidecar(path).exists()
    assert (tmp_path / "parts").exists(), "parts scored against the same queries stand"
    _prepared(torch.ones(2, 3, 4, dtype=torch.float64), ids=["other", "ids"]).save(path)
    write_checksum(path)
    discard_damaged_queries(run)
    assert not path.exists() and not (tmp_path / "parts").exists(), "parts scored against other queries go too"


# ------------------------------------------------------------------------------------------ NaN and inf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), dtype=torch.float32)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_nan_weight_is_named_when_the_model_loads(model_dir, tmp_path):
    model, tokenizer = load_causal_lm(str(model_dir), device="cpu", dtype="float32")
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name][3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(NonFiniteError, match=rf"parameter {name} .* 1 NaN and 0 infinite"):
        load_causal_lm(str(tmp_path), device="cpu", dtype="float32")
    with pytest.raises(NonFiniteError, match=rf"model\.safetensors: parameter {name} .* 1 NaN"):
        check_finite_checkpoint(str(tmp_path))  # on the driver, without loading the model
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "d", "text": TEXTS[0]}) + "\n")
    with pytest.raises(NonFiniteError, match=rf"parameter {name}"):  # before any Ray work: no cluster here
        fit_corpus(str(tmp_path), [str(corpus)], str(tmp_path / "factors"), FitConfig(seq_len=16))
    assert not (tmp_path / "factors").exists()


def test_the_checkpoint_check_reads_tensors_a_chunk_at_a_time(model_dir, tmp_path, monkeypatch):
    """Chunks of 24 bytes (6 float32 values): NaNs and infs in a tensor's first, middle and last chunks are all
    counted, and a truncated file is a ModelError naming it."""
    import whence.model

    model, tokenizer = load_causal_lm(str(model_dir), device="cpu", dtype="float32")
    name = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        flat = dict(model.named_parameters())[name].view(-1)
        flat[0], flat[flat.numel() // 2], flat[-1] = float("nan"), float("inf"), float("-inf")
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(whence.model, "CHECK_CHUNK_BYTES", 24)
    check_finite_checkpoint(str(model_dir))  # finite: no error, chunk by chunk
    with pytest.raises(NonFiniteError, match=rf"parameter {name} .* 1 NaN and 2 infinite"):
        check_finite_checkpoint(str(tmp_path))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(ModelError, match="model.safetensors: the file ends inside a tensor"):
        check_finite_checkpoint(str(truncated))


def test_the_fingerprint_covers_every_element(model_dir):
    model, _ = load_causal_lm(str(model_dir), device="cpu", dtype="float32")
    before = model_fingerprint(model)
    again, _ = load_causal_lm(str(model_dir), device="cpu", dtype="float64")
    assert model_fingerprint(again) == before, "float32 weights loaded as float64 keep their fingerprint"
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.view(-1)[1] += 1e-7  # an odd index: the old sample skipped it
    assert model_fingerprint(model) != before


def _capture(model, tokenizer, layers):
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS[:3]), seq_len=16))[:3]
    (_, batch), = list(sequence_batches(tokenizer, sequences, batch_size=3))
    task = LanguageModelingTask()
    return LayerTracker(layers).capture(model, batch, task.sequence_log_likelihood, task.forward)


def test_non_finite_activations_name_the_layer_and_rows():
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    _capture(model, tokenizer, layers)  # finite: no error
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("inf")
    # gate_proj's output is inf, so the first tracked input holding it is down_proj's (its input: act(gate) * up).
    expected = r"activations of layer model\.layers\.1\.mlp\.down_proj \(batch rows \[0, 1, 2\]\)"
    with pytest.raises(NonFiniteError, match=expected) as info:
        _capture(model, tokenizer, layers)
    named = info.value.naming(["doc-a#0", "doc-b#0", "doc-c#1"])
    assert "in sequences doc-a#0, doc-b#0, doc-c#1" in str(named)
    assert str(pickle.loads(pickle.dumps(named))) == str(named) and pickle.loads(pickle.dumps(named)).rows == [0, 1, 2]


def test_a_fitting_actor_names_the_sequences_of_a_non_finite_batch(model_dir):
    from actors.fitter import FitterActor
    from actors.hosting import ModelSpec

    actor = FitterActor(ModelSpec(str(model_dir), "mlp", "float32"), "true", 1, 0, 4)
    names = [layer.name for layer in actor.layers]
    sequences = [s for s in iter_sequences(actor.tokenizer, [(f"doc-{i}", t) for i, t in enumerate(TEXTS[:3])],
                                           seq_len=16)][:3]
    assert actor.covariance_pass(OneBatchDataset(sequences), names)["sequences"] == 3  # finite: counted
    with torch.no_grad():
        actor.model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("inf")
    labels = ", ".join(f"{s.doc_id}#{s.chunk}" for s in sequences)
    with pytest.raises(NonFiniteError, match=rf"down_proj .* in sequences {labels}"):
        actor.covariance_pass(OneBatchDataset(sequences), names)


def test_a_bfloat16_overflow_is_an_error_not_nan():
    tokenizer = make_tokenizer()
    model = make_model("gpt2", len(tokenizer), dtype=torch.bfloat16)
    layers = find_tracked_layers(model, "mlp")
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(BF16_OVERFLOW_SCALE)
            block.mlp.c_proj.weight.mul_(BF16_OVERFLOW_SCALE)
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the weights themselves are finite"
    with pytest.raises(NonFiniteError, match=r"overflows its dtype"):
        _capture(model, tokenizer, layers)


def test_non_finite_queries_and_scores_are_errors():
    values = torch.ones(2, 3, 4, dtype=torch.float64)
    check_finite_queries(_prepared(values))
    values[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"queries 'q1' hold NaN or inf at layer layer"):
        check_finite_queries(_prepared(values))
    scores = torch.zeros(2, 5, 3, dtype=torch.float64)  # (Q, B, L)
    check_finite_scores(scores, QUERY_IDS, ["l0", "l1", "l2"])
    scores[0, 3, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"query 'q0' at layer l2") as info:
        check_finite_scores(scores, QUERY_IDS, ["l0", "l1", "l2"])
    assert info.value.rows == [3]


# ------------------------------------------------------------------------------------------ interpretable scores


def test_old_results_directories_read_predicted_change_from_the_manifest(tmp_path: Path):
    rows = {"query_id": ["q"], "rank": [1], "doc_id": ["d"], "chunk": [0], "score": [40.0],
            "layer_scores": [[30.0, 10.0]]}
    pq.write_table(pa.table(rows), tmp_path / TOPK_FILE)  # no predicted_change column (written before it)
    manifest = {"layers": ["a", "b"], "queries": [{"id": "q", "prompt": "p", "completion": "c"}]}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert load_results(tmp_path).top("q")[0].predicted_change is None
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**manifest, FISHER_SEQUENCES: 1000}))
    results = load_results(tmp_path)
    assert results.fisher_sequences == 1000
    assert results.top("q")[0].predicted_change == 40.0 / 1000
