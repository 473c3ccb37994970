"""`whence fit`: fit EK-FAC factors of a causal LM on a corpus with Ray.

    scan         read every fragment once: bad rows, duplicate ids, sequences per fragment
    plan         runs of sequences dealt to the W fitting actors, layers to their owners (whence.fit_plan); the memory
                 each process will need estimated and checked against the cluster's (flows.memory_check)
    covariance   each actor reads its run and keeps its partial sums (with --shards, each stage its layers'); each
                 layer's owner adds the parts (in worker order, through the object store), eigendecomposes in
                 float64 and writes the basis
    correction   the same data again, in the owners' bases (object store); owners write the corrected eigenvalues
    manifest     written by the driver, listing every layer's files and checksums (whence.factor_files)
The driver holds plans, counts and ObjectRefs only (flows.fit_pool). A layer whose files are written is finished:
an interrupted run resumes with the layers that are not, and a dead actor costs its pass, never results.

    run          the command line: options -> FitConfig, CorpusSource, ClusterSettings -> fit_corpus
    fit_corpus   the run directory, then plan_corpus (scan), FitterPool, fit_layers, the manifest
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

from flows.cluster import ClusterSettings, surface_user_errors
from flows.corpus_pipeline import FragmentPlan, ReadSettings
from flows.options import add_model_and_corpus, corpus_from_args, positive_int, settings_from_args
from flows.provenance import versions
from whence.config import FitConfig, help_for
from whence.corpus import CorpusSource, CorpusTally, Fragment
from whence.factors import STRATEGIES
from whence.redact import redact_uri

log = logging.getLogger("whence.fit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_corpus(parser)
    parser.add_argument("--modules", default="mlp", help=help_for(FitConfig, "modules"))
    parser.add_argument("--strategy", default="ekfac", choices=STRATEGIES, help=help_for(FitConfig, "strategy"))
    parser.add_argument("--fisher", default="true", choices=["true", "empirical"], help=help_for(FitConfig, "fisher"))
    parser.add_argument("--seq-len", type=positive_int, default=512, help=help_for(FitConfig, "seq_len"))
    parser.add_argument("--max-sequences", type=positive_int, default=None, help=help_for(FitConfig, "max_sequences"))
    parser.add_argument("--seed", type=int, default=0, help=help_for(FitConfig, "seed"))
    parser.add_argument("--num-blocks", type=positive_int, default=1, help=help_for(FitConfig, "num_blocks"))
    parser.add_argument("--factor-dtype", default="float64", choices=["float32", "float64"],
                        help=help_for(FitConfig, "factor_dtype"))
    parser.add_argument("--skip-non-finite", action="store_true", help=help_for(FitConfig, "skip_non_finite"))
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="keep one transformer block's activations at a time in each fitting actor, recomputing "
                             "each block's at its backward pass: the same factors for less memory and about a third "
                             "more compute (Llama, GPT-2 and GPT-NeoX families; not with --shards)")


def run(args: argparse.Namespace) -> int:
    summary = fit_corpus(args.model, corpus_from_args(args), args.out, settings_from_args(FitConfig, args),
                         ClusterSettings.from_args(args), overwrite=args.overwrite)
    print(f"factors written to {redact_uri(str(args.out))} ({summary['layers']} layers, {summary['sequences']:,} sequences, "
          f"{summary['bad_rows']} bad rows skipped, {summary['seconds']:.1f}s)")
    return 0


@dataclass
class PlannedCorpus:
    """The corpus as both passes read it: its fragments, how to turn them into sequences, which sequences to emit
    (duplicates skipped, the max_sequences quota) and how many that makes; `tally` counts the rows read."""

    fragments: list[Fragment]
    settings: ReadSettings
    plan: FragmentPlan
    total: int
    tally: CorpusTally
    counts: dict[int, int]  # fragment -> sequences it contributes
    scan_cached: bool = False  # the scan came from flows.scan_cache


@surface_user_errors
def fit_corpus(model: str, corpus: CorpusSource | list[str], out: str, config: FitConfig,
               cluster: ClusterSettings = ClusterSettings(), overwrite: bool = False  # noqa: B008 (frozen)
               ) -> dict:
    """Fit factors with Ray and write them to `out`. Returns the run summary."""
    from actors.hosting import ModelSpec
    from flows.cluster import connect
    from flows.run_state import RunDirectory
    from whence.model import check_finite_checkpoint, check_model_source
    from whence.text import check_window

    check_window(check_model_source(model)[0], config.seq_len, model)  # before any Ray work: errors name the path
    check_finite_checkpoint(model)
    if config.skip_non_finite and cluster.shards > 1:
        from whence.errors import SettingsError

        # Pipeline stages sum their own layers as a micro-batch passes: a NaN found by a later stage would leave
        # the earlier stages' sums with the sequence in them, so there is no skipping it after the fact.
        raise SettingsError("--skip-non-finite cannot be combined with --shards (the stages have summed a "
                            "sequence before a later stage finds it non-finite); fit without --shards, or "
                            "without --skip-non-finite to stop at the first such sequence", "skip_non_finite")
    if cluster.checkpointing and (cluster.shards > 1 or config.skip_non_finite):
        from whence.errors import SettingsError

        # Checkpointed actors sum a block's layers as soon as its backward has run (as pipeline stages do): the
        # same reason as above rules out --skip-non-finite; stages do not recompute their blocks.
        other = "--shards" if cluster.shards > 1 else "--skip-non-finite"
        raise SettingsError(f"--activation-checkpointing cannot be combined with {other}: the blocks' sums are "
                            "added as each block's backward runs; drop one of the two", "activation_checkpointing")
    started = time.monotonic()
    driver_at_start = _start_driver_peak()
    corpus = CorpusSource.of(corpus)
    source = corpus.to_arguments()  # the run.json keys, in the order they have always been written
    arguments = {"model": model, "corpus": source.pop("corpus"), "dtype": cluster.dtype, **source,
                 **config.to_dict()}
    state = RunDirectory(out, "fit", arguments)
    if state.reuse_or_open(overwrite):
        return state.saved_summary()
    connect(cluster.address)
    from flows.memory_check import check_fit_memory, fit_shape

    estimate = check_fit_memory(fit_shape(model, config.modules, config, cluster))  # before any work
    corpus_plan = plan_corpus(corpus, ReadSettings.for_corpus(model, config.seq_len, corpus), config.max_sequences)

    from flows.fit_pool import FitterPool

    pool = FitterPool(ModelSpec(model, config.modules, cluster.dtype), config, cluster)
    description = pool.describe()
    layers = description["layers"]
    log.info("tracking %d layers on %d worker(s): %s ...", len(layers), cluster.workers,
             ", ".join(layer["name"] for layer in layers[:3]))
    for stage, held in enumerate(description.get("memory", [])):  # with --shards: what each stage holds
        log.info("stage %d holds %s", stage, held)
    pool.sequences_total = corpus_plan.total
    records, counts, timings = fit_layers(pool, state, config, corpus_plan, layers)

    from whence.factor_files import write_factors_manifest

    memory = measured_memory(pool, estimate, driver_at_start)
    tally = corpus_plan.tally
    skipped = _non_finite_sequences(counts, corpus_plan.total)
    summary = {"memory": memory, "layers": len(layers), "sequences": corpus_plan.total, "documents": tally.documents,
               "bad_rows": tally.total_bad, "corpus": tally.as_dict(), "seconds": time.monotonic() - started,
               **timings, "scan_cached": corpus_plan.scan_cached, "non_finite_skipped": len(skipped),
               "non_finite_sequences": skipped[:100],
               "activation_checkpointing": description.get("checkpointing", False)}
    metadata = {"command": "fit", "model_fingerprint": description["fingerprint"], "model": model,
                "arguments": arguments, "tokens": counts.get("tokens"), "sequences": corpus_plan.total,
                "summary": summary, "versions": versions(), "factor_dtype": config.factor_dtype}
    write_factors_manifest(state.location, config.strategy, layers, records, metadata)
    state.finish(summary)
    log.info("wrote %s in %.1fs", state.location, summary["seconds"])
    return summary


def _non_finite_sequences(counts: dict, total: int) -> list[str]:
    """The sequences the fitting actors skipped for NaN or inf (--skip-non-finite), with a warning naming them."""
    skipped = counts.get("non_finite", [])
    if skipped:
        log.warning("skipped %d of %d sequences whose activations or output gradients hold NaN or inf: %s%s",
                    len(skipped), total, ", ".join(skipped[:8]), " ..." if len(skipped) > 8 else "")
    return skipped


def _start_driver_peak() -> int:
    """Start measuring the driver's peak afresh (a notebook or test process may have peaked higher before this
    fit): free pages handed back, the kernel's high-water mark reset. Returns the resident bytes now."""
    import psutil

    from actors.owner import release_free_memory, reset_peak_rss

    release_free_memory()
    reset_peak_rss()
    return psutil.Process().memory_info().rss


def measured_memory(pool, estimate, driver_at_start: int) -> dict:
    """Peak resident bytes of the driver during this fit (and what it held when the fit began) and of each fitting
    actor (and each actor's per phase: covariance, covariance finish, bases, correction, correction finish),
    beside the estimate."""
    import ray

    from actors.owner import peak_rss

    measured = {"driver": peak_rss(), "driver_at_start": driver_at_start,
                "actors": ray.get([a.peak_rss.remote() for a in pool.actors]),
                "phases": ray.get([a.phase_peaks.remote() for a in pool.actors])}
    if pool.shards > 1:  # the stage actors hold the sums and finish their layers: per pipeline, per stage
        measured["stages"] = ray.get([a.stage_peaks.remote() for a in pool.actors])
    return {"estimate": {"driver": estimate.driver, "actors": estimate.actors, "stages": estimate.stages,
                         "factors": estimate.factors}, "peak_rss": measured}


def plan_corpus(corpus: CorpusSource, settings: ReadSettings, max_sequences: int | None) -> PlannedCorpus:
    """Scan every fragment once (bad rows, duplicate ids, sequences per fragment) and plan the passes."""
    from flows.corpus_pipeline import reduce_scans
    from flows.scan_cache import cached_scan
    from whence.corpus import list_fragments
    from whence.errors import CorpusError

    fragments = list_fragments(corpus.paths)
    scans, scan_cached = cached_scan(fragments, settings)
    tally, skip, counts, _ = reduce_scans(scans)
    plan = FragmentPlan(skip_lines=skip, quota=_quotas(counts, max_sequences))
    total = sum(plan.quota.values()) if plan.quota is not None else sum(counts.values())
    if total == 0:
        raise CorpusError(f"no training sequences in {', '.join(corpus.paths)} ({tally.total_bad} bad rows)")
    plan = _with_stored_sequences(plan, scans, total * settings.seq_len)
    log.info("corpus: %d fragments, %d documents, %d bad rows, %d sequences to fit on",
             len(fragments), tally.documents, tally.total_bad, total)
    return PlannedCorpus(fragments, settings, plan, total, tally,
                         plan.quota if plan.quota is not None else counts, scan_cached)


def fit_layers(pool, state, config: FitConfig, corpus: PlannedCorpus, layers: list[dict]):
    """(records {layer: {kind: file record}}, counts, timings): the passes the strategy needs, over the layers
    whose files are not written yet, each finished by the layers' owners."""
    from whence.factor_files import BASIS, LAMBDA, finished, kinds_for
    from whence.factor_owners import CORRECTION, COVARIANCE, FinishJob
    from whence.fit_plan import plan_owners
    from whence.fitting import needs_correction, needs_covariance

    names = [layer["name"] for layer in layers]
    owners = plan_owners(layers, len(pool.actors), config.num_blocks)
    datasets = worker_datasets(corpus, len(pool.actors))
    kinds = kinds_for(config.strategy)
    records = {name: {k: r for k in kinds if (r := finished(state.location, name, k)) is not None} for name in names}
    counts = state.read_json(COUNTS_FILE) or {}
    job = FinishJob(state.location, config.strategy, config.factor_dtype, counts.get("tokens", 0),
                    counts.get("sequences", 0))
    timings, tick = {}, time.monotonic()
    if needs_covariance(config.strategy):
        todo = [n for n in names if BASIS not in records[n] or LAMBDA not in records[n] and config.strategy == "kfac"]
        if todo:
            written, counts = pool.step(COVARIANCE, datasets, todo, owners, job)
            state.write_json(COUNTS_FILE, counts)
            job = FinishJob(job.directory, job.strategy, job.factor_dtype, counts["tokens"], counts["sequences"])
            for name, layer_records in written.items():
                records[name].update(layer_records)
            timings["covariance_s"] = time.monotonic() - tick
        else:
            log.info("resuming: every layer's basis is already written")
    if needs_correction(config.strategy):
        todo = [n for n in names if LAMBDA not in records[n]]
        skipped = len(names) - len(todo)
        if skipped:
            log.info("resuming: %d of %d layers already finished", skipped, len(names))
        if todo:
            tick = time.monotonic()
            bases_from = state.location if config.strategy == "ekfac" else None
            written, corrected = pool.step(CORRECTION, datasets, todo, owners, job, bases_from)
            for name, layer_records in written.items():
                records[name].update(layer_records)
            timings["correction_s"] = time.monotonic() - tick
            counts = {**counts, "non_finite": list(dict.fromkeys(counts.get("non_finite", []) +
                                                                 corrected.get("non_finite", [])))}
    return records, counts, timings


def worker_datasets(corpus: PlannedCorpus, workers: int) -> list:
    """One Ray Dataset (or None) per fitting actor: its contiguous run of the corpus's sequences
    (whence.fit_plan.assign_sequences), in corpus order, so every run makes the same batches and the same sums."""
    import dataclasses

    from flows.corpus_pipeline import sequences_dataset
    from whence.fit_plan import assign_sequences

    by_index = {fragment.index: fragment for fragment in corpus.fragments}
    datasets = []
    for runs in assign_sequences(corpus.counts, workers):
        if not runs:
            datasets.append(None)
            continue
        plan = dataclasses.replace(corpus.plan, first={f: first for f, (first, _) in runs.items()},
                                   quota={f: count for f, (_, count) in runs.items()})
        dataset = sequences_dataset([by_index[f] for f in sorted(runs)], corpus.settings, plan)
        dataset.context.execution_options.preserve_order = True
        datasets.append(dataset)
    return datasets


COUNTS_FILE = "covariance_counts.json"  # the covariance pass's tokens and sequences, for a resumed run


def _with_stored_sequences(plan: FragmentPlan, scans: list[dict], tokens: int) -> FragmentPlan:
    """The plan with its sequences from the token ids a (cached) TF-IDF scan kept, put in the object store once
    for both passes (no corpus read, the same sequences in the same order), when there are not too many."""
    import dataclasses

    import ray

    from flows import corpus_pipeline

    if tokens > corpus_pipeline.MAX_STORED_TOKENS:
        return plan
    gathered = corpus_pipeline.sequences_from_scans(scans, plan.skip_lines, quota=plan.quota)
    if gathered is None:
        return plan
    return dataclasses.replace(plan, stored={fragment: ray.put(s) for fragment, s in gathered.items()})


def _quotas(counts: dict[int, int], max_sequences: int | None) -> dict[int, int] | None:
    """The first max_sequences sequences in corpus order (fragment, then position): a deterministic subset."""
    if max_sequences is None:
        return None
    quotas, remaining = {}, max_sequences
    for fragment in sorted(counts):
        quotas[fragment] = min(counts[fragment], remaining)
        remaining -= quotas[fragment]
    return quotas
