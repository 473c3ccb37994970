"""Factors against dense references, and the invariances of fitting (float64)."""

import random

import pytest
import torch

from tests.references import exact_fisher, kronecker_basis, per_sequence_gradients
from tests.tiny import TEXTS, make_model
from whence import FitConfig, fit
from whence.api import sequence_batches
from whence.errors import FactorsMismatchError
from whence.factors import (
    CovarianceSums,
    Factors,
    LambdaSums,
    load_sums,
    pack_symmetric,
    packed_dim,
    save_sums,
    unpack_symmetric,
    upper_gram,
)
from whence.fitting import FactorFitter, eigendecompose
from whence.model import find_tracked_layers, model_fingerprint
from whence.text import iter_sequences

FLOAT64 = dict(atol=1e-10, rtol=1e-8)


def sequences_of(tokenizer, seq_len=12):
    return list(iter_sequences(tokenizer, enumerate(TEXTS), seq_len))


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_corrected_eigenvalues_are_the_diagonal_of_the_rotated_fisher(tiny_model, tokenizer, num_blocks):
    layers = find_tracked_layers(tiny_model, "mlp")
    factors = fit(tiny_model, tokenizer, layers, enumerate(TEXTS), FitConfig(seq_len=12, batch_size=5,
                                                                             num_blocks=num_blocks))
    gradients = per_sequence_gradients(tiny_model, tokenizer, layers, sequences_of(tokenizer))
    for layer in layers:
        fisher = exact_fisher(gradients[layer.name])
        q = kronecker_basis(factors.bases[layer.name])
        lam = factors.eigenvalues[layer.name].reshape(-1)
        torch.testing.assert_close(lam, torch.diagonal(q.T @ fisher @ q), **FLOAT64)
        torch.testing.assert_close(lam.sum(), torch.trace(fisher), **FLOAT64)
        # The preconditioner equals the dense Q diag(1 / (Lambda + damping)) Q^T.
        damping = factors.damping(layer.name)
        dense = q @ torch.diag(1.0 / (lam + damping)) @ q.T
        v = torch.randn(layer.d_out, layer.d_in, dtype=torch.float64)
        torch.testing.assert_close(factors.precondition(layer.name, v).reshape(-1), dense @ v.reshape(-1), **FLOAT64)
        assert damping == pytest.approx(0.1 * float(lam.mean()))


def test_diagonal_strategy_is_the_fisher_diagonal(tokenizer):
    model = make_model("llama", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, enumerate(TEXTS), FitConfig(seq_len=12, strategy="diagonal"))
    gradients = per_sequence_gradients(model, tokenizer, layers, sequences_of(tokenizer))
    for layer in layers:
        expected = torch.diagonal(exact_fisher(gradients[layer.name]))
        torch.testing.assert_close(factors.eigenvalues[layer.name].reshape(-1), expected, **FLOAT64)


def test_partial_sums_merge_to_one_pass_and_batching_does_not_matter(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    sequences = sequences_of(tokenizer)

    def covariance(parts, batch_size):
        total = None
        for part in parts:
            fitter = FactorFitter(model, layers)
            for _, batch in sequence_batches(tokenizer, part, batch_size):
                fitter.covariance_step(batch)
            total = fitter.take_covariance() if total is None else total + fitter.take_covariance()
        return total

    one_pass = covariance([sequences], batch_size=4)
    shuffled = sequences[:]
    random.Random(0).shuffle(shuffled)
    split = covariance([shuffled[:7], shuffled[7:13], shuffled[13:]], batch_size=3)
    assert (split.tokens, split.sequences) == (one_pass.tokens, one_pass.sequences)
    for name in one_pass.activation:
        for a, b in zip(one_pass.activation[name] + one_pass.gradient[name], split.activation[name] + split.gradient[name]):
            torch.testing.assert_close(a, b, **FLOAT64)
    # Corrections too, with the bases of the single pass.
    bases = eigendecompose(one_pass)
    results = []
    for parts, batch_size in (([sequences], 8), ([shuffled[:5], shuffled[5:]], 2)):
        total = None
        for part in parts:
            fitter = FactorFitter(model, layers)
            fitter.set_bases(bases)
            for _, batch in sequence_batches(tokenizer, part, batch_size):
                fitter.correction_step(batch)
            total = fitter.take_corrections() if total is None else total + fitter.take_corrections()
        results.append(total)
    for name in results[0].sums:
        torch.testing.assert_close(results[0].sums[name], results[1].sums[name], **FLOAT64)


def test_packed_sums_hold_the_upper_triangle_and_unpack_to_the_symmetric_gram():
    generator = torch.Generator().manual_seed(0)
    for d in (1, 3, 255, 300):  # below and above upper_gram's blocked product
        x = torch.randn(40, d, dtype=torch.float64, generator=generator)
        gram = x.T @ x
        packed = pack_symmetric(upper_gram(x))
        assert packed.shape == (d * (d + 1) // 2,) and packed_dim(packed.numel()) == d
        rows, cols = torch.triu_indices(d, d)
        torch.testing.assert_close(packed, gram[rows, cols], rtol=1e-12, atol=1e-12)
        full = unpack_symmetric(packed)
        assert torch.equal(full, full.T), "exactly symmetric"
        torch.testing.assert_close(full, gram, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="upper triangle"):
        packed_dim(5)


def test_partial_sums_save_and_load_in_the_format_of_earlier_runs(tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    # Layer names hold dots; 11 blocks check that block 10 loads after block 9, not after block 1.
    layers = {"model.layers.0.mlp.up_proj": (3, 5), "model.layers.1.mlp.down_proj": (5, 3)}
    covariance = CovarianceSums.zeros(layers, num_blocks=1)
    covariance.activation["model.layers.0.mlp.up_proj"] = [torch.rand(1, dtype=torch.float64, generator=generator)
                                                            for _ in range(11)]
    for blocks in (*covariance.activation.values(), *covariance.gradient.values()):
        for block in blocks:
            block.copy_(torch.rand(block.shape, dtype=torch.float64, generator=generator))
    covariance.tokens, covariance.sequences = 17, 4
    corrections = LambdaSums({n: torch.rand(shape, dtype=torch.float64, generator=generator)
                              for n, shape in layers.items()}, 4)
    # The files a run of an earlier version left: keys and metadata as they were written then, blocks square.
    old = {f"{n}/A/{i}": unpack_symmetric(t) for n, blocks in covariance.activation.items() for i, t in enumerate(blocks)}
    old |= {f"{n}/S/{i}": unpack_symmetric(t) for n, blocks in covariance.gradient.items() for i, t in enumerate(blocks)}
    save_file(old, str(tmp_path / "old-covariance.safetensors"),
              metadata={"kind": "covariance", "tokens": "17", "sequences": "4"})
    save_file({f"{n}/L": t for n, t in corrections.sums.items()}, str(tmp_path / "old-corrections.safetensors"),
              metadata={"kind": "correction", "sequences": "4"})
    for prefix in ("old", "new"):
        if prefix == "new":
            save_sums(tmp_path / "new-covariance.safetensors", covariance)
            save_sums(tmp_path / "new-corrections.safetensors", corrections)
        loaded = load_sums(tmp_path / f"{prefix}-covariance.safetensors")
        assert (loaded.tokens, loaded.sequences) == (17, 4)
        for name in layers:
            for got, want in zip(loaded.activation[name] + loaded.gradient[name],
                                 covariance.activation[name] + covariance.gradient[name], strict=True):
                assert torch.equal(got, want)
        lambdas = load_sums(tmp_path / f"{prefix}-corrections.safetensors")
        assert isinstance(lambdas, LambdaSums) and lambdas.sequences == 4
        assert all(torch.equal(lambdas.sums[n], corrections.sums[n]) for n in layers)
    assert not list(tmp_path.glob("*.partial")), "written through a .partial file, then renamed"


def test_save_load_roundtrip_and_other_model_is_refused(tmp_path, tokenizer):
    model = make_model("neox", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, enumerate(TEXTS), FitConfig(seq_len=12, num_blocks=2))
    factors.save(tmp_path)
    loaded = Factors.load(tmp_path)
    v = torch.randn(layers[0].d_out, layers[0].d_in, dtype=torch.float64)
    torch.testing.assert_close(loaded.precondition(layers[0].name, v), factors.precondition(layers[0].name, v))
    loaded.check_compatible(model_fingerprint(model), [layer.describe() for layer in layers])
    other = make_model("neox", len(tokenizer), seed=1)
    with pytest.raises(FactorsMismatchError, match="another model"):
        loaded.check_compatible(model_fingerprint(other), [layer.describe() for layer in layers])
    with pytest.raises(FactorsMismatchError, match="other layers"):
        all_layers = find_tracked_layers(model, "all")
        loaded.check_compatible(model_fingerprint(model), [layer.describe() for layer in all_layers])
