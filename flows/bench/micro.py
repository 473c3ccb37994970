"""The micro setting: a model small enough for the exact damped Fisher inverse, shared by tests/test_accuracy.py
(EK-FAC, K-FAC and diagonal against the exact inverse; LiSSA's convergence) and `whence bench`'s lissa figure.

A Llama of width 12 whose block-0 MLP down_proj, (d_out, d_in) = (12, 24) = 288 parameters, has a full-rank
Fisher. (In GPT-2 every MLP layer has a singular Fisher block: c_fc reads layer-normed inputs, which span one
dimension less, and c_proj writes to a residual stream read only through LayerNorms, which ignore its mean.)
Sequences are random tokens; the Fisher is the exact one from per-sequence gradients (true Fisher, as fitting
samples it), and the EK-FAC factors are fitted on the same sequences. Pure torch: no Ray, nothing from tests/.
"""

from __future__ import annotations

import torch

MICRO_VOCAB = 257  # as the tests' tiny tokenizer: 256 byte symbols and <|endoftext|>
MICRO_SEQ_LEN = 12  # tokens per sequence
TRAIN_SEQUENCES = 32  # sequences whose influence is measured (the tests')
QUERY_SEQUENCES = 8  # query gradients (data labels)
GRADIENT_BATCH, FIT_BATCH = 16, 64  # sequences per batch for per-sequence gradients, and for fit_factors
MICRO_MODULES = r"layers\.0\.mlp\.down_proj$"


class _NoPadding:
    """sequence_batches asks a tokenizer only for its padding id; every micro sequence has the same length."""

    pad_token_id = eos_token_id = 0


def micro_model(vocab: int = MICRO_VOCAB, seed: int = 0):
    """The width-12, two-block Llama in float64, eval mode (built from a config, never downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).to(torch.float64).eval()


def per_sequence_gradients(model, layer, sequences, objective) -> torch.Tensor:
    """(N, d_out * d_in): each sequence's gradient of `objective` for `layer`, row-major, float64."""
    from whence.api import sequence_batches
    from whence.task import LanguageModelingTask
    from whence.tracking import LayerTracker

    task, tracker = LanguageModelingTask(), LayerTracker([layer])
    parts = []
    for _, batch in sequence_batches(_NoPadding(), sequences, GRADIENT_BATCH):
        (capture,) = tracker.capture(model, batch, objective, task.forward)
        parts.append(capture.per_sequence_gradients().flatten(1).to(torch.float64))
    return torch.cat(parts)


def micro_setting(fit_sequences: int = 2500, vocab: int = MICRO_VOCAB, seed: int = 0) -> dict:
    """The model, its one tracked `layer`, and on `fit_sequences` random sequences: the exact Fisher (D, D) with
    D = 288, the `fit_gradients` (N, D) it is made of and EK-FAC `factors`; and from further sequences the data
    gradients of TRAIN_SEQUENCES training sequences, `train` (32, D), and of QUERY_SEQUENCES queries,
    `queries` (8, D)."""
    from whence.api import sequence_batches
    from whence.fitting import fit_factors
    from whence.model import find_tracked_layers
    from whence.task import LanguageModelingTask
    from whence.text import TrainingSequence

    model = micro_model(vocab, seed)
    (layer,) = find_tracked_layers(model, MICRO_MODULES)
    generator = torch.Generator().manual_seed(seed)
    extra = TRAIN_SEQUENCES + QUERY_SEQUENCES
    tokens = torch.randint(1, vocab, (fit_sequences + extra, MICRO_SEQ_LEN), generator=generator)
    sequences = [TrainingSequence(str(i), 0, tuple(row.tolist())) for i, row in enumerate(tokens)]
    fit_set, train_set = sequences[:fit_sequences], sequences[-extra:-QUERY_SEQUENCES]
    query_set = sequences[-QUERY_SEQUENCES:]
    task = LanguageModelingTask()
    gradients = per_sequence_gradients(model, layer, fit_set, lambda logits, b: task.fisher_objective(logits, b, "true"))
    factors = fit_factors(model, [layer], lambda: (b for _, b in sequence_batches(_NoPadding(), fit_set, FIT_BATCH)))
    return {"model": model, "layer": layer, "fisher": gradients.T @ gradients / gradients.shape[0],  # G = mean g g^T
            "fit_gradients": gradients, "factors": factors,
            "train": per_sequence_gradients(model, layer, train_set, task.sequence_log_likelihood),
            "queries": per_sequence_gradients(model, layer, query_set, task.sequence_log_likelihood)}
