"""`whence score`: score corpus sequences against queries with Ray; write the top-k influences per query.

    prepare      a Ray task loads the model and factors, checks they belong together, and writes the
                 preconditioned, rank-r query gradients to RESULTS_DIR/queries.safetensors (flows.score_prepare)
    scan         bad rows, duplicates, sequences per fragment, TF-IDF document frequencies
    candidates   per query, the N sequences most similar by BM25 (skipped with --tfidf-candidates 0)
    score        Ray Data streams the (filtered) sequences through SequenceScorer actors, which send each
                 batch's per-query top-k (and with --save-all-scores write every score to parts/ themselves);
                 the driver keeps a per-query top-k per corpus fragment and writes it to parts/ when the fragment
                 is complete (flows.score_pass)
    reduce       parts merged into topk.parquet (ties by doc id and chunk: independent of worker count)
    per-token    with --per-token, the top-k sequences are scored again token by token: tokens.parquet
                 (flows.score_tokens)
    baselines    with --baseline METHOD, the scorers also score METHOD's queries in the same pass (one forward
                 and backward pass per sequence for every method), reduced into RESULTS_DIR/baselines/METHOD/
Finished fragments survive an interruption; rerunning with the same arguments scores only the rest.

This module is the orchestration only. What the files hold, and their names, belong to whence.results (the
results directory) and whence.fragment_parts (parts/ and their reduce); the prepared-queries file to
whence.queries. A ScoringRun carries a run's fixed inputs through the passes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flows.cluster import ClusterSettings, surface_user_errors
from flows.options import add_model_and_corpus, positive_int
from whence.config import ScoreConfig, help_for
from whence.queries import BASELINE_METHODS, METHODS
from whence.redact import redact_uri
from whence.refine import DEFAULT_REFINE_SEQUENCES, DEFAULT_REFINE_STEPS, DEFAULT_REFINE_TOLERANCE
from whence.storage import Location

if TYPE_CHECKING:
    from actors.hosting import ModelSpec
    from flows.corpus_pipeline import FragmentPlan, ReadSettings
    from flows.query_groups import QueryGroup
    from flows.run_state import RunDirectory
    from whence.corpus import CorpusSource, Fragment
    from whence.fragment_parts import SequenceOrder
    from whence.text import Query
    from whence.topk import TopK

log = logging.getLogger("whence.score")

def _top_k(text: str) -> int | None:
    return None if text == "all" else positive_int(text)


def _rank(text: str):
    return "full" if text == "full" else positive_int(text)


def _damping(text: str):
    return "heuristic" if text == "heuristic" else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_corpus(parser)
    parser.add_argument("--factors", required=True, metavar="DIR", help="factors directory written by `whence fit`")
    parser.add_argument("--queries", required=True, metavar="QUERIES.jsonl",
                        help='JSON lines {"id": ..., "prompt": ..., "completion": ...}')
    parser.add_argument("--top-k", type=_top_k, default=10, metavar="K|all", help=help_for(ScoreConfig, "top_k"))
    parser.add_argument("--tfidf-candidates", type=int, default=10_000, metavar="N|0",
                        help=help_for(ScoreConfig, "tfidf_candidates"))
    parser.add_argument("--query-rank", type=_rank, default=32, metavar="R|full",
                        help=help_for(ScoreConfig, "query_rank"))
    parser.add_argument("--damping", type=_damping, default="heuristic", metavar="heuristic|FLOAT",
                        help=help_for(ScoreConfig, "damping"))
    parser.add_argument("--method", default="ekfac", choices=METHODS, help=help_for(ScoreConfig, "method"))
    parser.add_argument("--per-token", action="store_true", help=help_for(ScoreConfig, "per_token"))
    parser.add_argument("--save-all-scores", action="store_true", help=help_for(ScoreConfig, "save_all_scores"))
    parser.add_argument("--seq-len", type=positive_int, default=None, help=help_for(ScoreConfig, "seq_len"))
    parser.add_argument("--refine-steps", type=positive_int, default=DEFAULT_REFINE_STEPS, metavar="K",
                        help=help_for(ScoreConfig, "refine_steps"))
    parser.add_argument("--refine-sequences", type=positive_int, default=DEFAULT_REFINE_SEQUENCES, metavar="M",
                        help=help_for(ScoreConfig, "refine_sequences"))
    parser.add_argument("--refine-tolerance", type=float, default=DEFAULT_REFINE_TOLERANCE, metavar="TOL",
                        help=help_for(ScoreConfig, "refine_tolerance"))
    parser.add_argument("--query-batch", type=positive_int, default=None, metavar="N",
                        help=help_for(ScoreConfig, "query_batch"))
    parser.add_argument("--skip-non-finite", action="store_true", help=help_for(ScoreConfig, "skip_non_finite"))
    parser.add_argument("--baseline", dest="baselines", action="append", default=[], choices=BASELINE_METHODS,
                        metavar="METHOD", help=help_for(ScoreConfig, "baselines") + " (repeatable)")


def run(args: argparse.Namespace) -> int:
    from flows.options import corpus_from_args, settings_from_args

    summary = score_corpus(args.model, args.factors, args.queries, corpus_from_args(args), args.out,
                           settings_from_args(ScoreConfig, args), ClusterSettings.from_args(args),
                           overwrite=args.overwrite)
    print(f"scored {summary['sequences_scored']:,} sequences against {summary['queries']} queries "
          f"({summary['bad_rows']} bad rows skipped) in {summary['seconds']:.1f}s; results in {args.out}")
    return 0


@dataclass
class ScoringRun:
    """A scoring run's fixed inputs, read by every pass: its directory, how actors load the model, the corpus
    fragments and how to read them, the settings, the cluster, and the queries."""

    state: RunDirectory
    spec: ModelSpec
    fragments: list[Fragment]  # in corpus order
    settings: ReadSettings
    config: ScoreConfig
    cluster: ClusterSettings
    queries: list[Query]
    groups: list[QueryGroup] = field(default_factory=list)  # set once the queries are prepared (plan_groups)
    order: SequenceOrder | None = None  # set once the corpus is scanned: where each fragment's sequences come

    @property
    def query_ids(self) -> list[str]:
        return [query.id for query in self.queries]

    @property
    def queries_file(self) -> Path:
        from whence.results import QUERIES_FILE

        return self.state.path / QUERIES_FILE

    def baseline_dir(self, method: str) -> Path:
        """The results directory of baseline `method` (config.baselines), inside this run's."""
        from whence.results import BASELINES_DIR

        return self.state.path / BASELINES_DIR / method

    @property
    def queries_files(self) -> list[Path]:
        """The prepared-queries files the scoring pass scores side by side: the run's, then each baseline's."""
        from whence.results import QUERIES_FILE

        return [self.queries_file] + [self.baseline_dir(m) / QUERIES_FILE for m in self.config.baselines]


@surface_user_errors
def score_corpus(model: str, factors_dir: str, queries_path: str, corpus: CorpusSource | list[str], out: str,
                 config: ScoreConfig, cluster: ClusterSettings = ClusterSettings(),  # noqa: B008 (frozen)
                 overwrite: bool = False, candidates_from: str | None = None) -> dict:
    """Run the scoring pipeline; returns the summary also stored in RESULTS_DIR/manifest.json.

    corpus: a whence.corpus.CorpusSource, or one path or a list of paths (fields "id" and "text").
    candidates_from: another results directory of the same corpus and queries whose TF-IDF candidates to score
    (to compare methods on the same sequences without selecting them again)."""
    from actors.hosting import ModelSpec
    from flows.cluster import connect
    from flows.corpus_pipeline import ReadSettings
    from flows.run_state import RunDirectory
    from whence.corpus import CorpusSource, list_fragments
    from whence.fingerprints import input_fingerprints
    from whence.model import check_finite_checkpoint, check_model_source
    from whence.text import check_window, load_queries

    model_config, _ = check_model_source(model)  # before any Ray work: a clear error naming the path
    check_finite_checkpoint(model)
    started = time.monotonic()
    corpus = CorpusSource.of(corpus)
    queries = load_queries(queries_path)
    factors_manifest = _factors_manifest(factors_dir)
    fitted = factors_manifest.get("arguments", {})
    seq_len = config.seq_len or fitted.get("seq_len", 512)
    check_window(model_config, seq_len, model)
    fragments = list_fragments(list(corpus.paths))
    arguments = {"model": model, "factors": redact_uri(str(factors_dir)), "queries": str(queries_path), **corpus.to_arguments(),
                 "dtype": cluster.dtype, **config.to_dict(), "seq_len": seq_len, "candidates_from": candidates_from,
                 # What the paths hold: an edited input makes a resume refuse, naming the key (whence.fingerprints).
                 **input_fingerprints(queries, factors_dir, [fragment.path for fragment in fragments])}
    state = RunDirectory(out, "score", arguments)
    if state.reuse_or_open(overwrite):
        return state.saved_summary()
    connect(cluster.address)
    run = ScoringRun(state, ModelSpec(model, fitted.get("modules", "mlp"), cluster.dtype), fragments,
                     ReadSettings.for_corpus(model, seq_len, corpus), config, cluster, queries)
    summary, layer_names = _run_passes(run, factors_dir, candidates_from, started, factors_manifest)
    manifest = _manifest(run, factors_manifest, layer_names, summary)
    _write_baselines(run, manifest)
    state.write_json("manifest.json", manifest)
    state.finish(summary)
    return summary


def _factors_manifest(factors_dir: str | Location) -> dict:
    """The factors directory's manifest (any pyarrow filesystem); FactorsMismatchError when it has none."""
    from whence.factor_files import read_manifest

    return read_manifest(factors_dir)


@contextmanager
def _timed(timings: dict, name: str):
    tick = time.monotonic()
    yield
    timings[name] = time.monotonic() - tick


def _run_passes(run: ScoringRun, factors_dir: str, candidates_from: str | None, started: float,
                factors_manifest: dict) -> tuple[dict, list[str]]:
    """prepare, scan, candidates, score, reduce and per-token, each skipped when its output is already there;
    returns the run's summary and the tracked layers' names."""
    from flows.candidates import candidate_keys, stored_candidates
    from flows.corpus_pipeline import FragmentPlan, reduce_scans
    from flows.query_groups import plan_groups
    from flows.scan_cache import cached_scan
    from flows.score_checks import discard_damaged_queries
    from flows.score_prepare import prepare_remotely
    from flows.score_tokens import per_token_pass
    from whence.fragment_parts import SequenceOrder
    from whence.queries import QueriesHeader
    from whence.results import CANDIDATE_SEQUENCES_FILE, CANDIDATES_FILE
    from whence.tfidf import DEFAULT_FEATURES

    state, config, timings = run.state, run.config, {}
    candidates_file = state.path / CANDIDATES_FILE
    discard_damaged_queries(run)
    if candidates_from and not candidates_file.exists():
        shutil.copyfile(Path(candidates_from) / CANDIDATES_FILE, candidates_file)
        if (Path(candidates_from) / CANDIDATE_SEQUENCES_FILE).exists():  # their token ids too: no corpus read
            shutil.copyfile(Path(candidates_from) / CANDIDATE_SEQUENCES_FILE, state.path / CANDIDATE_SEQUENCES_FILE)
    if not all(path.exists() for path in run.queries_files):
        with _timed(timings, "prepare_queries_s"):
            prepare_remotely(run, factors_dir)
    tfidf = config.tfidf_candidates > 0
    # Document frequencies are needed only to select candidates, not when a candidate list is already there.
    need_frequencies = tfidf and not candidates_file.exists()
    with _timed(timings, "scan_s"):
        scans, timings["scan_cached"] = cached_scan(run.fragments, run.settings,
                                                    DEFAULT_FEATURES if need_frequencies else 0)
        tally, skip, counts, frequencies = reduce_scans(scans)
    log.info("corpus: %d fragments, %d documents, %d bad rows, %d sequences",
             len(run.fragments), tally.documents, tally.total_bad, sum(counts.values()))
    run.order = SequenceOrder({scan["fragment"]: scan["hashes"] for scan in scans})
    if sum(counts.values()) == 0:  # as `whence fit` does: an empty top-k would look like a finished run
        from whence.errors import CorpusError

        raise CorpusError(f"no sequences to score in {', '.join(run.state.arguments['corpus'])} "
                          f"({tally.total_bad} bad rows)")
    keys, stored = None, None
    if tfidf:
        with _timed(timings, "tfidf_s"):
            keys = candidate_keys(run, scans, skip, frequencies)
        with _timed(timings, "gather_s"):
            stored = stored_candidates(run, scans, skip, keys)
    layer_names = QueriesHeader.read(run.queries_file).layer_names
    run.groups = plan_groups(len(run.queries), config.query_batch, run.queries_file, len(run.queries_files),
                             run.cluster.workers)
    plan = FragmentPlan(skip_lines=skip, keys=keys, stored=stored)
    expected = len(keys) if keys is not None else sum(counts.values())
    scored, skipped, topk = _score_and_reduce(run, plan, len(layer_names), expected, timings, factors_manifest)
    if config.per_token:
        with _timed(timings, "per_token_s"):
            per_token_pass(run, plan, topk)
    summary = {"queries": len(run.queries), "sequences_scored": scored, "documents": tally.documents,
               "bad_rows": tally.total_bad, "corpus": tally.as_dict(), "fragments": len(run.fragments),
               "workers": run.cluster.workers, "shards": run.cluster.shards, "seconds": time.monotonic() - started,
               "timings": timings, "non_finite_skipped": len(skipped), "non_finite_sequences": skipped[:100],
               "query_groups": [list(group.range) for group in run.groups]}
    return summary, layer_names


def _score_and_reduce(run: ScoringRun, plan: FragmentPlan, num_layers: int, expected: int, timings: dict,
                      factors_manifest: dict) -> tuple[int, list[str], TopK]:
    """The scoring pass of each query group, then its parts reduced: topk.parquet (and scores.parquet). Returns
    the sequences scored, those skipped as non-finite, and the top-k of every query."""
    from flows.score_checks import fisher_sequences
    from flows.score_pass import score_fragments
    from whence.fragment_parts import SCORES_PART, TOPK_PART, concatenate_scores
    from whence.results import SCORES_FILE, TOPK_FILE, topk_table, write_table_atomically

    with _timed(timings, "score_s"):
        passes = [score_fragments(run, plan, num_layers, expected, group) for group in run.groups]
    scored = passes[0][0]  # every group scores the same sequences
    # After start-up: sequences that arrived after the first scored batch, and the seconds they took.
    timings["score_steady_sequences"] = sum(steady[0] for _, steady in passes)
    timings["score_steady_s"] = sum(steady[1] for _, steady in passes)
    skipped = _non_finite_sequences(run, scored)
    topk = _stitched_topk(run, TOPK_PART, num_layers)
    write_table_atomically(topk_table(topk, fisher_sequences=fisher_sequences(factors_manifest)),
                           run.state.path / TOPK_FILE)
    if run.config.save_all_scores:
        parts = [path for group in run.groups for path in group.finished_parts(run.state.path, SCORES_PART).values()]
        concatenate_scores(dict(enumerate(parts)), run.state.path / SCORES_FILE)
    return scored, skipped, topk


def _stitched_topk(run: ScoringRun, kind: str, num_layers: int) -> TopK:
    """The top-k of every query from the parts of `kind` of each query group, in query order."""
    from whence.fragment_parts import merge_parts
    from whence.topk import TopK

    entries = []
    for group in run.groups:
        ids = run.query_ids[group.start : group.stop]
        entries += merge_parts(group.finished_parts(run.state.path, kind), ids, run.config.top_k, num_layers).entries
    return TopK(run.query_ids, run.config.top_k, entries)


def _non_finite_sequences(run: ScoringRun, scored: int) -> list[str]:
    """The sequences ("doc_id#chunk") the scorers skipped for NaN or inf (--skip-non-finite), from the finished
    parts, with a warning; NonFiniteError when that was every sequence (the model, not the data, is broken)."""
    from whence.errors import NonFiniteError
    from whence.fragment_parts import TOPK_PART, part_non_finite

    named = (name for group in run.groups for path in group.finished_parts(run.state.path, TOPK_PART).values()
             for name in part_non_finite(path))
    skipped = list(dict.fromkeys(named))  # each group skips the same sequences (their activations are not finite)
    if skipped:
        log.warning("skipped %d of %d sequences whose activations, gradients or scores hold NaN or inf: %s%s",
                    len(skipped), scored, ", ".join(skipped[:8]), " ..." if len(skipped) > 8 else "")
    if skipped and len(skipped) == scored:
        raise NonFiniteError(f"every one of the {scored} sequences scored NaN or inf: is the model finite in "
                             f"dtype {run.cluster.dtype}?")
    return skipped


def _manifest(run: ScoringRun, factors_manifest: dict, layer_names: list[str], summary: dict) -> dict:
    from flows.provenance import versions
    from flows.score_checks import fisher_sequences
    from whence.refine import REFINE_FILE
    from whence.results import FISHER_SEQUENCES

    arguments = run.state.arguments
    return {
        "command": "score", "arguments": arguments, "layers": layer_names, "method": run.config.method,
        "queries": [{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in run.queries],
        "model": {"path": arguments["model"], "fingerprint": factors_manifest.get("model_fingerprint")},
        "factors": {"path": arguments["factors"], "strategy": factors_manifest.get("strategy")},
        FISHER_SEQUENCES: fisher_sequences(factors_manifest),
        "refine": run.state.read_json(REFINE_FILE),  # ekfac-cg: residual norms per step (whence.refine)
        "baselines": {method: str(run.baseline_dir(method)) for method in run.config.baselines},
        "summary": summary, "versions": versions(),
    }


def _write_baselines(run: ScoringRun, manifest: dict) -> None:
    """Each baseline's results directory: its top-k reduced from its parts, the run's candidates, and a manifest
    like the run's with the baseline's method (`baseline_of` names the run that scored it)."""
    from whence.fragment_parts import baseline_part
    from whence.results import (
        CANDIDATES_FILE,
        FISHER_SEQUENCES,
        MANIFEST_FILE,
        TOPK_FILE,
        topk_table,
        write_table_atomically,
    )

    for method in run.config.baselines:
        directory = run.baseline_dir(method)
        topk = _stitched_topk(run, baseline_part(method), len(manifest["layers"]))
        write_table_atomically(topk_table(topk, fisher_sequences=manifest[FISHER_SEQUENCES]), directory / TOPK_FILE)
        if (run.state.path / CANDIDATES_FILE).exists():
            shutil.copyfile(run.state.path / CANDIDATES_FILE, directory / CANDIDATES_FILE)
        body = {**manifest, "method": method, "baseline_of": str(run.state.path), "refine": None, "baselines": {}}
        (directory / MANIFEST_FILE).write_text(json.dumps(body, indent=2, default=str))
