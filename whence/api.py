"""The in-process Python API: fit factors, prepare queries and score texts, without a Ray cluster.

    model, tokenizer = load_causal_lm("path/to/model")
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, documents, FitConfig(seq_len=256))
    prepared = prepare(model, tokenizer, layers, factors, queries)
    refined = prepare(model, tokenizer, layers, factors, queries, ScoreConfig(method="ekfac-cg"), fitting=documents)
    table = score(model, tokenizer, layers, prepared, documents, ScoreConfig(top_k=10))
    table.top("q1")

`documents` is an iterable of (doc_id, text) pairs, or of plain strings (ids "0", "1", ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice

import numpy as np
import torch

from whence.config import FitConfig, ScoreConfig
from whence.factors import Factors
from whence.fitting import fit_factors
from whence.model import TrackedLayer, model_fingerprint
from whence.queries import HostedModel, PreparedQueries, prepare_queries
from whence.refine import RefineSettings, fitted_fisher
from whence.scoring import QueryScorer
from whence.task import sequence_seed
from whence.text import Query, TrainingSequence, collate_sequences, iter_sequences, pad_id_of
from whence.topk import TopK


def as_documents(documents: Iterable) -> Iterator[tuple[str, str]]:
    for index, item in enumerate(documents):
        yield (str(index), item) if isinstance(item, str) else (str(item[0]), item[1])


def sequence_batches(tokenizer, sequences: Iterable[TrainingSequence], batch_size: int, seed: int = 0
                     ) -> Iterator[tuple[list[TrainingSequence], dict]]:
    """(sequences, batch) pairs; each batch carries per-sequence seeds for true-Fisher sampling."""
    pad_id = pad_id_of(tokenizer)
    iterator = iter(sequences)
    while group := list(islice(iterator, batch_size)):
        batch = collate_sequences(group, pad_id)
        batch["seeds"] = torch.tensor([sequence_seed(seed, s.doc_id, s.chunk) for s in group], dtype=torch.long)
        yield group, batch


def fit(model, tokenizer, layers: list[TrackedLayer], documents: Iterable, config: FitConfig | None = None) -> Factors:
    """Fit factors on `documents` in this process (two passes over them; they are materialised once)."""
    config = config or FitConfig()
    sequences = list(islice(iter_sequences(tokenizer, as_documents(documents), config.seq_len),
                            config.max_sequences))
    if not sequences:
        raise ValueError("no training sequences: the documents are empty or shorter than two tokens")
    metadata = {"model_fingerprint": model_fingerprint(model), "arguments": config.to_dict()}
    return fit_factors(
        model, layers, lambda: (b for _, b in sequence_batches(tokenizer, sequences, config.batch_size, config.seed)),
        config.strategy, config.fisher, config.num_blocks, metadata,
    )


def prepare(model, tokenizer, layers: list[TrackedLayer], factors: Factors, queries: Sequence[Query | dict],
            config: ScoreConfig | None = None, fitting: Iterable | None = None) -> PreparedQueries:
    """The queries' gradients preconditioned by config.method. ekfac-cg also needs `fitting`: the fitting
    documents (as for `fit`) or TrainingSequence objects, of which it uses the first config.refine_sequences."""
    config = config or ScoreConfig()
    queries = [q if isinstance(q, Query) else Query(str(q["id"]), q["prompt"], q["completion"]) for q in queries]
    factors.check_compatible(model_fingerprint(model), [layer.describe() for layer in layers])
    batches = None
    if config.method == "ekfac-cg":
        if fitting is None:
            raise ValueError("method ekfac-cg needs the fitting documents: prepare(..., fitting=documents)")
        batches = refine_batches(tokenizer, factors, fitting, config)
    return prepare_queries(HostedModel(model, tokenizer, layers), factors, queries, config.query_rank,
                           config.damping, config.method, batches, RefineSettings(config.refine_steps,
                                                                                  config.refine_tolerance))


def refine_batches(tokenizer, factors: Factors, fitting: Iterable, config: ScoreConfig) -> Callable[[], Iterator[dict]]:
    """ekfac-cg's fitting batches, a fresh iterator per call: the first config.refine_sequences sequences of
    `fitting` (documents cut with the factors' seq_len, or TrainingSequence objects as they are), labels
    seeded with the factors' seed as fitting seeds them."""
    iterator = iter(fitting)
    first = next(iterator, None)
    items = chain([] if first is None else [first], iterator)
    arguments = factors.metadata.get("arguments") or {}
    sequences = items if isinstance(first, TrainingSequence) else iter_sequences(
        tokenizer, as_documents(items), config.seq_len or int(arguments.get("seq_len", 512)))
    kept = list(islice(sequences, config.refine_sequences))  # token ids only: streamed through the model per pass
    if not kept:
        raise ValueError("ekfac-cg: no fitting sequences in `fitting` (empty, or documents under two tokens)")
    seed = fitted_fisher(factors)[1]
    return lambda: (batch for _, batch in sequence_batches(tokenizer, kept, config.batch_size, seed))


@dataclass
class ScoreTable:
    """Every scored sequence: keys, scores (N, Q) and per-layer scores (N, Q, L)."""

    query_ids: list[str]
    layer_names: list[str]
    doc_ids: list[str]
    chunks: np.ndarray
    scores: np.ndarray
    layer_scores: np.ndarray

    def top(self, query_id: str, k: int = 10) -> list[dict]:
        """The k highest-scoring sequences for one query (ties by doc id, chunk)."""
        q = self.query_ids.index(query_id)
        topk = TopK.empty([query_id], k, len(self.layer_names))
        topk.update(self.doc_ids, self.chunks, self.scores[:, q : q + 1], self.layer_scores[:, q : q + 1])
        return list(topk.rows())


def score(model, tokenizer, layers: list[TrackedLayer], prepared: PreparedQueries, documents: Iterable,
          config: ScoreConfig | None = None, seq_len: int = 512) -> ScoreTable:
    """Score every sequence of `documents` against the prepared queries (no TF-IDF filtering in-process)."""
    config = config or ScoreConfig()
    scorer = QueryScorer(model, layers, prepared)
    doc_ids, chunks, scores, layer_scores = [], [], [], []
    sequences = iter_sequences(tokenizer, as_documents(documents), config.seq_len or seq_len)
    for group, batch in sequence_batches(tokenizer, sequences, config.batch_size):
        result = scorer.score(batch)
        doc_ids += [s.doc_id for s in group]
        chunks += [s.chunk for s in group]
        scores.append(result.total.T.cpu().numpy())
        layer_scores.append(result.per_layer.permute(1, 0, 2).cpu().numpy())
    return ScoreTable(prepared.query_ids, prepared.layer_names, doc_ids, np.asarray(chunks, dtype=np.int64),
                      np.concatenate(scores), np.concatenate(layer_scores))
