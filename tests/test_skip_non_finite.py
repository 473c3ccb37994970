"""`--skip-non-finite`: a sequence whose activations hold NaN or inf is skipped and counted, not scored, while the
other sequences of its batch are scored as if it were not there; without the option it stops the run, named."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actors.scorer import RowScorer
from tests.pipeline_fixtures import OneBatchDataset
from tests.tiny import TEXTS, make_model, make_tokenizer
from whence.errors import NonFiniteError
from whence.fragment_parts import TOPK_PART, FragmentResults, part_non_finite, part_sequences
from whence.model import find_tracked_layers
from whence.queries import PreparedQueries
from whence.scoring import QueryScorer
from whence.text import iter_sequences

QUERY_IDS = ["q0", "q1"]


@pytest.fixture(scope="module")
def poisoned():
    """A tiny model whose embedding of one token is inf, a batch of sequences of which two hold that token, and a
    RowScorer factory."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    generator = torch.Generator().manual_seed(0)
    full = {layer.name: torch.randn(len(QUERY_IDS), layer.d_out, layer.d_in, generator=generator, dtype=torch.float64)
            for layer in layers}
    queries = PreparedQueries(QUERY_IDS, [layer.name for layer in layers], "full", {}, {}, full)
    sequences = list(iter_sequences(tokenizer, [(f"doc-{i}", t) for i, t in enumerate(TEXTS)], seq_len=12))[:8]
    # The poisoned token: the rarest among these sequences; the sequences that hold it are the bad ones.
    holders = {t: [i for i, s in enumerate(sequences) if t in s.input_ids] for s in sequences for t in s.input_ids}
    poison = min(holders, key=lambda t: (len(holders[t]), t))
    bad = holders[poison]
    assert 0 < len(bad) < len(sequences)
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("inf")
    batch = {"fragment": np.zeros(len(sequences) + 1, dtype=np.int64),
             "doc_id": np.asarray([s.doc_id for s in sequences] + ["marker"], dtype=object),
             "chunk": np.asarray([s.chunk for s in sequences] + [0], dtype=np.int64),
             "input_ids": np.asarray([np.asarray(s.input_ids) for s in sequences] + [np.zeros(0, dtype=np.int64)],
                                     dtype=object),
             "marker_total": np.asarray([-1] * len(sequences) + [len(sequences)], dtype=np.int64)}

    def scorer(skip: bool, rows_per_call: int = len(sequences), top_k: int | None = None) -> RowScorer:
        return RowScorer(QueryScorer(model, layers, queries), len(QUERY_IDS), len(layers), tokenizer.pad_token_id,
                         per_token=False, rows_per_call=rows_per_call, skip_non_finite=skip, top_k=top_k)

    return {"batch": batch, "bad": bad, "scorer": scorer, "labels": [f"{s.doc_id}#{s.chunk}" for s in sequences]}


def test_without_the_option_a_non_finite_sequence_stops_scoring_named(poisoned):
    with pytest.raises(NonFiniteError) as info:
        poisoned["scorer"](False)(poisoned["batch"])
    assert all(poisoned["labels"][i] in str(info.value) for i in poisoned["bad"])


def test_with_the_option_it_is_skipped_and_the_others_scored_as_without_it(poisoned):
    batch, bad = poisoned["batch"], poisoned["bad"]
    out = poisoned["scorer"](True)(batch)
    assert np.flatnonzero(out["non_finite"]).tolist() == bad
    good = [i for i in range(len(batch["doc_id"]) - 1) if i not in bad]
    alone = poisoned["scorer"](False)({name: values[good + [len(values) - 1]] for name, values in batch.items()})
    np.testing.assert_allclose(out["scores"][good], alone["scores"][: len(good)], rtol=1e-9, atol=1e-12)
    assert np.isfinite(out["scores"]).all()

    results = FragmentResults(0, QUERY_IDS, None, out["layer_scores"].shape[2], keep_all=False)
    results.add(out)
    assert results.complete, "a skipped sequence counts toward the fragment's completion"
    assert results.non_finite == [poisoned["labels"][i] for i in bad]
    written = {}
    results.write(lambda kind, index: written.setdefault(kind, poisoned["tmp"] / f"{kind}-{index}.parquet"))
    part = written[TOPK_PART]
    assert part_non_finite(part) == results.non_finite and part_sequences(part) == len(batch["doc_id"]) - 1
    table = pq.read_table(part).to_pandas()
    ranked = {f"{d}#{c}" for d, c in zip(table.doc_id, table.chunk)}
    assert not ranked & set(results.non_finite), "skipped sequences are not ranked"
    assert len(table) == len(QUERY_IDS) * len(good)


def test_a_batch_larger_than_a_slice_is_reduced_slice_by_slice_to_the_same_parts(poisoned, monkeypatch):
    """Ray Data may hand a scorer a whole fragment as one batch: with a top-k it is scored and reduced SLICE_ROWS
    rows at a time (here 3, so slices of 2 rows), each slice with its own tally, and the fragment's top-k part,
    counts and skipped sequences are those of the batch reduced at once."""
    import actors.scorer

    parts = {}
    for slice_rows in (10_000, 3):
        monkeypatch.setattr(actors.scorer, "SLICE_ROWS", slice_rows)
        out = poisoned["scorer"](True, rows_per_call=2, top_k=2)(poisoned["batch"])
        tallies = int(((out["query"] < 0) & (out["marker_total"] < 0) & (out["sequences"] > 0)).sum())
        results = FragmentResults(0, QUERY_IDS, 2, out["layer_scores"].shape[1], keep_all=False)
        results.add(out)
        assert results.complete
        written = {}
        results.write(lambda kind, index, s=slice_rows, w=written: w.setdefault(kind, poisoned["tmp"] / f"{s}-{kind}.pq"))
        parts[slice_rows] = (pq.read_table(written[TOPK_PART]), results.received, results.non_finite, tallies)
    (whole, *counts), (sliced, *sliced_counts) = parts[10_000], parts[3]
    assert sliced.equals(whole, check_metadata=True)
    assert sliced_counts[:2] == counts[:2] and counts[2] == 1 and sliced_counts[2] == 4  # 8 sequences, slices of 2


@pytest.fixture(autouse=True)
def _tmp(poisoned, tmp_path):
    poisoned["tmp"] = tmp_path


def test_a_fitting_actor_skips_and_names_non_finite_sequences(tmp_path):
    from actors.fitter import FitterActor
    from actors.hosting import ModelSpec

    tokenizer = make_tokenizer()
    make_model("llama", len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    sequences = list(iter_sequences(tokenizer, [(f"doc-{i}", t) for i, t in enumerate(TEXTS)], seq_len=12))[:8]
    holders = {t: [i for i, s in enumerate(sequences) if t in s.input_ids] for s in sequences for t in s.input_ids}
    poison = min(holders, key=lambda t: (len(holders[t]), t))
    good = [s for i, s in enumerate(sequences) if i not in holders[poison]]

    def actor(skip: bool) -> FitterActor:
        fitter = FitterActor(ModelSpec(str(tmp_path / "model"), "mlp", "float64"), "true", 1, 0, 8,
                             skip_non_finite=skip)
        with torch.no_grad():
            fitter.model.get_input_embeddings().weight[poison] = float("inf")
        return fitter

    names = [layer.name for layer in actor(False).layers]
    with pytest.raises(NonFiniteError, match="in sequences"):
        actor(False).covariance_pass(OneBatchDataset(sequences), names)
    skipping = actor(True)
    counts = skipping.covariance_pass(OneBatchDataset(sequences), names)
    assert counts["sequences"] == len(good)
    assert counts["non_finite"] == [f"{sequences[i].doc_id}#{sequences[i].chunk}" for i in holders[poison]]
    reference = actor(False)
    assert reference.covariance_pass(OneBatchDataset(good), names)["sequences"] == len(good)
    got, want = skipping.held["covariance"], reference.held["covariance"]
    assert got.tokens == want.tokens
    for name in names:  # the sums of the finite sequences alone
        for kind in ("activation", "gradient"):
            for g, w in zip(getattr(got, kind)[name], getattr(want, kind)[name]):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_the_finite_check_names_nan_and_inf_and_passes_sums_that_overflow():
    """check_finite_captures decides from each capture's sum first: a sum of finite values that overflows to inf
    passes (the exact check decides), and NaN or inf anywhere is named with its layer and batch rows."""
    from whence.model import TrackedLayer
    from whence.tracking import LayerCapture, check_finite_captures

    layers = [TrackedLayer(f"layer{i}", torch.nn.Linear(3, 2), 3, 2, False, 0) for i in range(2)]

    def captures():
        return [LayerCapture(torch.ones(4, 5, 3), torch.ones(4, 5, 2)) for _ in layers]

    huge = captures()
    huge[1].activations.fill_(3e38)  # finite, but their float32 sum is inf
    assert torch.isinf(huge[1].activations.sum())
    check_finite_captures(layers, huge)
    for bad, where in ((float("nan"), "activations"), (float("inf"), "activations"), (-float("inf"), "output grad")):
        poisoned = captures()
        values = poisoned[1].activations if where == "activations" else poisoned[0].output_grads
        values[2, 1, 0] = bad
        with pytest.raises(NonFiniteError, match=where) as found:
            check_finite_captures(layers, poisoned)
        assert found.value.rows == [2] and found.value.layer == ("layer1" if where == "activations" else "layer0")
