"""The gradient index as an evaluation method (`whence eval lds|trace --methods index,index-random`): scores of
every training sequence, equal to EK-FAC's where the index keeps every dimension."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import TEXTS, make_model, make_tokenizer
from whence import FitConfig, fit
from whence.evaluation.methods import ALL_METHODS, ScoringSetup, index_scores, influence_scores, parse_methods
from whence.model import find_tracked_layers
from whence.text import Query

QUERIES = [Query("whale", "The whale swam far", " beyond the harbour"), Query("fox", "A quick brown", " fox jumps")]


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), dtype=torch.float64)
    layers = find_tracked_layers(model, "mlp")
    documents = [(f"doc{i}", text) for i, text in enumerate(TEXTS)]
    factors = fit(model, tokenizer, layers, documents, FitConfig(seq_len=16, batch_size=4))
    return ScoringSetup(model, tokenizer, layers, documents, 16), factors


def test_an_index_that_keeps_every_dimension_scores_as_ekfac(setup):
    scoring, factors = setup
    assert all(max(layer.d_in, layer.d_out) <= 64 for layer in scoring.layers), "the default dimension keeps all"
    expected = influence_scores(scoring, factors, QUERIES, "ekfac")
    np.testing.assert_allclose(index_scores(scoring, factors, QUERIES, "eigen"), expected, rtol=1e-8,
                               atol=1e-10 * np.abs(expected).max())


def test_the_random_index_scores_every_sequence(setup):
    scoring, factors = setup
    random = index_scores(scoring, factors, QUERIES, "random")
    expected = influence_scores(scoring, factors, QUERIES, "ekfac")
    assert random.shape == expected.shape and np.isfinite(random).all()
    assert min(np.corrcoef(r, e)[0, 1] for r, e in zip(random, expected)) > 0.3, "a projection of the same scores"


def test_the_lowrank_index_of_short_sequences_scores_as_ekfac(setup):
    """A sequence of T <= 16 tokens has a gradient of rank <= 16 in every layer: the default rank keeps it all."""
    scoring, factors = setup
    lowrank = index_scores(scoring, factors, QUERIES, "lowrank")
    expected = influence_scores(scoring, factors, QUERIES, "ekfac")
    np.testing.assert_allclose(lowrank, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_the_index_methods_are_evaluation_methods():
    assert {"index", "index-random", "index-lowrank"} <= set(ALL_METHODS)
    assert parse_methods("ekfac,index,index-random") == ["ekfac", "index", "index-random"]
