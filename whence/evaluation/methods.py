"""Every method's scores of every (query, training sequence) pair, in process (small evaluation setups).

Influence methods go through the Python API (whence.api.prepare and whence.api.score, so they are scored
exactly as `whence score` scores them with `--top-k all --tfidf-candidates 0`); LiSSA runs its stochastic
recursion over the fitting sequences' batches. Scores come back as (Q, N): queries by sequences, the sequences
in corpus order (document, then chunk), the order of `whence.text.iter_sequences`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from whence.api import prepare, score, sequence_batches
from whence.config import ScoreConfig
from whence.factors import Factors
from whence.lissa import lissa_prepare_queries
from whence.model import TrackedLayer
from whence.queries import METHODS, HostedModel
from whence.text import Query, TrainingSequence

BASELINES = ("tfidf", "random")
# The gradient index (whence.index) at its default dimension, EK-FAC-preconditioned: method -> projection kind.
INDEX_METHODS = {"index": "eigen", "index-random": "random", "index-lowrank": "lowrank"}
ALL_METHODS = METHODS + tuple(INDEX_METHODS) + BASELINES


def parse_methods(text: str | Sequence[str], allowed: Sequence[str] = ALL_METHODS) -> list[str]:
    """Method names from "ekfac,identity" (or a list), in the order given, each once; ValueError otherwise."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown or names}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


@dataclass
class ScoringSetup:
    """What every method scores with: the model, its tracked layers, and the documents cut into sequences."""

    model: object
    tokenizer: object
    layers: list[TrackedLayer]
    documents: list[tuple[str, str]]  # (doc_id, text) in corpus order
    seq_len: int
    batch_size: int = 8
    query_rank: int | str = "full"
    damping: float | str = "heuristic"


def influence_scores(setup: ScoringSetup, factors: Factors, queries: Sequence[Query], method: str,
                     fitting: Sequence[TrainingSequence] = ()) -> np.ndarray:
    """(Q, N) scores of `method` (one of whence.queries.METHODS) for every sequence of the setup's documents.
    LiSSA's Fisher-vector products use the `fitting` sequences with the factors' Fisher and seed."""
    config = ScoreConfig(top_k=None, tfidf_candidates=0, query_rank=setup.query_rank, damping=setup.damping,
                         method=method, seq_len=setup.seq_len, batch_size=setup.batch_size,
                         refine_sequences=max(len(fitting), 1))  # ekfac-cg: the Fisher of every fitting sequence
    if method == "lissa":
        if not fitting:
            raise ValueError("LiSSA needs fitting sequences for its Fisher-vector products")
        arguments = factors.metadata.get("arguments", {})
        batches = [batch for _, batch in sequence_batches(setup.tokenizer, fitting, setup.batch_size,
                                                          int(arguments.get("seed", 0)))]
        prepared = lissa_prepare_queries(HostedModel(setup.model, setup.tokenizer, setup.layers), factors,
                                         list(queries), batches, setup.query_rank, setup.damping,
                                         fisher=arguments.get("fisher", "true"))
    else:  # ekfac-cg's Fisher-vector products use the fitting sequences too
        prepared = prepare(setup.model, setup.tokenizer, setup.layers, factors, list(queries), config, fitting or None)
    table = score(setup.model, setup.tokenizer, setup.layers, prepared, setup.documents, config)
    return np.ascontiguousarray(table.scores.T)  # (Q, N)


def index_scores(setup: ScoringSetup, factors: Factors, queries: Sequence[Query], kind: str) -> np.ndarray:
    """(Q, N) scores of an in-memory gradient index of the setup's sequences (projection `kind`, the default
    dimension and seed), queries preconditioned by EK-FAC in the compressed space, as `whence query` scores."""
    from whence.index import GradientCompressor, build_projections, score_shard
    from whence.queries import query_gradients
    from whence.text import iter_sequences

    projections = build_projections(factors, kind)  # the kind's default dimension
    compressor = GradientCompressor(setup.model, setup.tokenizer, setup.layers, projections)
    shard = compressor.shard(0, iter_sequences(setup.tokenizer, setup.documents, setup.seq_len), setup.batch_size)
    gradients = query_gradients(setup.model, setup.tokenizer, setup.layers, list(queries))
    # At the setup's query rank, as `whence query --query-rank` meets the queries.
    prepared = projections.prepare(gradients, factors, "ekfac", setup.damping, query_rank=setup.query_rank)
    return np.ascontiguousarray(score_shard(shard, prepared, projections.layout(setup.query_rank)).scores.T)  # (Q, N)
