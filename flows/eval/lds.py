"""`whence eval lds`: the linear datamodeling score. Do summed scores predict what retraining on a subset does?

    full model   --model DIR (a `whence pretrain` directory: its recipe) or trained here into OUT/model
                 (flows/eval/lds_recipe.py); its training windows are the N sequences
    subsets      M masks of round(F x N) windows (whence.evaluation.lds.sample_subsets, seeded by the recipe's
                 seed); S models per subset, all from the full model's initialisation, trained as parallel Ray
                 tasks and measured on every query (flows/eval/lds_training.py) -> OUT/subsets/m{m}-s{s}.json
    scores       every method over every (query, window) pair on the full model, in process: EK-FAC factors
                 fitted on the N windows (OUT/factors, usable by `whence eval trace`), diagonal ones for
                 `diagonal`, BM25 for `tfidf`, seeded noise for `random` (flows.eval.trace.method_score_matrices)
    LDS          per method the mean over queries of Spearman(sum of the subset's scores, measured f), its
                 standard error, the noise figures                     -> OUT/lds.json, OUT/lds.html, OUT/lds.png

Resumable: OUT/run.json holds the arguments that define the retraining (not --methods: a rerun with other
methods reuses every subset model); the kept subset measurements are read back and only the others trained.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from flows.eval.common import parse_damping, write_result
from flows.options import positive_int
from whence.settings import help_for, setting

log = logging.getLogger("whence.eval.lds")

LDS_FILE = "lds.json"
ARRAYS_FILE = "lds_arrays.npz"
FACTORS_SUBDIR = "factors"
DEFAULT_METHODS = "ekfac,ekfac-cg,kfac,diagonal,identity,lissa,tfidf,random"
PAIRED_BASELINE = "ekfac"  # lds.json's "versus_ekfac": every other method's per-query difference from it


@dataclass(frozen=True)
class LDSSettings:
    """How `whence eval lds` retrains and scores (the recipe itself is flows.pretrain.PretrainConfig)."""

    subsets: int = setting("M, the number of random training subsets", 50)
    fraction: float = setting("F, the fraction of the training windows in each subset, strictly inside (0, 1)", 0.5)
    seeds: int = setting("S, models trained per subset, each with its own order of windows", 1)
    methods: tuple[str, ...] = setting(f"methods to score with, from {DEFAULT_METHODS}",
                                       tuple(DEFAULT_METHODS.split(",")))
    modules: str = setting("tracked layers: mlp, all, or a regex over module names", "mlp")
    fisher: str = setting("'true' samples labels from the model (default); 'empirical' uses the data's", "true")
    query_rank: int | str = setting("rank of each preconditioned query gradient ('full': exact)", "full")
    damping: float | str = setting("'heuristic' (0.1 x mean eigenvalue per layer) or an absolute value", "heuristic")
    dtype: str = setting("the full model's precision when fitting and scoring", "float32")
    score_batch_size: int = setting("sequences per forward/backward pass when fitting and scoring", 8)
    task_cpus: int = setting("CPUs each subset-training Ray task asks for (its torch threads)", 1)

    def __post_init__(self):
        from whence.evaluation.errors import EvaluationError
        from whence.evaluation.lds import check_fraction

        check_fraction(self.fraction)
        for name in ("subsets", "seeds", "score_batch_size", "task_cpus"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.subsets < 2:
            raise EvaluationError(f"--subsets must be at least 2 for a rank correlation, got {self.subsets}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flows.pretrain.settings import add_recipe_options

    parser.add_argument("--corpus", required=True, nargs="+", metavar="PATH",
                        help=".jsonl, .jsonl.gz, .parquet files or directories of them")
    parser.add_argument("--queries", required=True, metavar="QUERIES.jsonl", help='JSON lines {"id", "prompt", '
                        '"completion"}')
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (resumed if unfinished)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="the full model: a `whence pretrain` directory trained on this corpus, whose "
                             "training_report.json holds the recipe (default: train it into OUT/model with the "
                             "recipe options below)")
    parser.add_argument("--id-field", default="id", help="corpus field holding the document id")
    parser.add_argument("--text-field", default="text", help="corpus field holding the document text")
    for name, type_, choices in (("subsets", positive_int, None), ("fraction", float, None),
                                 ("seeds", positive_int, None), ("modules", str, None),
                                 ("fisher", str, ("true", "empirical")), ("query_rank", str, None),
                                 ("damping", parse_damping, None), ("dtype", str, ("float32", "float64")),
                                 ("score_batch_size", positive_int, None), ("task_cpus", positive_int, None)):
        default = LDSSettings.__dataclass_fields__[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=type_, default=default, choices=choices,
                            help=f"{help_for(LDSSettings, name)} (default: {default})")
    parser.add_argument("--methods", default=DEFAULT_METHODS, metavar="LIST", help=help_for(LDSSettings, "methods"))
    parser.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers for the full model")
    parser.add_argument("--address", default=None, metavar="RAY_ADDRESS", help="Ray cluster to run on")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a run with other arguments")
    recipe = parser.add_argument_group("recipe (without --model): `whence pretrain`'s options")
    add_recipe_options(recipe)


def settings_from_args(args: argparse.Namespace) -> LDSSettings:
    from whence.errors import WhenceError
    from whence.evaluation.methods import parse_methods
    from whence.queries import parse_rank

    try:
        methods = tuple(parse_methods(args.methods))
        values = {f.name: getattr(args, f.name) for f in fields(LDSSettings) if f.name != "methods"}
        return LDSSettings(**{**values, "methods": methods, "query_rank": parse_rank(args.query_rank)})
    except ValueError as error:
        raise WhenceError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    from flows.cluster import ClusterSettings
    from flows.pretrain.settings import config_from_args
    from whence.corpus import CorpusSource

    settings = settings_from_args(args)  # bad settings fail before any work
    recipe = None if args.model else config_from_args(args)
    corpus = CorpusSource(args.corpus, id_field=args.id_field, text_field=args.text_field)
    body = lds_corpus(corpus, args.queries, args.out, settings, model=args.model, recipe=recipe,
                      cluster=ClusterSettings(workers=args.workers, address=args.address), overwrite=args.overwrite)
    print_table(body, args.out)
    return 0


def print_table(body: dict, out) -> None:
    noise = body["noise"]
    seeds = noise["across_seeds_std"]
    print(f"LDS over {body['subsets']} subsets x {body['seeds']} seeds (fraction {body['fraction']}), "
          f"{body['queries']} queries, {body['sequences']} sequences -> {out}/{LDS_FILE}")
    print(f"noise: across subsets {noise['across_subsets_std']:.4f} nats, across seeds "
          f"{'n/a' if seeds is None else f'{seeds:.4f}'} nats")
    paired = body.get("versus_" + PAIRED_BASELINE, {})
    print(f"{'method':<12} {'lds':>8} {'stderr':>8}   paired difference from {PAIRED_BASELINE} (stderr, queries "
          "better/worse)")
    for name, row in body["methods"].items():
        lds, err = row["lds"], row["stderr"]
        line = f"{name:<12} {_figure(lds):>8} {_figure(err):>8}"
        if name in paired:
            pair = paired[name]
            line += (f"   {_figure(pair['mean_difference'], '+.4f')} ({_figure(pair['stderr'])}, "
                     f"{pair['better']}/{pair['worse']})")
        print(line)


def _figure(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def run_arguments(corpus, queries_path: str, model: str | None, recipe, settings: LDSSettings, workers: int) -> dict:
    """What defines the retraining (OUT/run.json): a rerun with these arguments resumes it."""
    digest = hashlib.sha256(Path(queries_path).read_bytes()).hexdigest()
    return {**corpus.to_arguments(), "queries": str(queries_path), "queries_sha256": digest, "model": model,
            "recipe": None if recipe is None else recipe.to_dict(), "workers": workers,
            "subsets": settings.subsets, "fraction": settings.fraction, "seeds": settings.seeds,
            "task_cpus": settings.task_cpus}


def lds_corpus(corpus, queries_path: str, out: str, settings: LDSSettings = LDSSettings(), model: str | None = None,
               recipe=None, cluster=None, overwrite: bool = False) -> dict:
    """The LDS of every method, written to out/lds.json (with lds.html, lds.png); returns its body. Give
    `model` (a `whence pretrain` directory) or `recipe` (a PretrainConfig: the full model is trained here)."""
    from flows.cluster import ClusterSettings
    from flows.eval.lds_recipe import recipe_from_model, train_full_model
    from flows.eval.lds_summary import write_summary
    from flows.eval.lds_training import Retraining, retrain_subsets
    from flows.run_state import RunDirectory
    from whence.corpus import CorpusSource
    from whence.evaluation.lds import sample_subsets
    from whence.text import load_queries

    corpus, cluster = CorpusSource.of(corpus), cluster or ClusterSettings()
    queries = load_queries(queries_path)  # bad queries fail before any training
    if (model is None) == (recipe is None):
        raise ValueError("give either a model directory or a recipe to train the full model with")
    arguments = run_arguments(corpus, queries_path, model, recipe, settings, cluster.workers)
    full = recipe_from_model(model, corpus) if model else None  # a model of another kind fails here
    run_dir = RunDirectory(out, "eval lds", arguments)
    run_dir.open(overwrite)
    full = full or train_full_model(corpus, recipe, Path(out), cluster, queries)
    scorer = FullModelScores(full, queries, settings)
    masks = sample_subsets(len(full.train), settings.subsets, settings.fraction, full.config.seed)  # (M, N)
    work = Retraining(full, scorer.query_batch, tuple(q.id for q in queries), settings.task_cpus)
    measured = retrain_subsets(work, masks, settings.seeds, Path(out), cluster)  # (M, S, Q)
    scores = scorer.all_methods(Path(out) / FACTORS_SUBDIR)
    body = lds_body(scores, masks, measured, scorer.measured_full, [q.id for q in queries], settings)
    body["full_model"] = {"dir": str(full.model_dir), "recipe": full.config.to_dict(),
                          "measured": scorer.measured_full.tolist()}
    body["arguments"] = {**arguments, "methods": list(settings.methods), **asdict(settings)}
    save_arrays(Path(out) / ARRAYS_FILE, scores, masks, measured, scorer.measured_full)
    write_result(out, LDS_FILE, body)
    write_summary(Path(out), body)
    run_dir.finish({"methods": {name: row["lds"] for name, row in body["methods"].items()}})
    return body


class FullModelScores:
    """The full model loaded for fitting and scoring, its measurement of the queries, and each method's scores."""

    def __init__(self, full, queries, settings: LDSSettings):
        from whence.evaluation.measure import measure_queries, query_batch
        from whence.model import find_tracked_layers, load_causal_lm

        self.full, self.queries, self.settings = full, queries, settings
        self.model, self.tokenizer = load_causal_lm(str(full.model_dir), dtype=settings.dtype)
        self.layers = find_tracked_layers(self.model, settings.modules)
        self.query_batch = query_batch(self.tokenizer, queries, self.model)
        self.measured_full = measure_queries(self.model, self.query_batch)  # (Q,)

    def all_methods(self, factors_dir: Path) -> dict:
        """name -> (Q, N) scores over the training windows, in the order of full.train."""
        from flows.eval.trace import ScoredSequences, TraceSettings, method_score_matrices
        from whence.api import fit
        from whence.config import FitConfig
        from whence.evaluation.methods import ScoringSetup
        from whence.text import iter_sequences

        settings, seq_len = self.settings, self.full.config.seq_len
        sequences = list(iter_sequences(self.tokenizer, self.full.train_docs, seq_len))
        if len(sequences) != len(self.full.train):
            raise RuntimeError(f"{len(sequences)} scored sequences for {len(self.full.train)} training windows")
        texts = self.tokenizer.batch_decode([list(s.input_ids) for s in sequences], skip_special_tokens=True)
        scoring = ScoringSetup(self.model, self.tokenizer, self.layers, self.full.train_docs, seq_len,
                               settings.score_batch_size, settings.query_rank, settings.damping)
        setup = ScoredSequences(scoring, [(s.doc_id, s.chunk) for s in sequences], texts)
        trace_settings = TraceSettings(tfidf_candidates=0, seed=self.full.config.seed)
        scores = {}
        for strategy in ("ekfac", "diagonal"):
            names = [n for n in settings.methods if (n == "diagonal") == (strategy == "diagonal")]
            if not names:
                continue
            config = FitConfig(modules=settings.modules, strategy=strategy, fisher=settings.fisher, seq_len=seq_len,
                               batch_size=settings.score_batch_size, seed=self.full.config.seed)
            log.info("fitting %s factors on the full model's %d windows", strategy, len(sequences))
            factors = fit(self.model, self.tokenizer, self.layers, self.full.train_docs, config)
            if strategy == "ekfac":
                factors.save(factors_dir, {"command": "fit", "arguments": config.to_dict()})
            scores.update(method_score_matrices(setup, factors, self.queries, names, sequences, trace_settings))
        return {name: scores[name] for name in settings.methods}


def lds_body(scores: dict, masks, measured, measured_full, query_ids: list[str], settings: LDSSettings) -> dict:
    """lds.json's figures: each method's LDS, the noise figures, and one query's predicted and measured changes."""
    from whence.evaluation.lds import linear_datamodeling_score, noise_figures, paired_difference

    results = {name: linear_datamodeling_score(matrix, masks, measured) for name, matrix in scores.items()}
    # Each method against EK-FAC on the same queries (PAIRED_BASELINE), when both were scored.
    paired = {name: paired_difference(result, results[PAIRED_BASELINE]) for name, result in results.items()
              if PAIRED_BASELINE in results and name != PAIRED_BASELINE}
    return {"methods": {name: result.to_dict() for name, result in results.items()},
            "versus_" + PAIRED_BASELINE: paired,
            "subsets": int(masks.shape[0]), "seeds": int(measured.shape[1]), "fraction": settings.fraction,
            "noise": noise_figures(measured), "queries": len(query_ids), "query_ids": query_ids,
            "sequences": int(masks.shape[1]),
            "example": example_scatter(scores, results, masks, measured, measured_full, query_ids)}


def example_scatter(scores: dict, results: dict, masks, measured, measured_full, query_ids) -> dict | None:
    """For the first influence method, the query of median LDS (a typical one, not the best): per subset the
    predicted change of f in nats, -(sum of the scores of the windows left out) / N (whence.evaluation.interpret:
    a window's score / N is the change from one more copy of it, to first order), against the measured change
    f_m - f_full (mean over seeds)."""
    import numpy as np

    from whence.evaluation.interpret import predicted_change
    from whence.evaluation.lds import subset_predictions

    method = next((n for n in scores if n not in ("tfidf", "random")), None)
    if method is None:
        return None
    per_query = np.asarray([np.nan if v is None else v for v in results[method].per_query], dtype=np.float64)
    if not np.isfinite(per_query).any():
        return None
    defined = np.flatnonzero(np.isfinite(per_query))
    q = int(defined[np.argsort(per_query[defined])[len(defined) // 2]])
    matrix = np.nan_to_num(np.asarray(scores[method], dtype=np.float64)[q : q + 1])  # (1, N)
    left_out = subset_predictions(matrix, ~np.asarray(masks, dtype=bool))[:, 0]  # (M,)
    return {"method": method, "query_id": query_ids[q], "lds": float(per_query[q]),
            "predicted_change": predicted_change(-left_out, masks.shape[1]).tolist(),
            "measured_change": (np.asarray(measured).mean(axis=1)[:, q] - measured_full[q]).tolist()}


def save_arrays(path: Path, scores: dict, masks, measured, measured_full) -> None:
    """masks (M, N), measured (M, S, Q), measured_full (Q,) and scores_{method} (Q, N), for a closer look."""
    import numpy as np

    np.savez_compressed(path, masks=masks, measured=measured, measured_full=measured_full,
                        **{f"scores_{name}": matrix for name, matrix in scores.items()})
