"""The CUDA path: fitting and scoring on a GPU equal the CPU results (float64), and bfloat16 ranks training
sequences as float32 does. Marked `gpu`, which the default run deselects (CI has no GPU); on a GPU machine:
`pytest -m gpu`. The pipeline's tests (test_pipeline.py, test_shards.py) run their actors on the GPU there.
"""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from tests.tiny import TEXTS, make_model
from whence import FitConfig, ScoreConfig, fit, prepare, score
from whence.factors import Factors
from whence.model import find_tracked_layers, parse_dtype

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

QUERIES = [{"id": "whale", "prompt": "The whale swam far", "completion": " beyond the harbour"},
           {"id": "union", "prompt": "The state of the union", "completion": " is strong"},
           {"id": "fox", "prompt": "A quick brown", "completion": " fox jumps"}]
# float64 on both devices: the order of floating-point reductions differs, and so do the eigensolvers (LAPACK,
# cuSOLVER), which settle the eigenvectors of nearly equal eigenvalues differently; EK-FAC's corrected
# eigenvalues, in those eigenvectors' basis, follow at about 1e-5 on the tiny models.
FLOAT64 = dict(rtol=1e-4, atol=1e-8)
MIN_BFLOAT16_PEARSON = 0.9  # per query, bfloat16 scores against float32 scores of the same model
MIN_BFLOAT16_SPEARMAN = 0.9


def fit_and_score(model, tokenizer, seq_len=12, rank="full"):
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, enumerate(TEXTS * 3), FitConfig(seq_len=seq_len, batch_size=5))
    prepared = prepare(model, tokenizer, layers, factors, QUERIES, ScoreConfig(query_rank=rank))
    table = score(model, tokenizer, layers, prepared, enumerate(TEXTS * 3), ScoreConfig(seq_len=seq_len))
    return layers, factors, table


def test_fit_and_scores_on_cuda_equal_cpu(family, tokenizer, tmp_path):
    _, cpu_factors, cpu_table = fit_and_score(make_model(family, len(tokenizer)), tokenizer)
    gpu_model = make_model(family, len(tokenizer)).cuda()
    layers, gpu_factors, gpu_table = fit_and_score(gpu_model, tokenizer)
    gpu_factors.save(tmp_path / "factors")  # factors fitted on a GPU save and load like any others
    loaded = Factors.load(tmp_path / "factors")
    for layer in layers:
        torch.testing.assert_close(loaded.eigenvalues[layer.name].cpu(), cpu_factors.eigenvalues[layer.name],
                                   **FLOAT64)
        v = torch.randn(layer.d_out, layer.d_in, dtype=torch.float64)
        torch.testing.assert_close(loaded.precondition(layer.name, v), cpu_factors.precondition(layer.name, v),
                                   **FLOAT64)
    assert gpu_table.doc_ids == cpu_table.doc_ids
    np.testing.assert_allclose(gpu_table.scores, cpu_table.scores, **FLOAT64)
    np.testing.assert_allclose(gpu_table.layer_scores, cpu_table.layer_scores, **FLOAT64)


@pytest.mark.parametrize("rank", [8, "full"])
def test_bfloat16_scores_follow_float32(tokenizer, rank):
    """`--dtype auto` on a GPU is bfloat16: the same weights in bfloat16 give scores that correlate with and
    rank sequences like float32 ones (factors fitted in each precision, as `whence fit` would)."""
    assert parse_dtype("auto", torch.device("cuda")) == torch.bfloat16
    model = make_model("llama", len(tokenizer), hidden=64, dtype=torch.float32).cuda()
    _, _, reference = fit_and_score(model, tokenizer, seq_len=16, rank=rank)
    _, factors, table = fit_and_score(model.to(torch.bfloat16), tokenizer, seq_len=16, rank=rank)
    assert all(torch.isfinite(values).all() for values in factors.eigenvalues.values())
    for q, query in enumerate(QUERIES):
        pearson = pearsonr(table.scores[:, q], reference.scores[:, q]).statistic
        spearman = spearmanr(table.scores[:, q], reference.scores[:, q]).statistic
        print(f"{query['id']} rank {rank}: bfloat16 vs float32 Pearson {pearson:.4f}, Spearman {spearman:.4f}")
        assert pearson >= MIN_BFLOAT16_PEARSON and spearman >= MIN_BFLOAT16_SPEARMAN, query["id"]


@pytest.mark.parametrize("kind", ["eigen", "lowrank"])
def test_index_search_on_cuda_equals_cpu(tokenizer, kind):
    from whence.index import GradientCompressor, build_projections, score_shard
    from whence.queries import query_gradients
    from whence.text import Query, iter_sequences

    model = make_model("llama", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, enumerate(TEXTS), FitConfig(seq_len=12))
    projections = build_projections(factors, kind, 4)
    shard = GradientCompressor(model, tokenizer, layers, projections).shard(
        0, iter_sequences(tokenizer, enumerate(TEXTS), 12), 4)
    queries = [Query(q["id"], q["prompt"], q["completion"]) for q in QUERIES]
    prepared = projections.prepare(query_gradients(model, tokenizer, layers, queries), factors)
    cpu, gpu = (score_shard(shard, prepared, projections.layout(), device=d) for d in ("cpu", "cuda"))
    np.testing.assert_allclose(gpu.layer_scores, cpu.layer_scores, rtol=1e-9, atol=1e-12 * np.abs(cpu.scores).max())
