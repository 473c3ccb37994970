"""EK-FAC against the exact damped Fisher inverse on one small layer with a full-rank Fisher."""

import numpy as np
import pytest
import torch

from tests.references import exact_fisher, per_sequence_gradients
from tests.tiny import make_model
from whence.api import sequence_batches
from whence.factors import Factors
from whence.fitting import fit_factors
from whence.lissa import fisher_product, lissa_inverse_hvp, top_eigenvalue
from whence.model import find_tracked_layers
from whence.queries import factors_for_method
from whence.task import LanguageModelingTask
from whence.text import TrainingSequence

MIN_EKFAC_PEARSON = 0.9
NUM_FIT_SEQUENCES = 2500
SEQ_LEN = 12


@pytest.fixture(scope="module")
def setting(tokenizer):
    """A Llama of width 12: block 0's MLP down_proj is (12, 24) = 288 parameters with a full-rank Fisher.
    (In GPT-2 every MLP layer has a singular Fisher block: c_fc reads layer-normed inputs, which span one
    dimension less, and c_proj writes to a residual stream read only through LayerNorms, which ignore its mean.)"""
    model = make_model("llama", len(tokenizer), hidden=12, layers=2)
    layers = find_tracked_layers(model, r"layers\.0\.mlp\.down_proj$")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, len(tokenizer), (NUM_FIT_SEQUENCES + 40, SEQ_LEN), generator=generator)
    sequences = [TrainingSequence(str(i), 0, tuple(row.tolist())) for i, row in enumerate(tokens)]
    fit_set, train_set, query_set = sequences[:NUM_FIT_SEQUENCES], sequences[-40:-8], sequences[-8:]
    gradients = per_sequence_gradients(model, tokenizer, layers, fit_set)[layers[0].name]
    fisher = exact_fisher(gradients)
    assert torch.linalg.matrix_rank(fisher) == fisher.shape[0], "the Fisher should have full rank"
    factors = fit_factors(model, layers, lambda: (b for _, b in sequence_batches(tokenizer, fit_set, 64)))
    task = LanguageModelingTask()
    data_objective = task.sequence_log_likelihood
    train = per_sequence_gradients(model, tokenizer, layers, train_set, objective=data_objective)[layers[0].name]
    queries = per_sequence_gradients(model, tokenizer, layers, query_set, objective=data_objective)[layers[0].name]
    return dict(model=model, layer=layers[0], fisher=fisher, factors=factors, train=train, queries=queries,
                fit_gradients=gradients)


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
