"""The gradient index (whence.index, `whence index`, `whence query`): exact when nothing is truncated, the same
top-k for any number of workers, resumable, and refused against other factors or another model."""

import numpy as np
import pytest
import torch

from tests.references import per_sequence_gradients
from tests.tiny import TEXTS
from whence import FitConfig, fit
from whence.index import GradientCompressor, build_projections, score_shard
from whence.index.projection import DEFAULT_DIMS, random_projection
from whence.model import find_tracked_layers
from whence.queries import factors_for_method, query_gradients
from whence.task import LanguageModelingTask
from whence.text import Query, iter_sequences

FLOAT64 = dict(atol=1e-10, rtol=1e-8)
QUERIES = [Query("whale", "The whale swam far", " beyond the harbour"), Query("ishmael", "Call me", " Ishmael."),
           Query("fox", "A quick brown", " fox jumps")]
EVERY_DIMENSION = 10_000  # larger than any tiny layer's d_in and d_out: nothing truncated


@pytest.fixture
def fitted(tokenizer):
    from tests.tiny import make_model

    model = make_model("llama", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, enumerate(TEXTS), FitConfig(seq_len=12))
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS), 12))
    return model, layers, factors, sequences


def dense_scores(model, tokenizer, layers, factors, sequences, method):
    """(Q, N) sum_l <P_l(grad f(q)), dW_n> from dense per-sequence gradients (the definition)."""
    train = per_sequence_gradients(model, tokenizer, layers, sequences,
                                   objective=LanguageModelingTask().sequence_log_likelihood)
    grads = query_gradients(model, tokenizer, layers, QUERIES)
    preconditioner = factors_for_method(factors, method)
    return sum(preconditioner.precondition(layer.name, grads[layer.name]).flatten(1) @ train[layer.name].T
               for layer in layers)


def index_scores(model, tokenizer, layers, projections, factors, sequences, method, batch_size=3):
    shard = GradientCompressor(model, tokenizer, layers, projections).shard(0, sequences, batch_size)
    prepared = projections.prepare(query_gradients(model, tokenizer, layers, QUERIES), factors, method)
    return score_shard(shard, prepared, projections.layout())


@pytest.mark.parametrize(("kind", "method"), [("eigen", "ekfac"), ("eigen", "identity"), ("eigen", "kfac"),
                                              ("lambda", "ekfac"), ("lambda", "kfac"),
                                              ("random", "ekfac"), ("random", "diagonal"),
                                              ("lowrank", "ekfac"), ("lowrank", "diagonal")])
def test_an_untruncated_index_gives_the_exact_scores(fitted, tokenizer, kind, method):
    model, layers, factors, sequences = fitted
    if method == "diagonal":  # the random kind preconditions the full gradient: any derivable method
        from whence.factors import Factors

        factors = Factors("diagonal", factors.layers, dict.fromkeys(factors.layer_names), factors.eigenvalues,
                          factors.metadata)
    expected = dense_scores(model, tokenizer, layers, factors, sequences, method)
    projections = build_projections(factors if kind in ("random", "lowrank") else fitted[2], kind, EVERY_DIMENSION,
                                    seed=3)
    scored = index_scores(model, tokenizer, layers, projections, factors, sequences, method)
    torch.testing.assert_close(torch.from_numpy(scored.scores.T), expected, **FLOAT64)
    np.testing.assert_allclose(scored.layer_scores.sum(axis=2), scored.scores, rtol=1e-12)


def test_a_truncated_index_ranks_like_the_exact_scores(fitted, tokenizer):
    from scipy.stats import spearmanr

    model, layers, factors, sequences = fitted
    expected = dense_scores(model, tokenizer, layers, factors, sequences, "ekfac").numpy()
    projections = build_projections(factors, "eigen", 12)  # of d_in 16 / 32 and d_out 32 / 16
    scored = index_scores(model, tokenizer, layers, projections, factors, sequences, "ekfac").scores.T
    rho = np.mean([spearmanr(scored[q], expected[q]).statistic for q in range(len(QUERIES))])
    assert 0.8 < rho < 1.0 - 1e-9  # close, and not the exact scores: something was truncated


def test_the_lambda_projection_keeps_the_largest_corrected_eigenvalues(fitted, tokenizer):
    """K = 3 keeps the 9 coordinates of largest Lambda of each layer, wherever they lie, and its rows are those
    coordinates of the untruncated rows (Q_S^T dW Q_A at (i, j))."""
    model, layers, factors, sequences = fitted
    every = build_projections(factors, "eigen", EVERY_DIMENSION)
    kept = build_projections(factors, "lambda", 3)
    full = GradientCompressor(model, tokenizer, layers, every).shard(0, sequences, 4).gradients  # (N, width)
    rows = GradientCompressor(model, tokenizer, layers, kept).shard(0, sequences, 4).gradients
    assert kept.width == 9 * len(layers)
    for layer, whole, start, whole_start in zip(kept.layers, every.layers, kept.offsets, every.offsets):
        lam = factors.eigenvalues[layer.name]  # (d_out, d_in) in basis order
        # Where each kept pair lies in the full (d_out, d_in) grid of eigen-coordinates.
        i = layer.output_index[layer.pairs // layer.input.shape[0]]
        j = layer.input_index[layer.pairs % layer.input.shape[0]]
        assert sorted(lam[i, j].tolist()) == sorted(lam.flatten().topk(9).values.tolist())
        # The untruncated eigen rows put (i, j) at i * d_in + j (its bases' columns sorted by eigenvalue).
        position = {int(c): n for n, c in enumerate(whole.input_index)}, {int(r): n for n, r in enumerate(whole.output_index)}
        flat = torch.tensor([position[1][int(r)] * whole.input.shape[0] + position[0][int(c)] for r, c in zip(i, j)])
        torch.testing.assert_close(rows[:, start : start + 9], full[:, whole_start + flat], rtol=1e-4, atol=1e-6)


def test_the_lowrank_rows_are_each_gradients_truncated_svd(fitted, tokenizer):
    """Rank r keeps L R with L R the best rank-r approximation of each sequence's dW (its r largest singular
    triplets, as torch.linalg.svd of the dense gradient gives them), and the index scores <P(grad f(q)), L R>."""
    model, layers, factors, sequences = fitted
    rank = 3
    assert build_projections(factors, "lowrank").dim == DEFAULT_DIMS["lowrank"] == 20, "the kind's default"
    projections = build_projections(factors, "lowrank", rank)
    rows = GradientCompressor(model, tokenizer, layers, projections).shard(0, sequences, 4).gradients  # (N, width)
    train = per_sequence_gradients(model, tokenizer, layers, sequences,
                                   objective=LanguageModelingTask().sequence_log_likelihood)
    grads = query_gradients(model, tokenizer, layers, QUERIES)
    expected = 0
    for layer, block in zip(projections.layers, projections.layout()):
        d_out, d_in = layer.d_out, layer.d_in
        assert (layer.k_out, layer.k_in, layer.width) == (rank, rank, rank * (d_out + d_in))
        stored = rows[:, block.stored[0] : block.stored[1]]
        low = stored[:, : rank * d_out].view(-1, rank, d_out).transpose(1, 2) @ stored[:, rank * d_out :].view(-1, rank, d_in)
        u, sigma, vh = torch.linalg.svd(train[layer.name].view(-1, d_out, d_in))
        best = (u[:, :, :rank] * sigma[:, None, :rank]) @ vh[:, :rank]  # (N, d_out, d_in)
        torch.testing.assert_close(low, best, atol=1e-8 * float(sigma.max()), rtol=0)
        assert float((train[layer.name].view(-1, d_out, d_in) - best).abs().max()) > 1e-6  # something was dropped
        expected = expected + factors.precondition(layer.name, grads[layer.name]).flatten(1) @ best.flatten(1).T
    scored = index_scores(model, tokenizer, layers, projections, factors, sequences, "ekfac")
    torch.testing.assert_close(torch.from_numpy(scored.scores.T), expected, **FLOAT64)


def test_a_lowrank_search_at_a_query_rank_scores_the_queries_truncated_svd(fitted, tokenizer):
    """At query rank s each preconditioned query meets the stored factors as its rank-s SVD factors (what `whence
    score --query-rank s` takes): the score is <X_q,s, L R> with X_q,s the best rank-s approximation of X_q, and at
    s >= min(d_out, d_in) it is the whole matrix's score. Query rows and layout of other ranks are refused."""
    from whence.errors import SettingsError
    from whence.queries import low_rank

    model, layers, factors, sequences = fitted
    projections = build_projections(factors, "lowrank", 3)
    shard = GradientCompressor(model, tokenizer, layers, projections).shard(0, sequences, 4)
    gradients = query_gradients(model, tokenizer, layers, QUERIES)
    whole = projections.prepare(gradients, factors)
    full = score_shard(shard, whole, projections.layout()).scores
    untruncated = projections.prepare(gradients, factors, query_rank=EVERY_DIMENSION)
    assert untruncated.shape[1] < whole.shape[1] * 2, "factors: s (d_out + d_in) values a layer"
    np.testing.assert_allclose(score_shard(shard, untruncated, projections.layout(EVERY_DIMENSION)).scores, full,
                               **FLOAT64)
    rank = 2
    truncated = score_shard(shard, projections.prepare(gradients, factors, query_rank=rank), projections.layout(rank))
    expected = 0
    for layer, block in zip(projections.layers, projections.layout()):
        assert layer.query_rank_of(rank) == rank < min(layer.d_out, layer.d_in)
        left, right = low_rank(factors.precondition(layer.name, gradients[layer.name]), rank)  # (Q, s, d_out), (Q, s, d_in)
        best = left.transpose(1, 2) @ right  # (Q, d_out, d_in): the rank-s approximation of each query
        expected = expected + block.scores(shard.gradients[:, slice(*block.stored)], best.flatten(1))
    np.testing.assert_allclose(truncated.scores, expected.numpy(), **FLOAT64)
    assert np.abs(truncated.scores - full).max() > 1e-6 * np.abs(full).max(), "rank 2 dropped something"
    with pytest.raises(SettingsError, match="same query rank") as refused:
        score_shard(shard, whole, projections.layout(rank))
    assert refused.value.setting == "query_rank"


def test_a_bfloat16_search_ranks_as_the_float32_one(fitted, tokenizer):
    from scipy.stats import spearmanr

    from whence.errors import SettingsError

    model, layers, factors, sequences = fitted
    projections = build_projections(factors, "lowrank", 4)
    shard = GradientCompressor(model, tokenizer, layers, projections).shard(0, sequences, 4)
    gradients = query_gradients(model, tokenizer, layers, QUERIES)
    for rank in ("full", 3):  # the whole preconditioned queries, and their factors (summed in float32)
        prepared = projections.prepare(gradients, factors, query_rank=rank)
        wide, narrow = (score_shard(shard, prepared, projections.layout(rank), compute=c).scores
                        for c in ("float32", "bfloat16"))
        assert not np.array_equal(wide, narrow), "the products ran in bfloat16"
        np.testing.assert_allclose(narrow, wide, rtol=0, atol=0.02 * np.abs(wide).max())
        assert min(spearmanr(narrow[:, q], wide[:, q]).statistic for q in range(len(QUERIES))) > 0.99
    with pytest.raises(SettingsError, match="search dtype"):
        score_shard(shard, prepared, projections.layout(rank), compute="int8")
    from flows.query import QuerySettings

    with pytest.raises(SettingsError, match="search dtype") as refused:  # `whence query`'s, before any loading
        QuerySettings(search_dtype="float16")
    assert refused.value.setting == "search_dtype"


def test_auto_searches_in_bfloat16_only_where_the_hardware_has_it(fitted, tokenizer, monkeypatch):
    """`whence query`'s default --search-dtype auto: float64 query rows keep float64 (the exact score); float32
    rows take bfloat16 on a device that multiplies it natively, float32 on one that does not."""
    from whence.index import search

    model, layers, factors, sequences = fitted
    projections = build_projections(factors, "lowrank", 4)
    shard = GradientCompressor(model, tokenizer, layers, projections).shard(0, sequences, 4)
    prepared = projections.prepare(query_gradients(model, tokenizer, layers, QUERIES), factors)
    exact = score_shard(shard, prepared, projections.layout()).scores
    np.testing.assert_array_equal(score_shard(shard, prepared, projections.layout(), compute="auto").scores, exact)
    rows = prepared.float()
    by_dtype = {c: score_shard(shard, rows, projections.layout(), compute=c).scores for c in ("float32", "bfloat16")}
    for native in (True, False):
        monkeypatch.setattr(search, "native_bfloat16", lambda device, native=native: native)
        np.testing.assert_array_equal(score_shard(shard, rows, projections.layout(), compute="auto").scores,
                                      by_dtype["bfloat16" if native else "float32"])


@pytest.mark.parametrize("kind", ["eigen", "random", "lowrank"])
def test_float32_query_rows_are_the_float64_ones_rounded(fitted, tokenizer, kind):
    """Index.prepare of a float32 model preconditions in float32 (half the time of float64): its rows are
    float32 and agree with the float64 preparation to float32's precision, far inside the index's error."""
    model, layers, factors, _ = fitted
    projections = build_projections(factors, kind, 4)
    gradients = query_gradients(model, tokenizer, layers, QUERIES)
    wide = projections.prepare(gradients, factors)
    narrow = projections.prepare(gradients, factors, dtype=torch.float32)
    assert wide.dtype == torch.float64 and narrow.dtype == torch.float32
    torch.testing.assert_close(narrow.double(), wide, rtol=0, atol=1e-5 * float(wide.abs().max()))


def test_random_projections_are_seeded_and_unbiased():
    first, again, other = (random_projection(40, 8, seed, "layer/input") for seed in (1, 1, 2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    torch.testing.assert_close(first @ first.T, torch.eye(8, dtype=torch.float64) * 5.0)  # sqrt(d/k) rows
    mean = sum(random_projection(6, 2, seed, "k").T @ random_projection(6, 2, seed, "k") for seed in range(2000))
    torch.testing.assert_close(mean / 2000, torch.eye(6, dtype=torch.float64), atol=0.1, rtol=0)


@pytest.mark.parametrize("kind", ["eigen", "lowrank"])
def test_the_batch_size_does_not_change_the_rows(fitted, tokenizer, kind):
    model, layers, factors, sequences = fitted
    projections = build_projections(factors, kind, 4)
    compressor = GradientCompressor(model, tokenizer, layers, projections)
    one, five = (compressor.shard(0, sequences, size).gradients for size in (1, 5))
    torch.testing.assert_close(one, five, **FLOAT64)


def test_parts_cut_the_rows_in_order_whatever_the_batch_size(fitted, tokenizer):
    model, layers, factors, sequences = fitted
    compressor = GradientCompressor(model, tokenizer, layers, build_projections(factors, "lowrank", 4))
    whole = compressor.shard(0, sequences, 4)
    for batch_size, rows_per_part in ((4, 3), (2, 4), (5, 1)):
        parts = list(compressor.parts(0, sequences, batch_size, rows_per_part=rows_per_part))
        assert [p.num_sequences for p in parts[:-1]] == [rows_per_part] * (len(parts) - 1)
        assert 1 <= parts[-1].num_sequences <= rows_per_part
        assert [d for p in parts for d in p.doc_ids] == whole.doc_ids
        torch.testing.assert_close(torch.cat([p.gradients for p in parts]), whole.gradients, **FLOAT64)
    assert [p.num_sequences for p in compressor.parts(0, [], 4, rows_per_part=3)] == [0]
    assert list(compressor.parts(0, [], 4, rows_per_part=3, empty_part=False)) == []


def test_a_damaged_part_is_redone_with_the_parts_after_it(fitted, tokenizer, tmp_path):
    from whence.index.shards import (
        finished_parts,
        finished_shards,
        part_path,
        record_path,
        write_part,
        write_record,
    )

    model, layers, factors, sequences = fitted
    compressor = GradientCompressor(model, tokenizer, layers, build_projections(factors, "lowrank", 4))
    parts = list(compressor.parts(5, sequences, 4, "float32", rows_per_part=2))
    assert len(parts) >= 3
    for i, part in enumerate(parts):
        write_part(tmp_path, part, i, "float32")
    write_record(tmp_path, 5, [p.num_sequences for p in parts])
    assert finished_shards(tmp_path, [5])[5] == [(part_path(tmp_path, 5, i).name, p.num_sequences)
                                                for i, p in enumerate(parts)]
    damaged = part_path(tmp_path, 5, 1).local
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    assert finished_shards(tmp_path, [5]) == {}, "a fragment with a damaged part is not finished"
    assert not record_path(tmp_path, 5).exists()
    assert [part_path(tmp_path, 5, i).exists() for i in range(len(parts))] == [True] + [False] * (len(parts) - 1)
    assert finished_parts(tmp_path, 5) == [parts[0].num_sequences], "indexing resumes after part 0"


def test_rows_are_rounded_to_the_storage_dtype_as_made_and_an_overflow_is_an_error(fitted, tokenizer, tmp_path):
    from whence.errors import WhenceError
    from whence.index import write_shard

    model, layers, factors, sequences = fitted
    compressor = GradientCompressor(model, tokenizer, layers, build_projections(factors, "lowrank", 4))
    wide = compressor.shard(0, sequences, 4)
    narrow = compressor.shard(0, sequences, 4, "float16")
    assert narrow.gradients.dtype == torch.float16
    torch.testing.assert_close(narrow.gradients, wide.gradients.to(torch.float16), rtol=0, atol=0)
    compressor.compress = lambda batch: torch.full((len(batch["input_ids"]), compressor.projections.width), 1e6)
    with pytest.raises(WhenceError, match="fragment 7: compressed gradients overflow"):
        compressor.shard(7, sequences, 4, "float16")
    with pytest.raises(WhenceError, match="fragment 7: compressed gradients overflow float16"):
        write_shard(tmp_path, compressor.shard(7, sequences, 4), "float16")


# ---------------------------------------------------------------------------------------------------------
# `whence index` and `whence query` on Ray (one small workspace: three fragments, bad rows, a duplicate id)

SEQ_LEN = 16
INDEX_CONFIG = dict(dim=8, dtype="float32", batch_size=4)


def write_factors(space, directory, seed=0):
    """Factors fitted in process on the workspace's documents and saved as `whence fit` saves them."""
    from whence import load_causal_lm

    model, tokenizer = load_causal_lm(space["model"], device="cpu", dtype="float64")
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, space["documents"], FitConfig(seq_len=SEQ_LEN, batch_size=4, seed=seed))
    factors.save(directory)
    return str(directory)


def build(space, out, workers=1, overwrite=False, actor_env=None, **config):
    from flows.cluster import ClusterSettings
    from flows.index import build_index
    from whence.index.config import IndexConfig

    return build_index(space["model"], space["factors"], [space["corpus"]], str(out),
                       IndexConfig(**{**INDEX_CONFIG, **config}),
                       ClusterSettings(workers=workers, dtype="float64", actor_env=actor_env or {}),
                       overwrite=overwrite)


def run_query(index_dir, space, out, workers=1, rescore=0, **config):
    from flows.cluster import ClusterSettings
    from flows.query import QuerySettings, query_index
    from whence import ScoreConfig

    return query_index(str(index_dir), space["queries"], str(out),
                       ScoreConfig(**{"top_k": 5, "tfidf_candidates": 0, **config}),
                       ClusterSettings(workers=workers, dtype="float64"), inputs=QuerySettings(rescore=rescore))


def shard_contents(path):
    """A shard's fragment, keys and rows (its file's bytes vary: safetensors writes metadata in hash order)."""
    from whence.index import read_shard

    shard = read_shard(path)
    return shard.fragment, shard.doc_ids, shard.chunks.tolist(), shard.gradients.numpy().tobytes()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, ray_cluster):
    from tests.pipeline_fixtures import write_workspace

    root = tmp_path_factory.mktemp("index")
    space = write_workspace(root)
    space["factors"] = write_factors(space, root / "factors")
    build(space, root / "index-1")
    build(space, root / "index-2", workers=2)
    space["root"] = root
    return space


def test_one_and_two_workers_write_identical_shards_and_top_k(indexed, tmp_path):
    import pyarrow.parquet as pq

    root = indexed["root"]
    one, two = (sorted((root / f"index-{w}" / "shards").glob("*.safetensors")) for w in (1, 2))
    assert len(one) == 3, "one shard per fragment"
    assert [shard_contents(p) for p in one] == [shard_contents(p) for p in two]
    run_query(root / "index-1", indexed, tmp_path / "q1")
    run_query(root / "index-2", indexed, tmp_path / "q2", workers=2)
    first, second = (pq.read_table(tmp_path / name / "topk.parquet") for name in ("q1", "q2"))
    assert first.num_rows == 5 * 3 and first.equals(second)


def test_an_interrupted_build_resumes_and_other_arguments_are_refused(indexed, tmp_path):
    import json
    import shutil

    from whence.errors import RunStateError

    out = tmp_path / "index"
    shutil.copytree(indexed["root"] / "index-1", out)
    shards = sorted((out / "shards").glob("*.safetensors"))
    reference = [shard_contents(p) for p in shards]
    # Interrupted after two of three fragments: the last shard and the manifest missing, the run still running.
    shards[-1].unlink()
    (out / "manifest.json").unlink()
    run_file = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_file, "status": "running"}))
    kept = [p.stat().st_mtime_ns for p in shards[:-1]]
    summary = build(indexed, out)
    assert [shard_contents(p) for p in shards] == reference
    assert [p.stat().st_mtime_ns for p in shards[:-1]] == kept, "finished shards are not redone"
    assert summary["sequences"] == build(indexed, indexed["root"] / "index-1")["sequences"]
    with pytest.raises(RunStateError, match="other arguments.*dim"):
        build(indexed, out, dim=4)


def fragment_rows(index_dir):
    """fragment -> (doc ids, chunks, rows) of its whole shard, its parts concatenated in order."""
    import json

    from whence.index import read_shard

    rows = {}
    for record in sorted((index_dir / "shards").glob("shard-*.json")):
        parts = [read_shard(index_dir / "shards" / p["file"]) for p in json.loads(record.read_text())["parts"]]
        rows[parts[0].fragment] = ([d for p in parts for d in p.doc_ids], [int(c) for p in parts for c in p.chunks],
                                   torch.cat([p.gradients for p in parts]))
    return rows


@pytest.fixture(scope="module")
def parted(indexed):
    """The workspace's index built with --part-size 3: several part files a fragment."""
    out = indexed["root"] / "index-parted"
    build(indexed, out, part_size=3)
    return out


def test_a_fragment_written_in_parts_holds_the_same_rows_and_answers_the_same(indexed, parted, tmp_path):
    """--part-size 3: each fragment's shard in several part files (an actor holds one part at a time), the
    same rows in the same order as one file a fragment, and the same top-k (in process and over Ray tasks)."""
    import json

    import pyarrow.parquet as pq

    whole = indexed["root"] / "index-1"
    manifest = json.loads((parted / "manifest.json").read_text())
    assert manifest["part_size"] == 3
    assert sum(len(parts) for parts in manifest["shards"].values()) > 3, "some fragment took several parts"
    assert all(rows <= 3 for parts in manifest["shards"].values() for _, rows in parts)
    expected, found = fragment_rows(whole), fragment_rows(parted)
    assert expected.keys() == found.keys()
    for fragment, (doc_ids, chunks, rows) in expected.items():
        assert found[fragment][:2] == (doc_ids, chunks)
        assert torch.equal(found[fragment][2], rows)
    run_query(whole, indexed, tmp_path / "whole")
    for workers in (1, 2):  # in process, and one Ray task a part
        run_query(parted, indexed, tmp_path / f"p{workers}", workers=workers)
        assert_same_ranking(pq.read_table(tmp_path / f"p{workers}" / "topk.parquet"),
                            pq.read_table(tmp_path / "whole" / "topk.parquet"))


def assert_same_ranking(found, expected, rtol=1e-12):
    """The same top-k up to the last bits of the products. The rows are the same, but a matrix product's result
    for a row may depend on how many rows it multiplies at once (the CPU's GEMM kernels pick their blocking by
    shape: seen with AVX-512, not with AVX2), and a shard cut into 3-row parts multiplies 3 rows at a time. So
    scores agree to rtol, and two rows may trade places only where their scores tie to rtol."""
    found, expected = found.to_pylist(), expected.to_pylist()
    assert len(found) == len(expected)
    for i, (a, b) in enumerate(zip(found, expected)):
        assert (a["query_id"], a["rank"]) == (b["query_id"], b["rank"])
        assert a["score"] == pytest.approx(b["score"], rel=rtol, abs=0)
        if (a["doc_id"], a["chunk"]) == (b["doc_id"], b["chunk"]):
            scale = np.abs(b["layer_scores"]).max()  # a layer's score near 0 keeps its terms' rounding
            assert np.allclose(a["layer_scores"], b["layer_scores"], rtol=rtol, atol=rtol * scale), i
        else:  # a tie: the row stands at a score that other rows of the query share
            tied = {(r["doc_id"], r["chunk"]) for r in expected
                    if r["query_id"] == a["query_id"] and r["score"] == pytest.approx(a["score"], rel=rtol, abs=0)}
            assert len(tied) > 1 and (a["doc_id"], a["chunk"]) in tied, i


def test_a_fragment_interrupted_between_parts_resumes_after_them(indexed, parted, tmp_path):
    """A build stopped inside a fragment keeps that fragment's finished parts (not rewritten) and redoes the
    rest; an indexing actor killed after a part costs its fragment's unfinished parts, never a result."""
    import json
    import shutil

    reference = parted
    expected = fragment_rows(reference)
    out = tmp_path / "interrupted"
    shutil.copytree(reference, out)
    record = max((out / "shards").glob("shard-*.json"), key=lambda p: len(json.loads(p.read_text())["parts"]))
    parts = [out / "shards" / p["file"] for p in json.loads(record.read_text())["parts"]]
    assert len(parts) >= 3
    # Stopped after the fragment's first two parts: the rest, its record and the manifest missing.
    for path in parts[2:]:
        path.unlink()
        path.with_name(path.name + ".sha256").unlink()
    record.unlink()
    (out / "manifest.json").unlink()
    run_file = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run_file, "status": "running"}))
    kept = [p.stat().st_mtime_ns for p in parts[:2]]
    summary = build(indexed, out, part_size=3)
    assert [p.stat().st_mtime_ns for p in parts[:2]] == kept, "finished parts are not redone"
    fragment = json.loads(record.read_text())["fragment"]
    assert summary["sequences_indexed_now"] == len(expected[fragment][0]) - 6, "only the missing parts' rows"
    assert all(p.exists() for p in parts) and record.exists()
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((reference / "manifest.json").read_text())["shards"]
    for fragment, (doc_ids, chunks, rows) in fragment_rows(out).items():
        assert (doc_ids, chunks) == expected[fragment][:2] and torch.equal(rows, expected[fragment][2])
    marker = tmp_path / "died-once"
    killed = tmp_path / "killed"
    build(indexed, killed, part_size=3, actor_env={"WHENCE_FAULT_AFTER_BATCHES": f"2:{marker}"})
    assert marker.exists(), "the fault was injected"
    for fragment, (doc_ids, chunks, rows) in fragment_rows(killed).items():
        assert (doc_ids, chunks) == expected[fragment][:2] and torch.equal(rows, expected[fragment][2])


def test_an_index_written_before_parts_is_read_as_one_part_a_fragment(indexed, tmp_path):
    """Indexes built before shards had parts: shards/shard-NNNNNN.safetensors, no records, a manifest listing
    the fragments only. `whence query` reads them as they were."""
    import json
    import shutil

    import pyarrow.parquet as pq

    legacy = tmp_path / "legacy"
    shutil.copytree(indexed["root"] / "index-1", legacy)
    for record in (legacy / "shards").glob("shard-*.json"):
        (part,) = json.loads(record.read_text())["parts"]
        old = record.with_suffix(".safetensors")
        (legacy / "shards" / part["file"]).rename(old)
        (legacy / "shards" / (part["file"] + ".sha256")).rename(old.with_name(old.name + ".sha256"))
        record.unlink()
    manifest = json.loads((legacy / "manifest.json").read_text())
    (legacy / "manifest.json").write_text(json.dumps({**manifest, "shards": sorted(map(int, manifest["shards"]))}))
    run_query(indexed["root"] / "index-1", indexed, tmp_path / "now")
    run_query(legacy, indexed, tmp_path / "then", workers=2)
    assert pq.read_table(tmp_path / "then" / "topk.parquet").equals(pq.read_table(tmp_path / "now" / "topk.parquet"))


def test_a_query_with_other_factors_or_another_model_is_an_error(indexed, tmp_path, capsys):
    from flows.cli import main
    from tests.tiny import make_model, make_tokenizer

    index = str(indexed["root"] / "index-1")
    other_factors = write_factors(indexed, tmp_path / "other-factors", seed=1)
    other_model = tmp_path / "other-model"
    make_model("llama", len(make_tokenizer()), context=64, seed=1).save_pretrained(other_model)
    make_tokenizer().save_pretrained(other_model)
    base = ["query", "--index", index, "--queries", indexed["queries"], "--dtype", "float64"]
    assert main([*base, "--out", str(tmp_path / "a"), "--factors", other_factors]) == 2
    assert "built with other factors" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--model", str(other_model)]) == 2
    assert "built for another model" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c"), "--method", "lissa"]) == 2
    assert "cannot be applied" in capsys.readouterr().err
    assert main(["index", "--model", indexed["model"], "--factors", indexed["factors"], "--corpus",
                 indexed["corpus"], "--out", str(tmp_path / "d"), "--shards", "2"]) == 2
    assert "pipeline-sharded indexing is not supported" in capsys.readouterr().err


def test_an_index_the_disk_cannot_hold_is_refused_before_any_work(indexed, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    from flows.cli import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "index"
    assert main(["index", "--model", indexed["model"], "--factors", indexed["factors"], "--corpus",
                 indexed["corpus"], "--out", str(out), "--seq-len", str(SEQ_LEN)]) == 2
    err = capsys.readouterr().err
    assert "the index needs" in err and "GiB free" in err and "--projection eigen" in err
    assert not list((out / "shards").glob("*.safetensors")), "refused before any shard was written"


def test_query_results_read_like_score_results_with_per_token_scores(indexed, tmp_path):
    import pyarrow.parquet as pq

    from flows.cli import main
    from whence.results import load_results

    full = tmp_path / "full"
    build(indexed, full, dim=EVERY_DIMENSION)
    out = tmp_path / "results"
    run_query(full, indexed, out, per_token=True, query_rank="full", tfidf_candidates=4)
    results = load_results(out)
    assert pq.read_table(out / "candidates.parquet").num_rows == 4 * 3
    for query in results.queries:
        rows = results.top(query.id)
        assert rows and all(row.tokens for row in rows)
        for row in rows:  # untruncated: the index's score is the full score the tokens sum to (float32 rows)
            assert np.isclose(row.token_scores.sum(), row.score, rtol=1e-4, atol=1e-6)
    assert main(["report", str(out)]) == 0


def test_a_lowrank_index_on_ray_answers_as_the_untruncated_index(indexed, tmp_path):
    """`--projection lowrank` at its default rank (20: above the full rank, 16, of every tiny layer), built by 2 workers and
    searched by Ray tasks (the layout travels with each), ranks as the untruncated eigen index does."""
    import json

    from whence.results import load_results

    build(indexed, tmp_path / "full", dim=EVERY_DIMENSION)
    build(indexed, tmp_path / "low", workers=2, projection="lowrank", dim=None)
    manifest = json.loads((tmp_path / "low" / "manifest.json").read_text())
    assert manifest["projection"]["kind"] == "lowrank" and manifest["projection"]["dim"] == DEFAULT_DIMS["lowrank"]
    assert all(layer["rank"] == min(layer["d_out"], layer["d_in"]) == 16 for layer in manifest["layers"])
    run_query(tmp_path / "full", indexed, tmp_path / "a")
    run_query(tmp_path / "low", indexed, tmp_path / "b", workers=2)
    reference, low = (load_results(tmp_path / name) for name in ("a", "b"))
    for query in reference.queries:
        expected, found = reference.top(query.id), low.top(query.id)
        assert [(r.doc_id, r.chunk) for r in found] == [(r.doc_id, r.chunk) for r in expected]
        np.testing.assert_allclose([r.score for r in found], [r.score for r in expected], rtol=1e-4)


def test_rescoring_ranks_the_shortlist_by_the_full_score(indexed, tmp_path):
    from whence.results import load_results

    full = tmp_path / "full"
    build(indexed, full, dim=EVERY_DIMENSION)
    run_query(full, indexed, tmp_path / "untruncated")
    # dim 8 ranks only approximately; rescoring every sequence it shortlists ranks them by the full score
    run_query(indexed["root"] / "index-1", indexed, tmp_path / "rescored", rescore=1000, per_token=True,
              query_rank="full")
    reference, rescored = (load_results(tmp_path / name) for name in ("untruncated", "rescored"))
    for query in reference.queries:
        expected, found = reference.top(query.id), rescored.top(query.id)
        assert [(r.doc_id, r.chunk) for r in found] == [(r.doc_id, r.chunk) for r in expected]
        np.testing.assert_allclose([r.score for r in found], [r.score for r in expected], rtol=1e-5)
        for row in found:  # exact scores now: the per-token scores sum to them
            np.testing.assert_allclose(row.token_scores.sum(), row.score, rtol=1e-9)


def test_the_python_api_answers_as_the_command_line(indexed, tmp_path):
    import json

    import whence
    from whence.results import load_results

    index_dir = indexed["root"] / "index-1"
    run_query(index_dir, indexed, tmp_path / "cli", top_k=3)
    cli = load_results(tmp_path / "cli")
    index = whence.Index.open(index_dir, dtype="float64")
    queries = [json.loads(line) for line in open(indexed["queries"])]
    for keep in (True, True, False):  # a loop in a notebook: shards stay loaded, answers stay the same
        if not keep:  # with no room to keep them, each query reads the shards again: the same answers
            index.shards.clear()
            index.cache_bytes = 0
        table = index.query(queries, top_k=3)
        assert len(index.shards) == (3 if keep else 0)
        for query in queries:
            rows = table.top(query["id"], 3)
            assert [(r["doc_id"], r["chunk"]) for r in rows] == [(r.doc_id, r.chunk) for r in cli.top(query["id"])]
            np.testing.assert_allclose([r["score"] for r in rows], [r.score for r in cli.top(query["id"])],
                                       rtol=1e-12)
    # A query rank that truncates (2, below every tiny layer's d_in and d_out) reaches the search both ways.
    run_query(index_dir, indexed, tmp_path / "cli-rank2", top_k=3, query_rank=2)
    cli, table = load_results(tmp_path / "cli-rank2"), index.query(queries, top_k=3, query_rank=2)
    whole = index.query(queries, top_k=3, query_rank="full")
    for query in queries:
        scores = [r["score"] for r in table.top(query["id"], 3)]
        np.testing.assert_allclose(scores, [r.score for r in cli.top(query["id"])], rtol=1e-12)
        assert not np.allclose(scores, [r["score"] for r in whole.top(query["id"], 3)], rtol=1e-9, atol=0)
