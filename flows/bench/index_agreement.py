"""How much an index's compression costs in agreement with the full EK-FAC score, in process (no Ray):

    python -m flows.bench.index_agreement --model DIR --factors DIR --corpus PATH [PATH ...]
        --queries Q.jsonl [--new-queries Q.jsonl] [--dims 8,16,32,64] [--kinds eigen,random] [--max-sequences N]

One model pass over the corpus's sequences: per batch, the tracked layers' captures are scored exactly (the
queries preconditioned at full rank: what `whence score --tfidf-candidates 0 --top-k all --query-rank full`
computes) and compressed by every (kind, dim) projection, whose rows are rounded to float16 (and kept in
float32) as an index would store them. Prints, per projection and storage dtype, the mean per-query Spearman
correlation with the exact scores and the mean top-10 overlap, for the --queries and the --new-queries
separately, and the index bytes per sequence.

    python -m flows.bench.index_agreement --compare REFERENCE_DIR RESULTS_DIR [RESULTS_DIR ...]

compares results directories written with --top-k all (`whence query` against `whence score
--tfidf-candidates 0 --top-k all`): per query, Spearman over the sequences both scored and top-10 overlap.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import islice

import numpy as np
import torch

TOP = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--factors", required=True)
    parser.add_argument("--corpus", required=True, nargs="+")
    parser.add_argument("--queries", required=True)
    parser.add_argument("--new-queries", default=None)
    parser.add_argument("--dims", default="8,16,32,64")
    parser.add_argument("--kinds", default="eigen,random")
    parser.add_argument("--max-sequences", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, metavar="FILE.json")


def exact_and_compressed(args, queries) -> tuple[np.ndarray, dict, dict, int]:
    """(exact scores (N, Q), {(kind, dim, dtype): scores (N, Q)}, {(kind, dim): bytes per float16 row}, N)."""
    from flows.corpus_pipeline import ReadSettings, fragment_sequences
    from whence.corpus import list_fragments
    from whence.factors import Factors
    from whence.index import build_projections
    from whence.model import find_tracked_layers, load_causal_lm
    from whence.queries import HostedModel, prepare_queries, query_gradients
    from whence.scoring import QueryScorer
    from whence.text import collate_sequences, pad_id_of

    model, tokenizer = load_causal_lm(args.model, device="cpu", dtype="float32")
    factors = Factors.load(args.factors)
    arguments = factors.metadata.get("arguments", {})
    layers = find_tracked_layers(model, arguments.get("modules", "mlp"))
    scorer = QueryScorer(model, layers, prepare_queries(HostedModel(model, tokenizer, layers), factors, queries, "full"))
    gradients = query_gradients(model, tokenizer, layers, queries)
    projections = {(kind, dim): build_projections(factors, kind, dim)
                   for kind in args.kinds.split(",") for dim in (int(d) for d in args.dims.split(","))}
    rows = {key: p.prepare(gradients, factors).to(torch.float32) for key, p in projections.items()}  # (Q, query width)
    settings = ReadSettings(args.model, int(arguments.get("seq_len", 512)))
    sequences = (s for f in list_fragments(list(args.corpus)) for s in fragment_sequences(f, settings))
    sequences = islice(sequences, args.max_sequences)
    exact, approx = [], {(*key, dtype): [] for key in projections for dtype in ("float16", "float32")}
    while group := list(islice(sequences, args.batch_size)):
        captures = scorer.capture(collate_sequences(group, pad_id_of(tokenizer)))
        exact.append(scorer.score_captures(captures).total.T.numpy())  # (B, Q)
        for key, projection in projections.items():
            compressed = projection.compress(captures)  # (B, width) float32
            for dtype in ("float16", "float32"):
                stored = compressed.to(getattr(torch, dtype)).to(torch.float32)
                approx[(*key, dtype)].append(sum(block.scores(stored[:, slice(*block.stored)],
                                                              rows[key][:, slice(*block.query)])
                                                 for block in projection.layout()).numpy())
    sizes = {key: 2 * p.width for key, p in projections.items()}
    exact_scores = np.concatenate(exact)
    return exact_scores, {k: np.concatenate(v) for k, v in approx.items()}, sizes, exact_scores.shape[0]


def agreement(exact: np.ndarray, approx: np.ndarray, columns: list[int], pool: int = 100
              ) -> tuple[float, float, float]:
    """(mean Spearman, mean top-10 overlap, mean share of the exact top 10 within the approximate top `pool`)
    over the query columns."""
    from scipy.stats import spearmanr

    rhos, overlaps, recalls = [], [], []
    top = lambda s, k: set(np.argsort(-s, kind="stable")[:k].tolist())  # noqa: E731
    for q in columns:
        rhos.append(spearmanr(exact[:, q], approx[:, q]).statistic)
        overlaps.append(len(top(exact[:, q], TOP) & top(approx[:, q], TOP)) / TOP)
        recalls.append(len(top(exact[:, q], TOP) & top(approx[:, q], pool)) / TOP)
    return float(np.mean(rhos)), float(np.mean(overlaps)), float(np.mean(recalls))


def compare_results(reference: str, other: str) -> dict[str, tuple[float, float]]:
    """query id -> (Spearman over the sequences both scored, top-10 overlap) of `other`'s topk.parquet against
    `reference`'s, for every query of `reference` (NaN Spearman when `other` kept too few sequences to rank; a
    query whose sequences `other` shares none of has overlap 0)."""
    import pyarrow.parquet as pq
    from scipy.stats import spearmanr

    tables = [pq.read_table(f"{d}/topk.parquet", columns=["query_id", "rank", "doc_id", "chunk", "score"]).to_pandas()
              for d in (reference, other)]
    joined = tables[0].merge(tables[1], on=["query_id", "doc_id", "chunk"], suffixes=("_ref", "_other"))
    out = {}
    for query_id in tables[0]["query_id"].unique():
        rows = joined[joined.query_id == query_id]
        tops = [set(map(tuple, t[(t.query_id == query_id) & (t["rank"] <= TOP)][["doc_id", "chunk"]].to_numpy()))
                for t in tables]
        rho = spearmanr(rows["score_ref"], rows["score_other"]).statistic if len(rows) > 2 * TOP else float("nan")
        out[str(query_id)] = (float(rho), len(tops[0] & tops[1]) / TOP)
    return out


def main(argv: list[str] | None = None) -> None:
    import sys

    from whence.text import load_queries

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--compare":
        for other in argv[2:]:
            found = compare_results(argv[1], other)
            rho, overlap = np.mean([v[0] for v in found.values()]), np.mean([v[1] for v in found.values()])
            print(f"{other}: {len(found)} queries, mean Spearman {rho:.3f}, mean top-10 overlap {overlap:.2f}")
            print("  " + ", ".join(f"{q} {v[0]:.2f}/{v[1]:.1f}" for q, v in found.items()))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = load_queries(args.queries)
    new = load_queries(args.new_queries) if args.new_queries else []
    started = time.monotonic()
    exact, approx, sizes, n = exact_and_compressed(args, old + new)
    print(f"{n} sequences, {len(old)} + {len(new)} queries, {time.monotonic() - started:.0f}s")
    print(f"{'kind':>7} {'dim':>4} {'dtype':>8} {'bytes/seq':>10} {'rho':>6} {'top10':>6} {'in100':>6} "
          f"{'rho new':>8} {'top10 new':>9} {'in100 new':>9}")
    table = []
    for (kind, dim, dtype), scores in approx.items():
        first = agreement(exact, scores, list(range(len(old))))
        second = agreement(exact, scores, list(range(len(old), len(old) + len(new)))) if new else (0, 0, 0)
        size = sizes[(kind, dim)] * (2 if dtype == "float32" else 1)
        table.append({"kind": kind, "dim": dim, "dtype": dtype, "bytes_per_sequence": size,
                      **dict(zip(("spearman", "top10", "exact_top10_in_top100"), first)),
                      **dict(zip(("spearman_new", "top10_new", "exact_top10_in_top100_new"), second))})
        print(f"{kind:>7} {dim:>4} {dtype:>8} {size:>10,} {first[0]:6.3f} {first[1]:6.2f} {first[2]:6.2f} "
              f"{second[0]:8.3f} {second[1]:9.2f} {second[2]:9.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"sequences": n, "rows": table}, handle, indent=2)


if __name__ == "__main__":
    main()
