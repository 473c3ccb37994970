"""`whence eval exact`: how close is each method to exact influence, on a model small enough to know it?

    bound       the tracked layers' parameter count D against --max-parameters (ModelTooLargeError above it),
                checked before the corpus is read
    factors     fitted in process on the first --max-sequences sequences (whence.api.fit): EK-FAC (which also
                defines K-FAC and identity) and, when asked for, diagonal
    exact       the dense damped Fisher over all tracked parameters from the same sequences, Fisher and
                label seeds (whence.evaluation.exact); damping per layer as the factors' heuristic
    compare     every method with full-rank queries over every corpus sequence: per query Pearson and
                Spearman against exact influence, their means over queries            -> DIR/exact.json
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass

from flows.eval.common import add_corpus_options, parse_damping, read_documents, write_result
from flows.options import corpus_from_args, positive_int

log = logging.getLogger("whence.eval.exact")

EXACT_FILE = "exact.json"
EXACT_METHODS = ("ekfac", "kfac", "diagonal", "identity", "lissa")
DEFAULT_PARAMETER_BOUND = 20_000  # keep in step with whence.evaluation.exact (not imported: --help stays fast)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR_OR_ID", help="a small Hugging Face causal LM")
    add_corpus_options(parser)
    parser.add_argument("--modules", default="mlp", help="tracked layers: mlp, all, or a regex over module names")
    parser.add_argument("--fisher", default="true", choices=["true", "empirical"],
                        help="'true' samples labels from the model (default); 'empirical' uses the data's")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per training sequence")
    parser.add_argument("--max-sequences", type=positive_int, default=None,
                        help="fit the factors and the exact Fisher on the first N sequences (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the true Fisher's sampled labels")
    parser.add_argument("--methods", default=",".join(EXACT_METHODS), metavar="LIST",
                        help=f"comma-separated, from {', '.join(EXACT_METHODS)} (default: all) and ekfac-cg")
    parser.add_argument("--damping", type=parse_damping, default="heuristic", metavar="heuristic|FLOAT",
                        help="'heuristic' (0.1 x mean eigenvalue per layer) or an absolute value, for all methods")
    parser.add_argument("--max-parameters", type=positive_int, default=DEFAULT_PARAMETER_BOUND,
                        help=f"refuse models tracking more parameters than this (default {DEFAULT_PARAMETER_BOUND:,})")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                        help="model precision (default float64: the comparison should not measure rounding)")


@dataclass(frozen=True)
class ExactSettings:
    modules: str = "mlp"
    fisher: str = "true"
    seq_len: int = 512
    max_sequences: int | None = None
    seed: int = 0
    methods: tuple[str, ...] = EXACT_METHODS
    damping: float | str = "heuristic"
    max_parameters: int = DEFAULT_PARAMETER_BOUND
    dtype: str = "float64"
    batch_size: int = 8


def run(args: argparse.Namespace) -> int:
    from whence.errors import WhenceError
    from whence.evaluation.methods import parse_methods

    try:
        methods = tuple(parse_methods(args.methods, EXACT_METHODS + ("ekfac-cg",)))  # ekfac-cg: when asked for
    except ValueError as error:
        raise WhenceError(str(error)) from error
    settings = ExactSettings(args.modules, args.fisher, args.seq_len, args.max_sequences, args.seed, methods,
                             args.damping, args.max_parameters, args.dtype, args.batch_size)
    body = exact_corpus(args.model, corpus_from_args(args), args.queries, args.out, settings)
    print(f"exact influence over {body['parameters']:,} tracked parameters, {body['fitting_sequences']} fitting "
          f"and {body['sequences']} scored sequences, {body['queries']} queries -> {args.out}/{EXACT_FILE}")
    print(f"{'method':<10} {'pearson':>8} {'spearman':>9}")
    for name, row in body["methods"].items():
        print(f"{name:<10} {_figure(row['pearson']):>8} {_figure(row['spearman']):>9}")
    return 0


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def exact_corpus(model_dir: str, corpus, queries_path: str, out: str, settings: ExactSettings = ExactSettings()
                 ) -> dict:
    """Each method's agreement with exact influence, written to out/exact.json; returns its body."""
    from whence.evaluation.exact import check_parameter_bound
    from whence.model import find_tracked_layers, load_causal_lm
    from whence.text import iter_sequences, load_queries

    queries = load_queries(queries_path)
    model, tokenizer = load_causal_lm(model_dir, dtype=settings.dtype)
    layers = find_tracked_layers(model, settings.modules)
    parameters = check_parameter_bound(layers, settings.max_parameters, model_dir)
    documents = read_documents(corpus)
    sequences = list(iter_sequences(tokenizer, documents, settings.seq_len))
    if not sequences:
        from whence.errors import CorpusError

        raise CorpusError(f"no training sequences in {', '.join(corpus.paths)} (documents shorter than two tokens)")
    fitting = sequences[: settings.max_sequences or len(sequences)]
    exact, dampings = exact_matrix(model, tokenizer, layers, queries, sequences, fitting, settings)
    results = compare_methods(model, tokenizer, layers, documents, queries, fitting, exact, settings)
    body = {"methods": results, "parameters": parameters, "bound": settings.max_parameters,
            "fitting_sequences": len(fitting), "sequences": len(sequences), "queries": len(queries),
            "query_ids": [q.id for q in queries], "fisher": settings.fisher, "damping": dampings,
            "arguments": {"model": model_dir, "queries": queries_path, **corpus.to_arguments(),
                          **asdict(settings)}}
    write_result(out, EXACT_FILE, body)
    return body


def exact_matrix(model, tokenizer, layers, queries, sequences, fitting, settings: ExactSettings):
    """((Q, N) exact influence over `sequences`, {layer: damping_l}) with the Fisher of `fitting`."""
    from whence.evaluation.exact import exact_scores, flat_gradients, flat_query_gradients, layer_dampings

    log.info("exact Fisher from %d sequences' gradients", len(fitting))
    fisher = flat_gradients(model, tokenizer, layers, fitting, settings.fisher, settings.seed, settings.batch_size)
    damping, per_layer = layer_dampings(fisher, layers, settings.damping)
    train = flat_gradients(model, tokenizer, layers, sequences, None, batch_size=settings.batch_size)
    query = flat_query_gradients(model, tokenizer, layers, queries)
    return exact_scores(query, train, fisher, damping), per_layer


def compare_methods(model, tokenizer, layers, documents, queries, fitting, exact, settings: ExactSettings) -> dict:
    """name -> agreement with exact influence, each method's factors fitted on the `fitting` sequences."""
    from whence.api import fit
    from whence.config import FitConfig
    from whence.evaluation.exact import agreement
    from whence.evaluation.methods import ScoringSetup, influence_scores

    setup = ScoringSetup(model, tokenizer, layers, documents, settings.seq_len, settings.batch_size, "full",
                         settings.damping)
    fitted = {}
    results = {}
    for name in settings.methods:
        strategy = "diagonal" if name == "diagonal" else "ekfac"  # ekfac factors define kfac, identity, lissa's damping
        if strategy not in fitted:
            config = FitConfig(modules=settings.modules, strategy=strategy, fisher=settings.fisher,
                               seq_len=settings.seq_len, max_sequences=len(fitting), batch_size=settings.batch_size,
                               seed=settings.seed)
            fitted[strategy] = fit(model, tokenizer, layers, documents, config)
        log.info("scoring with %s", name)
        results[name] = agreement(influence_scores(setup, fitted[strategy], queries, name, fitting), exact)
    return results
