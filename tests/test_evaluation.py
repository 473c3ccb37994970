"""whence.evaluation: LDS, fact-tracing metrics, exact influence and the meaning of a score (no Ray, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.tiny import TEXTS, make_model, make_tokenizer
from whence.api import fit
from whence.config import FitConfig
from whence.errors import QueryError, WhenceError
from whence.evaluation import (
    EvaluationError,
    ModelTooLargeError,
    linear_datamodeling_score,
    noise_figures,
    predicted_change,
    sample_subsets,
    source_ranks,
    trace_metrics,
)
from whence.evaluation.exact import (
    check_parameter_bound,
    damped_inverse_products,
    exact_scores,
    flat_gradients,
    flat_query_gradients,
    layer_dampings,
    tracked_parameter_count,
)
from whence.evaluation.trace import bm25_matrix, candidate_mask, load_sourced_queries
from whence.model import find_tracked_layers
from whence.task import LanguageModelingTask
from whence.text import Query, collate_queries, collate_sequences, iter_sequences, pad_id_of

EXACT_TOLERANCE = 1e-8  # float64 reference against float64 package code: rounding only


# ---------------------------------------------------------------------------------------------------------
# LDS on ridge regression, where first-order influence is nearly exact


def ridge_setup(num_train=80, dim=6, num_queries=30, ridge=10.0, subsets=50, seed=0):
    """Scores (Q, N) of ridge regression at its closed-form optimum, subset masks (M, N) and the retrained
    models' measurements f_m(q) = x_q^T w_m (M, Q)."""
    rng = np.random.default_rng(seed)
    x, queries = rng.normal(size=(num_train, dim)), rng.normal(size=(num_queries, dim))
    y = x @ rng.normal(size=dim) + rng.normal(size=num_train)

    def solve(mask):
        return np.linalg.solve(x[mask].T @ x[mask] + ridge * np.eye(dim), x[mask].T @ y[mask])

    w = solve(np.ones(num_train, dtype=bool))
    hessian = x.T @ x + ridge * np.eye(dim)
    log_likelihood_grads = -(x @ w - y)[:, None] * x  # (N, d): gradients of -(x w - y)^2 / 2
    scores = queries @ np.linalg.solve(hessian, log_likelihood_grads.T)  # (Q, N)
    masks = sample_subsets(num_train, subsets, 0.5, seed=seed + 1)
    measured = np.stack([queries @ solve(mask) for mask in masks])  # (M, Q)
    return scores, masks, measured


def test_lds_is_high_where_influence_is_exact():
    scores, masks, measured = ridge_setup()
    result = linear_datamodeling_score(scores, masks, measured)
    assert result.lds > 0.85
    assert result.stderr < 0.02 and result.undefined == 0 and len(result.per_query) == 30


def test_random_scores_give_lds_within_two_standard_errors_of_zero():
    scores, masks, measured = ridge_setup()
    random = np.random.default_rng(7).normal(size=scores.shape)
    result = linear_datamodeling_score(random, masks, measured)
    assert abs(result.lds) < 2 * result.stderr


def test_lds_is_invariant_to_positive_rescaling_and_averages_seeds():
    scores, masks, measured = ridge_setup()
    base = linear_datamodeling_score(scores, masks, measured)
    assert linear_datamodeling_score(scores * 3.7e4, masks, measured).per_query == base.per_query
    seeded = np.stack([measured + 0.01, measured - 0.01], axis=1)  # (M, S=2, Q), mean = measured
    assert linear_datamodeling_score(scores, masks, seeded).per_query == pytest.approx(base.per_query)


def test_constant_columns_are_undefined_and_left_out():
    scores, masks, measured = ridge_setup(num_queries=4)
    scores[1] = 0.0  # every subset predicts 0: Spearman undefined
    measured[:, 2] = 5.0  # a measurement that never changes
    result = linear_datamodeling_score(scores, masks, measured)
    assert math.isnan(result.per_query[1]) and math.isnan(result.per_query[2]) and result.undefined == 2
    assert result.lds == pytest.approx(np.mean([result.per_query[0], result.per_query[3]]))
    body = result.to_dict()
    assert body["per_query"][1] is None and json.loads(json.dumps(body)) == body


def test_paired_difference_is_per_query_over_the_queries_both_define():
    from whence.evaluation.lds import LDSResult, paired_difference

    method = LDSResult(0.0, 0.0, [0.9, 0.5, float("nan"), 0.7], 1)
    baseline = LDSResult(0.0, 0.0, [0.8, 0.6, 0.4, 0.5], 0)
    pair = paired_difference(method, baseline)
    differences = np.array([0.1, -0.1, 0.2])
    assert pair["queries"] == 3 and pair["better"] == 2 and pair["worse"] == 1
    assert pair["mean_difference"] == pytest.approx(differences.mean())
    assert pair["stderr"] == pytest.approx(differences.std(ddof=1) / math.sqrt(3))
    assert paired_difference(baseline, baseline)["mean_difference"] == 0.0


def test_subsets_are_deterministic_and_sized():
    masks = sample_subsets(101, 20, 0.3, seed=5)
    assert masks.shape == (20, 101) and (masks.sum(axis=1) == 30).all()
    assert (masks == sample_subsets(101, 20, 0.3, seed=5)).all()
    assert (masks[:5] == sample_subsets(101, 5, 0.3, seed=5)).all()
    assert not (masks == sample_subsets(101, 20, 0.3, seed=6)).all()
    for fraction in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(EvaluationError, match="fraction"):
            sample_subsets(10, 5, fraction)


def test_noise_figures():
    measured = np.zeros((3, 2, 1))
    measured[:, 0, 0], measured[:, 1, 0] = [0.0, 1.0, 2.0], [2.0, 3.0, 4.0]  # seed means 1, 2, 3
    noise = noise_figures(measured)
    assert noise["across_subsets_std"] == pytest.approx(1.0)
    assert noise["across_seeds_std"] == pytest.approx(math.sqrt(2.0))
    assert noise_figures(measured[:, 0, :])["across_seeds_std"] is None


# ---------------------------------------------------------------------------------------------------------
# The first-order meaning of a score


def test_predicted_change_matches_adding_a_sequence_once_more():
    rng = np.random.default_rng(3)
    n, dim, ridge = 200, 4, 1.0
    x, x_query = rng.normal(size=(n, dim)), rng.normal(size=dim)
    y = x @ rng.normal(size=dim) + 0.5 * rng.normal(size=n)
    w = np.linalg.solve(x.T @ x + ridge * np.eye(dim), x.T @ y)
    mean_hessian = (x.T @ x + ridge * np.eye(dim)) / n  # the Hessian of the MEAN loss, as G is a mean
    for m in range(5):
        grad = -(x[m] @ w - y[m]) * x[m]
        score = x_query @ np.linalg.solve(mean_hessian, grad)
        again = np.linalg.solve(x.T @ x + np.outer(x[m], x[m]) + ridge * np.eye(dim), x.T @ y + x[m] * y[m])
        actual = x_query @ again - x_query @ w
        assert predicted_change(score, n) == pytest.approx(actual, rel=0.05, abs=1e-4)
    with pytest.raises(ValueError):
        predicted_change(1.0, 0)


# ---------------------------------------------------------------------------------------------------------
# Fact tracing


def test_trace_metrics_on_a_hand_made_ranking():
    doc_ids, chunks = ["a", "b", "b", "c", "d"], [0, 0, 1, 0, 0]
    scores = np.array([
        [5.0, 4.0, 3.0, 2.0, 1.0],  # source a at rank 1
        [5.0, 1.0, 4.0, 3.0, 2.0],  # source b: its chunk 1 ranks 2nd
        [1.0, 1.0, 1.0, 1.0, 1.0],  # all tied: order by (doc_id, chunk) puts d last, rank 5
        [1.0, 2.0, 3.0, np.nan, 4.0],  # source c not ranked (NaN): reciprocal rank 0
        [1.0, 2.0, 3.0, 4.0, 0.0],  # source list {c, d}: c ranks first
    ])
    sources = [frozenset({"a"}), frozenset({"b"}), frozenset({"d"}), frozenset({"c"}), frozenset({"c", "d"})]
    ranks = source_ranks(scores, doc_ids, chunks, sources)
    assert ranks == [1, 2, 5, None, 1]
    metrics = trace_metrics(ranks, recall_at=(1, 2, 10))
    assert metrics.recall == {1: 0.4, 2: 0.6, 10: 0.8}
    assert metrics.mrr == pytest.approx((1 + 0.5 + 0.2 + 0 + 1) / 5)
    body = metrics.to_dict(["q1", "q2", "q3", "q4", "q5"])
    assert body["recall@1"] == 0.4 and body["ranks"]["q4"] is None


def test_bm25_baseline_and_candidates():
    texts = ["the whale swam", "a quick brown fox", "the union is strong", "whale and fox"]
    bm25 = bm25_matrix(["whale swam far"], texts)
    assert bm25.shape == (1, 4) and bm25[0].argmax() == 0 and bm25[0, 1] == 0
    mask = candidate_mask(bm25, ["a", "b", "c", "d"], [0, 0, 0, 0], 2, ["q"])
    assert mask.tolist() == [[True, False, False, True]]
    assert candidate_mask(bm25, ["a", "b", "c", "d"], [0] * 4, 0, ["q"]).all()


def test_queries_need_a_source(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p", "completion": " c", "source": ["d1", 7]}) + "\n\n"
                    + json.dumps({"id": "b", "prompt": "p", "completion": " c"}) + "\n")
    with pytest.raises(QueryError, match=r"q.jsonl:3: query 'b' has no 'source'"):
        load_sourced_queries(path)
    path.write_text(json.dumps({"id": "a", "prompt": "p", "completion": " c", "source": ["d1", 7]}) + "\n")
    queries, sources = load_sourced_queries(path)
    assert queries[0].id == "a" and sources == [frozenset({"d1", "7"})]


# ---------------------------------------------------------------------------------------------------------
# Exact influence against a dense autograd reference


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), hidden=8, layers=1, context=64)
    layers = find_tracked_layers(model, "mlp")
    sequences = list(iter_sequences(tokenizer, [(str(i), t) for i, t in enumerate(TEXTS)], 8))
    queries = [Query("whale", "The whale swam far", " beyond the harbour"), Query("fox", "A quick brown", " fox")]
    return model, tokenizer, layers, sequences, queries


def autograd_gradient(model, layers, batch, measure) -> torch.Tensor:
    """(D,) the gradient of measure(logits, batch).sum() with respect to the tracked weights, by autograd."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    grads = torch.autograd.grad(measure(logits, batch).sum(), [layer.module.weight for layer in layers])
    return torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)


def test_exact_influence_equals_a_dense_reference(tiny):
    model, tokenizer, layers, sequences, queries = tiny
    task, pad = LanguageModelingTask(), pad_id_of(tokenizer)
    train = torch.stack([autograd_gradient(model, layers, collate_sequences([s], pad), task.sequence_log_likelihood)
                         for s in sequences])  # (N, D), the data's labels
    query = torch.stack([autograd_gradient(model, layers, collate_queries(tokenizer, [q], None), task.measurement)
                         for q in queries])  # (Q, D)
    assert torch.allclose(flat_gradients(model, tokenizer, layers, sequences, None), train, atol=EXACT_TOLERANCE)
    assert torch.allclose(flat_query_gradients(model, tokenizer, layers, queries), query, atol=EXACT_TOLERANCE)
    # Empirical Fisher: its gradients are the data-label ones, so the reference is all dense algebra.
    fisher = flat_gradients(model, tokenizer, layers, sequences, "empirical")
    damping, per_layer = layer_dampings(fisher, layers)
    bounds = np.cumsum([0] + [layer.d_out * layer.d_in for layer in layers])
    dense = train.T @ train / train.shape[0]
    for layer, lo, hi in zip(layers, bounds[:-1], bounds[1:]):
        assert per_layer[layer.name] == pytest.approx(0.1 * float(torch.diagonal(dense)[lo:hi].mean()), rel=1e-12)
    reference = query @ torch.linalg.solve(dense + torch.diag(damping), train.T)  # (Q, N)
    assert train.shape[0] < train.shape[1]  # the Woodbury path
    scores = exact_scores(query, train, fisher, damping)
    assert np.allclose(scores, reference.numpy(), rtol=1e-7, atol=1e-10 * float(reference.abs().max()))


def test_exact_damping_is_the_factors_heuristic(tiny):
    model, tokenizer, layers, sequences, _ = tiny
    documents = [(str(i), t) for i, t in enumerate(TEXTS)]
    for strategy in ("ekfac", "diagonal"):
        factors = fit(model, tokenizer, layers, documents,
                      FitConfig(strategy=strategy, fisher="true", seq_len=8, batch_size=4))
        _, per_layer = layer_dampings(flat_gradients(model, tokenizer, layers, sequences, "true"), layers)
        for layer in layers:
            assert per_layer[layer.name] == pytest.approx(factors.damping(layer.name), rel=1e-9)


def test_both_solves_agree_with_a_dense_solve():
    generator = torch.Generator().manual_seed(0)
    for count in (7, 40):  # N < D (Woodbury) and N > D (Cholesky of the D x D system)
        jacobian = torch.randn(count, 12, generator=generator, dtype=torch.float64)
        damping = torch.rand(12, generator=generator, dtype=torch.float64) + 0.05
        vectors = torch.randn(3, 12, generator=generator, dtype=torch.float64)
        dense = jacobian.T @ jacobian / count + torch.diag(damping)
        expected = torch.linalg.solve(dense, vectors.T).T
        assert torch.allclose(damped_inverse_products(jacobian, damping, vectors), expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="positive damping"):
        damped_inverse_products(jacobian, torch.zeros(12, dtype=torch.float64), vectors)


def test_parameter_bound(tiny):
    _, _, layers, _, _ = tiny
    count = tracked_parameter_count(layers)
    assert check_parameter_bound(layers, count) == count
    with pytest.raises(ModelTooLargeError, match=rf"{count:,} parameters, above the bound of 100") as info:
        check_parameter_bound(layers, 100, "model/dir")
    assert isinstance(info.value, WhenceError) and "model/dir" in str(info.value)


def test_the_evaluation_package_never_imports_ray():
    import subprocess
    import sys

    code = ("import sys, whence.evaluation, whence.evaluation.exact, whence.evaluation.methods; "
            "assert not any(m == 'ray' or m.startswith(('ray.', 'flows', 'actors')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
