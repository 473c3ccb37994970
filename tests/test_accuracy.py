"""EK-FAC against the exact damped Fisher inverse on one small layer with a full-rank Fisher."""

import numpy as np
import pytest
import torch

from flows.bench.micro import micro_setting
from whence.factors import Factors
from whence.lissa import fisher_product, lissa_inverse_hvp, top_eigenvalue
from whence.queries import factors_for_method

MIN_EKFAC_PEARSON = 0.9
NUM_FIT_SEQUENCES = 2500


@pytest.fixture(scope="module")
def setting(tokenizer):
    """The micro setting (flows.bench.micro, shared with `whence bench`): a Llama of width 12 whose block 0 MLP
    down_proj is (12, 24) = 288 parameters with a full-rank Fisher; its vocabulary is the tiny tokenizer's.
    Gradients are (N, 288): fit_gradients (2500), train (32) and queries (8)."""
    setting = micro_setting(NUM_FIT_SEQUENCES, vocab=len(tokenizer))
    fisher = setting["fisher"]
    assert torch.linalg.matrix_rank(fisher) == fisher.shape[0], "the Fisher should have full rank"
    return setting


def mean_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a.numpy(), b.numpy())]))


def test_ekfac_tracks_the_exact_inverse(setting, capsys):
    layer, factors, fisher = setting["layer"], setting["factors"], setting["fisher"]
    damping = float(factors.eigenvalues[layer.name].mean())  # the setting: damping = mean(Lambda)
    exact = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0], dtype=torch.float64),
                               setting["queries"].T).T @ setting["train"].T  # (Q, N)
    correlations = {}
    diagonal = Factors("diagonal", factors.layers, {layer.name: None},
                       {layer.name: torch.diagonal(fisher).reshape(layer.d_out, layer.d_in)})
    candidates = {"ekfac": factors, "kfac": factors_for_method(factors, "kfac"), "diagonal": diagonal,
                  "identity": factors_for_method(factors, "identity")}
    for method, preconditioner in candidates.items():
        q = setting["queries"].reshape(-1, layer.d_out, layer.d_in)
        preconditioned = preconditioner.precondition(layer.name, q, damping).flatten(1)
        correlations[method] = mean_pearson(preconditioned @ setting["train"].T, exact)
    with capsys.disabled():
        print("\nmean per-query Pearson against exact influence:",
              ", ".join(f"{k} {v:.3f}" for k, v in correlations.items()))
    assert correlations["ekfac"] >= MIN_EKFAC_PEARSON
    assert correlations["ekfac"] >= correlations["kfac"] > correlations["identity"]


def test_lissa_converges_to_the_exact_inverse_hvp(setting):
    layer, fisher, gradients = setting["layer"], setting["fisher"], setting["fit_gradients"]
    damping = float(setting["factors"].eigenvalues[layer.name].mean())
    v = setting["queries"][:3].reshape(3, layer.d_out, layer.d_in)
    product = fisher_product({layer.name: gradients.reshape(-1, layer.d_out, layer.d_in)})
    scale = 1.2 * (top_eigenvalue(product, {layer.name: v}) + damping)
    result, steps = lissa_inverse_hvp({layer.name: v}, iter(lambda: product, None), {layer.name: damping}, scale,
                                      iterations=5000, tolerance=1e-12)
    exact = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0], dtype=torch.float64), v.flatten(1).T).T
    torch.testing.assert_close(result[layer.name].flatten(1), exact, rtol=1e-6, atol=1e-8)
    assert steps < 5000
