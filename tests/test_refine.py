"""ekfac-cg (whence.refine): Fisher-vector products and the preconditioned CG solve against dense float64
references (whence.evaluation.exact), batching invariance, its accuracy against exact influence, the API."""

import pytest
import torch

from tests.tiny import TEXTS, make_model, make_tokenizer
from whence.api import prepare, sequence_batches
from whence.config import ScoreConfig
from whence.errors import SettingsError
from whence.evaluation.exact import (
    agreement,
    damped_inverse_products,
    exact_scores,
    flat_gradients,
    flat_query_gradients,
)
from whence.evaluation.methods import ScoringSetup, influence_scores
from whence.fitting import fit_factors
from whence.model import find_tracked_layers, model_fingerprint
from whence.queries import HostedModel, prepare_queries
from whence.refine import DEFAULT_REFINE_STEPS, FisherVectorProduct, RefineSettings
from whence.text import Query, TrainingSequence

PRODUCT_RTOL = 1e-9  # float64 sums in another order than the dense J^T J / N
SOLVE_RTOL = 1e-6  # CG run to a 1e-10 relative residual (or 300 steps) against a Cholesky / Woodbury solve
BATCHING_RTOL = 1e-9  # one query alone or with others: the same CG, products summed in another GEMM shape
SEED = 3  # the factors' seed: the true Fisher's labels are drawn from it per sequence


class _NoPadding:
    pad_token_id = eos_token_id = 0


def random_sequences(vocab: int, count: int, length: int, seed: int = 0, ragged: bool = False):
    """`count` random sequences; with `ragged`, lengths vary (batches are padded: padding must not count)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (count, length), generator=generator)
    lengths = [length - (i % 5 if ragged else 0) for i in range(count)]
    return [TrainingSequence(f"s{i}", 0, tuple(row[:n].tolist())) for i, (row, n) in enumerate(zip(tokens, lengths))]


QUERIES = [Query(f"q{i}", text[:24], text[24:44]) for i, text in enumerate(TEXTS[:5])]


def setting(family: str, fitting_count: int, hidden: int = 8, blocks: int = 2, ragged: bool = True):
    """A tiny float64 model, its MLP layers, fitting sequences and EK-FAC factors fitted on them (seed SEED)."""
    tokenizer = make_tokenizer()
    model = make_model(family, len(tokenizer), hidden=hidden, layers=blocks, context=64)
    layers = find_tracked_layers(model, "mlp")
    fitting = random_sequences(len(tokenizer), fitting_count, 12, ragged=ragged)
    factors = fit_factors(model, layers, lambda: (b for _, b in sequence_batches(tokenizer, fitting, 5, SEED)),
                          metadata={"arguments": {"seed": SEED, "fisher": "true"},
                                    "model_fingerprint": model_fingerprint(model)})

    def batches():
        return (b for _, b in sequence_batches(tokenizer, fitting, 4, SEED))

    return tokenizer, model, layers, fitting, factors, batches


def flat(vectors: dict, layers) -> torch.Tensor:
    """(Q, D) in whence.evaluation.exact's layout: layers in forward order, each (d_out, d_in) row-major."""
    return torch.cat([vectors[layer.name].flatten(1).cpu() for layer in layers], dim=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["tokens", "gradient"])
def test_fisher_vector_product_equals_the_dense_fisher(family, path):
    tokenizer, model, layers, fitting, _, batches = setting(family, 10)
    jacobian = flat_gradients(model, tokenizer, layers, fitting, "true", SEED)  # (N, D)
    dense = jacobian.T @ jacobian / jacobian.shape[0]  # G (D, D), cross-layer blocks included
    generator = torch.Generator().manual_seed(1)
    v = {layer.name: torch.randn(3, layer.d_out, layer.d_in, generator=generator, dtype=torch.float64)
         for layer in layers}
    product = FisherVectorProduct(model, layers, batches, "true", path=path)
    expected = flat(v, layers) @ dense  # (Q, D) rows (G v_q)^T, G symmetric
    torch.testing.assert_close(flat(product(v), layers), expected, rtol=PRODUCT_RTOL,
                               atol=PRODUCT_RTOL * float(expected.abs().max()))
    assert product.passes == 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("stages, path", [(2, "tokens"), (3, "gradient")])
def test_products_over_pipeline_stages_equal_the_whole_models(family, stages, path):
    """With --shards, each stage gives its layers' part of c; their sum goes back to every stage (whence.shards).
    Three blocks and a micro-batch of 3 in batches of 4: stages hold several micro-batches of unequal size."""
    from whence.shards import ShardedPipeline

    tokenizer, model, layers, _, _, batches = setting(family, 10, blocks=3)
    generator = torch.Generator().manual_seed(2)
    v = {layer.name: torch.randn(3, layer.d_out, layer.d_in, generator=generator, dtype=torch.float64)
         for layer in layers}
    expected = FisherVectorProduct(model, layers, batches, "true", path=path)(v)
    pipeline = ShardedPipeline(model, layers, stages, fisher="true", micro_batch_size=3)
    actual = pipeline.fisher_vector_product(batches, v, path)
    assert list(actual) == [layer.name for layer in layers]
    torch.testing.assert_close(flat(actual, layers), flat(expected, layers), rtol=PRODUCT_RTOL,
                               atol=PRODUCT_RTOL * float(flat(expected, layers).abs().max()))


@pytest.mark.parametrize("family, blocks", [("llama", 2), ("gpt2", 1)])
def test_enough_steps_solve_the_damped_fisher_exactly(family, blocks):
    """Llama: six bias-free MLP layers; GPT-2: c_fc and c_proj, Conv1D with biases (folded in as an input of 1).
    (Two GPT-2 blocks converge too slowly for a quick test: ~1e-5 after 300 steps.)"""
    tokenizer, model, layers, fitting, factors, _ = setting(family, 12, blocks=blocks)

    def batches():  # one batch: the products are the same, the passes quicker
        return (b for _, b in sequence_batches(tokenizer, fitting, len(fitting), SEED))

    jacobian = flat_gradients(model, tokenizer, layers, fitting, "true", SEED)
    damping = torch.cat([torch.full((layer.d_out * layer.d_in,), factors.damping(layer.name), dtype=torch.float64)
                         for layer in layers])  # the factors' heuristic per layer, as ekfac-cg's D
    expected = damped_inverse_products(jacobian, damping, flat_query_gradients(model, tokenizer, layers, QUERIES))
    prepared = prepare_queries(HostedModel(model, tokenizer, layers), factors, QUERIES, "full", method="ekfac-cg",
                               fitting=batches, refine=RefineSettings(steps=300, tolerance=1e-10))
    residuals = prepared.diagnostics["max_relative_residual"]
    print(f"{family}: {prepared.diagnostics['steps']} steps, relative residuals {residuals[0]:.1e} ... "
          f"{residuals[-1]:.1e}")
    assert residuals[-1] < 1e-8
    solved = flat(prepared.full, layers)
    torch.testing.assert_close(solved, expected, rtol=SOLVE_RTOL, atol=SOLVE_RTOL * float(expected.abs().max()))
    # and EK-FAC alone is not that solution (the test would otherwise prove nothing)
    ekfac = flat(prepare_queries(HostedModel(model, tokenizer, layers), factors, QUERIES, "full").full, layers)
    assert float((ekfac - expected).norm() / expected.norm()) > 100 * SOLVE_RTOL


def test_queries_batched_equal_queries_one_by_one():
    tokenizer, model, layers, _, factors, batches = setting("llama", 8)
    hosted, refine = HostedModel(model, tokenizer, layers), RefineSettings(steps=6, tolerance=0.0)
    together = prepare_queries(hosted, factors, QUERIES, "full", method="ekfac-cg", fitting=batches, refine=refine)
    for q, query in enumerate(QUERIES):
        alone = prepare_queries(hosted, factors, [query], "full", method="ekfac-cg", fitting=batches, refine=refine)
        for layer in layers:
            torch.testing.assert_close(alone.full[layer.name][0], together.full[layer.name][q], rtol=BATCHING_RTOL,
                                       atol=BATCHING_RTOL * float(together.full[layer.name][q].abs().max()))
        assert alone.diagnostics["relative_residuals"][-1][0] == pytest.approx(
            together.diagnostics["relative_residuals"][-1][q], rel=1e-6)


def test_default_steps_reach_exact_influence_where_ekfac_does_not():
    """Six MLP layers of a two-block Llama of width 16 (D = 3,072): EK-FAC drops the cross-layer blocks, which
    hold much of this Fisher's mass; DEFAULT_REFINE_STEPS of PCG recover them."""
    tokenizer, model, layers, fitting, factors, _ = setting("llama", 256, hidden=16, ragged=False)
    assert len(layers) >= 6
    train = random_sequences(len(tokenizer), 32, 12, seed=1)
    jacobian = flat_gradients(model, tokenizer, layers, fitting, "true", SEED)
    damping = torch.cat([torch.full((layer.d_out * layer.d_in,), factors.damping(layer.name), dtype=torch.float64)
                         for layer in layers])
    exact = exact_scores(flat_query_gradients(model, tokenizer, layers, QUERIES),
                         flat_gradients(model, tokenizer, layers, train, None), jacobian, damping)
    setup = ScoringSetup(model, tokenizer, layers, [], 12)  # scored from the sequences' gradients directly
    ekfac = influence_scores_of(setup, factors, "ekfac", fitting, train)
    refined, diagnostics = influence_scores_of(setup, factors, "ekfac-cg", fitting, train, with_diagnostics=True)
    ekfac_pearson, refined_pearson = agreement(ekfac, exact)["pearson"], agreement(refined, exact)["pearson"]
    print(f"mean per-query Pearson against exact influence: ekfac {ekfac_pearson:.4f}, "
          f"ekfac-cg ({DEFAULT_REFINE_STEPS} steps) {refined_pearson:.4f}; max relative residual per step "
          f"{[round(r, 3) for r in diagnostics['max_relative_residual']]}")
    assert ekfac_pearson <= 0.85
    assert refined_pearson >= 0.95


def influence_scores_of(setup, factors, method, fitting, train, with_diagnostics=False):
    """(Q, N) scores of `method` over the `train` sequences: full-rank prepared queries (whence.api.prepare with
    the default refine settings) dotted with the sequences' data-label gradients."""
    config = ScoreConfig(method=method, query_rank="full", refine_sequences=len(fitting), seq_len=setup.seq_len)
    prepared = prepare(setup.model, setup.tokenizer, setup.layers, factors, QUERIES, config, fitting=fitting)
    scores = (flat(prepared.full, setup.layers) @ flat_gradients(setup.model, setup.tokenizer, setup.layers, train,
                                                                 None).T).numpy()
    return (scores, prepared.diagnostics) if with_diagnostics else scores


def test_api_and_evaluation_take_ekfac_cg():
    tokenizer, model, layers, fitting, factors, _ = setting("llama", 8)
    documents = [(str(i), text) for i, text in enumerate(TEXTS)]
    with pytest.raises(ValueError, match="needs the fitting documents"):
        prepare(model, tokenizer, layers, factors, QUERIES, ScoreConfig(method="ekfac-cg"))
    config = ScoreConfig(method="ekfac-cg", query_rank=4, refine_steps=3, refine_sequences=5, seq_len=12)
    prepared = prepare(model, tokenizer, layers, factors, QUERIES, config, fitting=documents)
    assert prepared.rank == 4 and prepared.diagnostics["steps"] == 3
    assert len(prepared.diagnostics["relative_residuals"]) == 4  # x_0 and three steps
    setup = ScoringSetup(model, tokenizer, layers, documents, 12)
    scores = influence_scores(setup, factors, QUERIES, "ekfac-cg", fitting)
    assert scores.shape[0] == len(QUERIES) and bool(torch.isfinite(torch.as_tensor(scores)).all())
    with pytest.raises(SettingsError, match="refine_steps"):
        ScoreConfig(refine_steps=0)
