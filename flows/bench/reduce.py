"""What the driver of `whence score` pays per scored sequence, when scorers send every score against when they send
their batches' per-query top-k (whence.fragment_parts.reduce_to_top_k): bytes received per sequence and CPU
seconds per 1,000 sequences to absorb them (FragmentResults.add), and the scorers' seconds to cut a batch.

In process and synthetic: the batches have the shape the scorers emit (ROWS_PER_BLOCK sequence rows, Q queries,
L tracked layers: 90 is SmolLM2-135M's MLP layers), with random scores; only the sizes matter for these costs.
"""

from __future__ import annotations

import time

import numpy as np

from flows.corpus_pipeline import ROWS_PER_BLOCK
from whence.fragment_parts import FragmentResults, reduce_to_top_k

LAYERS = 90
TOP_K = 10
BLOCKS = 8  # per setting: 512 sequences


def scored_block(rng, queries: int, fragment: int, start: int) -> dict[str, np.ndarray]:
    """One scorer output batch of ROWS_PER_BLOCK sequences: scores (N, Q), layer_scores (N, Q, L)."""
    n = ROWS_PER_BLOCK
    layer_scores = rng.normal(size=(n, queries, LAYERS))
    return {"fragment": np.full(n, fragment), "doc_id": np.asarray([f"doc-{start + i:07d}" for i in range(n)], object),
            "chunk": np.zeros(n, np.int64), "marker_total": np.full(n, -1), "scores": layer_scores.sum(axis=2),
            "layer_scores": layer_scores, "non_finite": np.zeros(n, bool), "num_tokens": np.full(n, 128)}


def batch_bytes(batch: dict[str, np.ndarray]) -> int:
    """The arrays' bytes, object columns counted by their strings' lengths."""
    return sum(v.nbytes + (sum(len(str(x)) for x in v) if v.dtype == object else 0) for v in batch.values())


def absorb(batches: list[dict], queries: int) -> float:
    """CPU seconds for the driver to fold `batches` into one fragment's top-k."""
    results = FragmentResults(0, [f"q{q}" for q in range(queries)], TOP_K, LAYERS, keep_all=False)
    tick = time.process_time()
    for batch in batches:
        results.add(batch)
    return time.process_time() - tick


def driver_costs(queries_settings: tuple[int, ...] = (32, 256), seed: int = 0) -> tuple[dict, dict]:
    """Figures (ratios: top-k over every score) and details (absolute bytes and seconds) per number of queries."""
    figures, details = {}, {}
    rng = np.random.default_rng(seed)
    for queries in queries_settings:
        every = [scored_block(rng, queries, 0, b * ROWS_PER_BLOCK) for b in range(BLOCKS)]
        tick = time.process_time()
        cut = [reduce_to_top_k(batch, TOP_K) for batch in every]
        cut_seconds = time.process_time() - tick
        sequences = BLOCKS * ROWS_PER_BLOCK
        bytes_every = sum(batch_bytes(b) for b in every) / sequences
        bytes_cut = sum(batch_bytes(b) for b in cut) / sequences
        cpu_every = absorb(every, queries) / sequences * 1000
        cpu_cut = absorb(cut, queries) / sequences * 1000
        figures[f"driver_bytes_topk_vs_all_q{queries}"] = bytes_cut / bytes_every
        figures[f"driver_cpu_topk_vs_all_q{queries}"] = cpu_cut / cpu_every
        details[f"q{queries}"] = {"bytes_per_sequence_all": bytes_every, "bytes_per_sequence_topk": bytes_cut,
                                  "driver_cpu_s_per_1000_all": cpu_every, "driver_cpu_s_per_1000_topk": cpu_cut,
                                  "scorer_cpu_s_per_1000_to_cut": cut_seconds / sequences * 1000,
                                  "rows_per_batch": ROWS_PER_BLOCK, "layers": LAYERS, "top_k": TOP_K}
    return figures, details
