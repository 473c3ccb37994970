"""Factors on disk (whence.factor_files), layer ownership (whence.fit_plan, whence.factor_owners), in one process."""

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny import TEXTS, make_model
from whence import FitConfig, fit
from whence.api import sequence_batches
from whence.errors import FactorsMismatchError
from whence.factor_files import (
    BASIS,
    LAMBDA,
    FactorsDamagedError,
    basis_tensors,
    layer_file,
    read_basis,
    read_lambda,
)
from whence.factor_owners import CORRECTION, COVARIANCE, FinishJob, finish_layers
from whence.factors import CORRECTED_EIGENVALUES, FACTORS_FILE, MANIFEST_FILE, Factors, write_json
from whence.fit_plan import assign_sequences, layer_sum_bytes, plan_owners
from whence.fitting import FactorFitter
from whence.model import find_tracked_layers
from whence.text import iter_sequences

# ||P_32(v) - P_64(v)|| / ||P_64(v)|| with float32 stored factors (seen: ~1e-6 on the tiny model; the worst
# element ~3e-4 relative, where eigenvalues nearly vanish).
FLOAT32_STORAGE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fitted(tokenizer):
    model = make_model("llama", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    return model, layers, fit(model, tokenizer, layers, enumerate(TEXTS), FitConfig(seq_len=12, num_blocks=2))


def test_per_layer_files_round_trip_and_a_subset_loads_alone(fitted, tmp_path):
    _, layers, factors = fitted
    factors.save(tmp_path)
    assert not (tmp_path / FACTORS_FILE).exists()
    for layer in layers:
        for kind in (BASIS, LAMBDA):
            assert (tmp_path / (layer_file(layer.name, kind) + ".sha256")).is_file()
    loaded = Factors.load(tmp_path)
    for layer in layers:
        assert torch.equal(loaded.eigenvalues[layer.name], factors.eigenvalues[layer.name])
        for stored, kept in zip(loaded.bases[layer.name].activation_vectors + loaded.bases[layer.name].gradient_vectors,
                                factors.bases[layer.name].activation_vectors + factors.bases[layer.name].gradient_vectors):
            assert torch.equal(stored, kept)
        # The same numbers, but a mapped file's tensors may sit at other alignments, which can change BLAS's
        # summation order in the last bit.
        v = torch.randn(layer.d_out, layer.d_in, dtype=torch.float64)
        torch.testing.assert_close(loaded.precondition(layer.name, v), factors.precondition(layer.name, v),
                                   rtol=1e-12, atol=0)
    subset = Factors.load(tmp_path, layers=[layers[1].name])
    assert list(subset.eigenvalues) == [layers[1].name] and subset.layer_names == loaded.layer_names
    with pytest.raises(FactorsMismatchError, match="no factors for nope"):
        Factors.load(tmp_path, layers=["nope"])


def test_the_single_file_layout_of_older_fits_still_loads(fitted, tmp_path):
    _, layers, factors = fitted
    tensors = {}
    for layer in layers:
        tensors |= basis_tensors(layer.name, factors.bases[layer.name])
        tensors[f"{layer.name}/{CORRECTED_EIGENVALUES}"] = factors.eigenvalues[layer.name]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / FACTORS_FILE))
    write_json(tmp_path / MANIFEST_FILE, {"strategy": "ekfac", "layers": factors.layers, **factors.metadata})
    loaded = Factors.load(tmp_path, layers=[layers[0].name])
    assert torch.equal(loaded.eigenvalues[layers[0].name], factors.eigenvalues[layers[0].name])
    assert torch.equal(loaded.bases[layers[0].name].gradient_vectors[1], factors.bases[layers[0].name].gradient_vectors[1])
    (tmp_path / FACTORS_FILE).write_bytes((tmp_path / FACTORS_FILE).read_bytes()[:100])
    with pytest.raises(FactorsDamagedError, match=FACTORS_FILE):
        Factors.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_factors_file_is_an_error_naming_it(fitted, tmp_path, damage):
    _, layers, factors = fitted
    factors.save(tmp_path)
    path = tmp_path / layer_file(layers[2].name, LAMBDA)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # finite garbage in the tensor bytes: the file still parses, the checksum does not match
        data[-8:] = torch.tensor([1.5], dtype=torch.float64).numpy().tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(FactorsDamagedError, match=f"{path.name}: checksum mismatch"):
        Factors.load(tmp_path)
    Factors.load(tmp_path, layers=[layers[0].name])  # the other layers are intact


def test_float32_storage_halves_the_bytes_and_changes_little(fitted, tmp_path):
    _, layers, factors = fitted
    factors.save(tmp_path / "64")
    factors.save(tmp_path / "32", factor_dtype="float32")
    size = lambda d: sum(p.stat().st_size for p in (d / "layers").glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "32") < 0.6 * size(tmp_path / "64")
    loaded = Factors.load(tmp_path / "32")
    for layer in layers:
        assert loaded.eigenvalues[layer.name].dtype == torch.float32
        v = torch.randn(layer.d_out, layer.d_in, dtype=torch.float64)
        got, want = loaded.precondition(layer.name, v), factors.precondition(layer.name, v)
        assert float((got - want).norm() / want.norm()) < FLOAT32_STORAGE_TOLERANCE


def test_owners_reducing_partial_sums_write_the_factors_of_a_single_pass(fitted, tokenizer, tmp_path):
    """Two workers' partial sums, reduced per layer by two owners, give the factors of one pass over all data."""
    model, layers, expected = fitted
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS), 12))
    batches = [batch for _, batch in sequence_batches(tokenizer, sequences, 3, seed=0)]
    owners = plan_owners([layer.describe() for layer in layers], 2, num_blocks=2)
    assert sorted(sum(owners, [])) == sorted(layer.name for layer in layers) and all(owners)
    workers = [FactorFitter(model, layers, num_blocks=2) for _ in range(2)]
    for i, batch in enumerate(batches):
        workers[i % 2].covariance_step(batch)
    parts = [w.take_covariance() for w in workers]
    job = FinishJob(str(tmp_path), "ekfac", "float64", sum(p.tokens for p in parts), sum(p.sequences for p in parts))
    for names in owners:
        finish_layers(COVARIANCE, names, 2, lambda w, name: parts[w], job)
    bases = {layer.name: read_basis(tmp_path, layer.name) for layer in layers}
    for w in workers:
        w.set_bases(bases)
    for i, batch in enumerate(batches):
        workers[i % 2].correction_step(batch)
    parts = [w.take_corrections() for w in workers]
    job = FinishJob(job.directory, "ekfac", "float64", job.tokens, sum(p.sequences for p in parts))
    for names in owners:
        finish_layers(CORRECTION, names, 2, lambda w, name: parts[w], job)
    for layer in layers:
        torch.testing.assert_close(read_lambda(tmp_path, layer.name), expected.eigenvalues[layer.name],
                                   rtol=1e-9, atol=1e-12)


def test_plans_are_balanced_and_deterministic():
    layers = [{"name": f"l{i}", "d_out": d, "d_in": 8} for i, d in enumerate([64, 8, 32, 32, 8])]
    owners = plan_owners(layers, 2)
    assert owners == plan_owners(layers, 2) and owners == [["l0"], ["l1", "l2", "l3", "l4"]]
    assert layer_sum_bytes(64, 8) == 8 * (64 * 65 // 2 + 8 * 9 // 2)
    assert layer_sum_bytes(64, 8, 2) == 8 * (2 * 32 * 33 // 2 + 2 * 4 * 5 // 2)
    # 19 sequences in corpus order, cut at 9 and 19: a run may start or end inside a fragment.
    assert assign_sequences({0: 5, 1: 9, 2: 4, 3: 1}, 2) == [{0: (0, 5), 1: (0, 4)}, {1: (4, 5), 2: (0, 4), 3: (0, 1)}]
    # One large fragment (a gzip file) is shared out; more workers than sequences leave some idle.
    assert assign_sequences({0: 10}, 3) == [{0: (0, 3)}, {0: (3, 3)}, {0: (6, 4)}]
    assert assign_sequences({0: 1, 1: 1}, 3) == [{}, {0: (0, 1)}, {1: (0, 1)}]
    for counts, workers in (({0: 7, 1: 0, 2: 13}, 4), ({5: 3}, 1)):
        runs = assign_sequences(counts, workers)
        assert sum(count for run in runs for _, count in run.values()) == sum(counts.values())


def test_scores_with_float32_stored_factors_rank_as_with_float64(fitted, tokenizer, tmp_path):
    """The accuracy cost of --factor-dtype float32, measured on scores (reported in issue 16's note)."""
    from scipy.stats import pearsonr, spearmanr

    from whence import ScoreConfig, prepare, score
    from whence.model import model_fingerprint

    model, layers, factors = fitted
    factors.metadata["model_fingerprint"] = model_fingerprint(model)
    queries = [{"id": str(i), "prompt": text[:20], "completion": text[20:40]} for i, text in enumerate(TEXTS[:3])]
    tables = {}
    for dtype in ("float64", "float32"):
        factors.save(tmp_path / dtype, factor_dtype=dtype)
        loaded = Factors.load(tmp_path / dtype)
        prepared = prepare(model, tokenizer, layers, loaded, queries, ScoreConfig(query_rank="full"))
        tables[dtype] = score(model, tokenizer, layers, prepared, enumerate(TEXTS), ScoreConfig(seq_len=12)).scores
    exact, stored = tables["float64"].reshape(-1), tables["float32"].reshape(-1)
    assert spearmanr(exact, stored).statistic > 1 - FLOAT32_SCORE_TOLERANCE
    assert pearsonr(exact, stored).statistic > 1 - FLOAT32_SCORE_TOLERANCE
    print(f"float32 factors: Spearman {spearmanr(exact, stored).statistic:.9f}, Pearson "
          f"{pearsonr(exact, stored).statistic:.9f}, max |relative error| "
          f"{float(abs(stored - exact).max() / abs(exact).max()):.2e}")


FLOAT32_SCORE_TOLERANCE = 1e-6  # 1 - correlation of scores with float32 against float64 stored factors
