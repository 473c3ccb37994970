"""`whence eval trace`: fact tracing. Does each method rank a query's known source document near the top?

    queries     QUERIES.jsonl, each with "source": a document id or a list of ids (QueryError without one)
    sequences   every document of the corpus cut with the factors' --seq-len (as `whence score` cuts them)
    scores      each influence method over every (query, sequence) pair, in process (whence.evaluation.methods);
                with --tfidf-candidates N only a query's N best BM25 sequences are ranked, as `whence score`
                filters; `tfidf` ranks all sequences by BM25 alone, `random` by seeded random scores
    metrics     recall@1, @10, @100 and MRR of the first sequence of any source document -> DIR/trace.json
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass

from flows.eval.common import add_corpus_options, parse_damping, read_documents, write_result
from flows.options import corpus_from_args, positive_int

log = logging.getLogger("whence.eval.trace")

TRACE_FILE = "trace.json"
METHOD_NAMES = "ekfac, kfac, diagonal, identity, lissa, tfidf, random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR_OR_ID", help="the causal LM the factors were fitted for")
    parser.add_argument("--factors", required=True, metavar="DIR", help="a `whence fit` output directory")
    add_corpus_options(parser)
    parser.add_argument("--methods", default=None, metavar="LIST",
                        help=f"comma-separated, from {METHOD_NAMES} (default: the factors' strategy, identity, "
                             "tfidf, random)")
    parser.add_argument("--tfidf-candidates", type=int, default=0, metavar="N",
                        help="rank only each query's N most BM25-similar sequences for the influence methods "
                             "(0, the default: rank every sequence)")
    parser.add_argument("--query-rank", default="32", metavar="R|full",
                        help="rank of each preconditioned query gradient, as in `whence score`")
    parser.add_argument("--damping", type=parse_damping, default="heuristic", metavar="heuristic|FLOAT",
                        help="'heuristic' (0.1 x mean corrected eigenvalue per layer) or an absolute value")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="default: as the factors were fitted")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "float64", "bfloat16"],
                        help="model precision (default: as the factors were fitted)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")


@dataclass(frozen=True)
class TraceSettings:
    methods: tuple[str, ...] | None = None  # None: the factors' strategy, identity, tfidf, random
    tfidf_candidates: int = 0
    query_rank: int | str = 32
    damping: float | str = "heuristic"
    seq_len: int | None = None  # None: the factors' seq_len
    dtype: str | None = None  # None: the factors' dtype
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.tfidf_candidates < 0:
            raise ValueError(f"tfidf_candidates must be >= 0, got {self.tfidf_candidates}")


def run(args: argparse.Namespace) -> int:
    from whence.errors import WhenceError
    from whence.evaluation.methods import parse_methods
    from whence.queries import parse_rank

    try:
        methods = tuple(parse_methods(args.methods)) if args.methods else None
        settings = TraceSettings(methods, args.tfidf_candidates, parse_rank(args.query_rank), args.damping,
                                 args.seq_len, args.dtype, args.batch_size, args.seed)
    except ValueError as error:
        raise WhenceError(str(error)) from error
    body = trace_corpus(args.model, args.factors, corpus_from_args(args), args.queries, args.out, settings)
    print_trace_table(body, args.out)
    return 0


def print_trace_table(body: dict, out) -> None:
    print(f"fact tracing of {body['queries']} queries over {body['sequences']} sequences -> {out}/{TRACE_FILE}")
    print(f"{'method':<12} {'recall@1':>9} {'recall@10':>10} {'recall@100':>11} {'mrr':>7}")
    for name, row in body["methods"].items():
        print(f"{name:<12} {row['recall@1']:>9.3f} {row['recall@10']:>10.3f} {row['recall@100']:>11.3f} "
              f"{row['mrr']:>7.3f}")


def trace_corpus(model: str, factors_dir: str, corpus, queries_path: str, out: str,
                 settings: TraceSettings = TraceSettings()) -> dict:
    """Fact-tracing metrics of every method, written to out/trace.json; returns its body."""
    from whence.evaluation.trace import load_sourced_queries, source_ranks, trace_metrics
    from whence.factors import Factors

    queries, sources = load_sourced_queries(queries_path)  # bad queries fail before any model work
    factors = Factors.load(factors_dir)
    setup, fitting = scoring_setup(model, factors, corpus, settings)
    methods = list(settings.methods or dict.fromkeys([factors.strategy, "identity", "tfidf", "random"]))
    scores = method_score_matrices(setup, factors, queries, methods, fitting, settings)
    doc_ids = [doc_id for doc_id, _ in setup.sequence_keys]
    chunks = [chunk for _, chunk in setup.sequence_keys]
    present = set(doc_ids)
    missing = [q.id for q, source in zip(queries, sources) if not source & present]
    if missing:
        log.warning("%d queries name no source document of the corpus: %s", len(missing), ", ".join(missing[:10]))
    query_ids = [q.id for q in queries]
    results = {name: trace_metrics(source_ranks(matrix, doc_ids, chunks, sources)).to_dict(query_ids)
               for name, matrix in scores.items()}
    body = {"methods": results, "queries": len(queries), "sequences": len(doc_ids),
            "tfidf_candidates": settings.tfidf_candidates, "missing_sources": missing,
            "arguments": {"model": model, "factors": factors_dir, "queries": queries_path,
                          **corpus.to_arguments(), **asdict(settings), "methods": methods}}
    write_result(out, TRACE_FILE, body)
    return body


@dataclass
class ScoredSequences:
    """A ScoringSetup and the (doc_id, chunk) of its sequences, in order, with their decoded texts."""

    scoring: object
    sequence_keys: list[tuple[str, int]]
    sequence_texts: list[str]


def scoring_setup(model_dir: str, factors, corpus, settings: TraceSettings):
    """(ScoredSequences, fitting sequences) for the factors' model, tracked layers and sequence length."""
    from whence.evaluation.methods import ScoringSetup
    from whence.model import find_tracked_layers, load_causal_lm
    from whence.text import iter_sequences

    arguments = factors.metadata.get("arguments", {})
    model, tokenizer = load_causal_lm(model_dir, dtype=settings.dtype or arguments.get("dtype", "auto"))
    layers = find_tracked_layers(model, arguments.get("modules", "mlp"))
    seq_len = settings.seq_len or int(arguments.get("seq_len", 512))
    documents = read_documents(corpus)
    sequences = list(iter_sequences(tokenizer, documents, seq_len))
    texts = tokenizer.batch_decode([list(s.input_ids) for s in sequences], skip_special_tokens=True)
    scoring = ScoringSetup(model, tokenizer, layers, documents, seq_len, settings.batch_size, settings.query_rank,
                           settings.damping)
    fitting = sequences[: arguments.get("max_sequences") or len(sequences)]
    return ScoredSequences(scoring, [(s.doc_id, s.chunk) for s in sequences], texts), fitting


def method_score_matrices(setup: ScoredSequences, factors, queries, methods, fitting, settings: TraceSettings) -> dict:
    """name -> (Q, N) scores; influence methods NaN outside each query's TF-IDF candidates."""
    import numpy as np

    from whence.evaluation.methods import INDEX_METHODS, index_scores, influence_scores
    from whence.evaluation.trace import bm25_matrix, candidate_mask, query_text, random_scores

    bm25 = bm25_matrix([query_text(q) for q in queries], setup.sequence_texts)  # (Q, N)
    doc_ids, chunks = zip(*setup.sequence_keys)
    candidates = candidate_mask(bm25, doc_ids, chunks, settings.tfidf_candidates, [q.id for q in queries])
    matrices = {}
    for name in methods:
        if name == "tfidf":
            matrices[name] = bm25
        elif name == "random":
            matrices[name] = random_scores(len(queries), len(doc_ids), settings.seed)
        else:
            log.info("scoring %d queries x %d sequences with %s", len(queries), len(doc_ids), name)
            scores = (index_scores(setup.scoring, factors, queries, INDEX_METHODS[name]) if name in INDEX_METHODS
                      else influence_scores(setup.scoring, factors, queries, name, fitting))
            matrices[name] = np.where(candidates, scores, np.nan)
    return matrices
