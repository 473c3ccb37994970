"""The scoring kernel against dense references, and its invariances (float64)."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tests.references import per_sequence_gradients
from tests.tiny import TEXTS
from whence import FitConfig, ScoreConfig, fit, prepare
from whence.api import sequence_batches
from whence.model import find_tracked_layers
from whence.queries import factorise, query_gradients
from whence.scoring import QueryScorer
from whence.task import LanguageModelingTask
from whence.text import Query, iter_sequences

FLOAT64 = dict(atol=1e-9, rtol=1e-7)
MIN_RANK_SPEARMAN = 0.95
QUERIES = [Query("whale", "The whale swam far", " beyond the harbour"), Query("ishmael", "Call me", " Ishmael."),
           Query("union", "The state of the union", " is strong"), Query("fox", "A quick brown", " fox jumps")]


@pytest.fixture
def fitted(tiny_model, tokenizer):
    layers = find_tracked_layers(tiny_model, "mlp")
    factors = fit(tiny_model, tokenizer, layers, enumerate(TEXTS), FitConfig(seq_len=12))
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS), 12))
    return tiny_model, layers, factors, sequences


def batch_scores(scorer, tokenizer, sequences, batch_size, per_token=False):
    results = [scorer.score(batch, per_token) for _, batch in sequence_batches(tokenizer, sequences, batch_size)]
    total = torch.cat([r.total for r in results], dim=1)
    per_layer = torch.cat([r.per_layer for r in results], dim=1)
    return total, per_layer, results


def test_full_rank_scores_equal_the_dense_reference(fitted, tokenizer):
    model, layers, factors, sequences = fitted
    prepared = prepare(model, tokenizer, layers, factors, QUERIES, ScoreConfig(query_rank="full"))
    total, per_layer, _ = batch_scores(QueryScorer(model, layers, prepared), tokenizer, sequences, batch_size=5)
    train = per_sequence_gradients(model, tokenizer, layers, sequences,
                                   objective=LanguageModelingTask().sequence_log_likelihood)
    grads = query_gradients(model, tokenizer, layers, QUERIES)
    expected = sum(factors.precondition(layer.name, grads[layer.name]).flatten(1) @ train[layer.name].T
                   for layer in layers)
    torch.testing.assert_close(total, expected, **FLOAT64)
    torch.testing.assert_close(per_layer.sum(-1), total, **FLOAT64)


@pytest.mark.parametrize("rank", [3, "full"])
def test_paths_batch_size_and_per_token_agree(fitted, tokenizer, rank):
    model, layers, factors, sequences = fitted
    prepared = prepare(model, tokenizer, layers, factors, QUERIES, ScoreConfig(query_rank=rank))
    reference, _, _ = batch_scores(QueryScorer(model, layers, prepared, path="gradient"), tokenizer, sequences, 7)
    lowrank, _, _ = batch_scores(QueryScorer(model, layers, prepared, path="lowrank"), tokenizer, sequences, 2)
    torch.testing.assert_close(lowrank, reference, **FLOAT64)
    total, _, results = batch_scores(QueryScorer(model, layers, prepared), tokenizer, sequences, 3, per_token=True)
    torch.testing.assert_close(total, reference, **FLOAT64)
    for result in results:  # per-token scores sum to the sequence's score; padding scores exactly zero
        torch.testing.assert_close(result.per_token.sum(-1), result.total, **FLOAT64)


def test_rank_32_keeps_the_ranking_of_full_rank(fitted, tokenizer):
    model, layers, factors, sequences = fitted
    scores = {}
    for rank in (32, "full"):
        prepared = prepare(model, tokenizer, layers, factors, QUERIES, ScoreConfig(query_rank=rank))
        scores[rank], _, _ = batch_scores(QueryScorer(model, layers, prepared), tokenizer, sequences, 8)
    for q in range(len(QUERIES)):
        assert spearmanr(scores[32][q].numpy(), scores["full"][q].numpy()).statistic >= MIN_RANK_SPEARMAN


@pytest.mark.parametrize("shape", [(3, 40, 12), (3, 12, 40), (2, 20, 20)])
def test_low_rank_is_the_truncated_svd(shape):
    """whence.queries.low_rank (from the smaller Gram matrix's eigendecomposition) gives the best rank-r
    approximation that torch.linalg.svd gives, with orthonormal right factors and left factors U_r S_r, for tall,
    wide and square matrices of a decaying spectrum, in the input's dtype; a rank-deficient matrix keeps finite
    factors that reconstruct it."""
    from whence.queries import low_rank

    generator = torch.Generator().manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(*shape, generator=generator, dtype=torch.float64), full_matrices=False)
    sigma = torch.logspace(0, -4, u.shape[-1], dtype=torch.float64).expand(shape[0], -1)  # (Q, k), distinct
    matrices = u @ torch.diag_embed(sigma) @ vh
    for rank in (1, 4, 10_000):
        r = min(rank, *shape[1:])
        left, right = low_rank(matrices, rank)
        assert left.shape == (shape[0], r, shape[1]) and right.shape == (shape[0], r, shape[2])
        best = (u[..., :r] * sigma[:, None, :r]) @ vh[:, :r]  # (Q, d_out, d_in)
        torch.testing.assert_close(left.mT @ right, best, atol=1e-12, rtol=0)
        torch.testing.assert_close(right @ right.mT, torch.eye(r, dtype=torch.float64).expand(shape[0], -1, -1),
                                   atol=1e-8, rtol=0)
        torch.testing.assert_close(torch.linalg.vector_norm(left, dim=-1), sigma[:, :r], atol=1e-12, rtol=0)
    left, right = low_rank(matrices.float(), 4)
    assert left.dtype == right.dtype == torch.float32
    deficient = torch.randn(2, 30, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 3, 50, generator=generator, dtype=torch.float64)  # rank 3
    left, right = low_rank(deficient, 8)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    torch.testing.assert_close(left.mT @ right, deficient, atol=1e-10, rtol=0)


def test_factorised_queries_reconstruct_when_rank_is_large(fitted, tokenizer):
    model, layers, factors, _ = fitted
    grads = query_gradients(model, tokenizer, layers, QUERIES)
    exact = factorise([q.id for q in QUERIES], grads, "full")
    big = factorise([q.id for q in QUERIES], grads, 10_000)
    for layer in layers:
        torch.testing.assert_close(big.matrices(layer.name), exact.matrices(layer.name), **FLOAT64)


def test_self_influence_equals_dense_quadratic_form(fitted, tokenizer):
    model, layers, factors, sequences = fitted
    prepared = prepare(model, tokenizer, layers, factors, QUERIES[:1])
    scorer = QueryScorer(model, layers, prepared)
    (_, batch), = list(sequence_batches(tokenizer, sequences[:4], 4))
    values = scorer.self_influence(batch, factors)
    train = per_sequence_gradients(model, tokenizer, layers, sequences[:4],
                                   objective=scorer.task.sequence_log_likelihood)
    expected = sum((factors.precondition(layer.name, train[layer.name].reshape(-1, layer.d_out, layer.d_in))
                    .flatten(1) * train[layer.name]).sum(1) for layer in layers)
    torch.testing.assert_close(values, expected, **FLOAT64)
    assert (values > 0).all(), "a damped PSD preconditioner gives positive self-influence"


def test_padding_does_not_change_scores(fitted, tokenizer):
    model, layers, factors, sequences = fitted
    prepared = prepare(model, tokenizer, layers, factors, QUERIES)
    scorer = QueryScorer(model, layers, prepared)
    short = min(sequences, key=lambda s: len(s.input_ids))
    long = max(sequences, key=lambda s: len(s.input_ids))
    alone, _, _ = batch_scores(scorer, tokenizer, [short], 1)
    padded, _, _ = batch_scores(scorer, tokenizer, [long, short], 2)
    assert len(short.input_ids) < len(long.input_ids)
    np.testing.assert_allclose(padded[:, 1].numpy(), alone[:, 0].numpy(), rtol=1e-9, atol=1e-9)
