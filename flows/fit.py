"""`whence fit`: fit EK-FAC factors of a causal LM on a corpus with Ray.

    scan         read every fragment once: bad rows, duplicate ids, sequences per fragment
    covariance   Ray Data streams sequences to W FitterActors (streaming_split); partial sums add up
    eigh         the tracked layers dealt out over the fitting actors, on their devices, in parallel
    correction   the same stream again, in the eigenbases
    write        factors.safetensors + manifest.json, once
Each pass's merged sums are saved as soon as it ends (whence.factors.save_sums: covariance.safetensors,
corrections.safetensors), so an interrupted run resumes at the next pass.

    run          the command line: options -> FitConfig, CorpusSource, ClusterSettings -> fit_corpus
    fit_corpus   the run directory, then plan_corpus (scan), FitterPool, fit_passes, the factors written
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
from whence.factors import CORRECTION_SUMS_FILE, COVARIANCE_SUMS_FILE, STRATEGIES

log = logging.getLogger("whence.fit")

PASS_ATTEMPTS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_corpus(parser)
    parser.add_argument("--modules", default="mlp", help=help_for(FitConfig, "modules"))
    parser.add_argument("--strategy", default="ekfac", choices=STRATEGIES, help=help_for(FitConfig, "strategy"))
    parser.add_argument("--fisher", default="true", choices=["true", "empirical"], help=help_for(FitConfig, "fisher"))
    parser.add_argument("--seq-len", type=positive_int, default=512, help=help_for(FitConfig, "seq_len"))
    parser.add_argument("--max-sequences", type=positive_int, default=None, help=help_for(FitConfig, "max_sequences"))
    parser.add_argument("--seed", type=int, default=0, help=help_for(FitConfig, "seed"))
    parser.add_argument("--num-blocks", type=positive_int, default=1, help=help_for(FitConfig, "num_blocks"))


def run(args: argparse.Namespace) -> int:
    summary = fit_corpus(args.model, corpus_from_args(args), args.out, settings_from_args(FitConfig, args),
                         ClusterSettings.from_args(args), overwrite=args.overwrite)
    print(f"factors written to {args.out} ({summary['layers']} layers, {summary['sequences']:,} sequences, "
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


@surface_user_errors
def fit_corpus(model: str, corpus: CorpusSource | list[str], out: str, config: FitConfig,
               cluster: ClusterSettings = ClusterSettings(), overwrite: bool = False  # noqa: B008 (frozen)
               ) -> dict:
    """Fit factors with Ray and write them to `out`. Returns the run summary."""
    from actors.hosting import ModelSpec
    from flows.cluster import connect
    from flows.run_state import RunDirectory
    from whence.model import check_model_source

    check_model_source(model)  # before any Ray work: a clear error naming the path
    started = time.monotonic()
    corpus = CorpusSource.of(corpus)
    source = corpus.to_arguments()  # the run.json keys, in the order they have always been written
    arguments = {"model": model, "corpus": source.pop("corpus"), "dtype": cluster.dtype, **source,
                 **config.to_dict()}
    state = RunDirectory(out, "fit", arguments)
    if state.reuse_or_open(overwrite):
        return state.saved_summary()
    connect(cluster.address)
    corpus_plan = plan_corpus(corpus, ReadSettings.for_corpus(model, config.seq_len, corpus), config.max_sequences)

    pool = FitterPool(ModelSpec(model, config.modules, cluster.dtype), config, cluster)
    description = pool.describe()
    names = [layer["name"] for layer in description["layers"]]
    log.info("tracking %d layers on %d worker(s): %s ...", len(names), cluster.workers, ", ".join(names[:3]))
    for stage, held in enumerate(description.get("memory", [])):  # with --shards: what each stage holds
        log.info("stage %d holds %s", stage, held)
    covariance, bases, corrections, timings = fit_passes(pool, state, config, corpus_plan, names, started)

    from whence.factors import assemble_factors

    tally = corpus_plan.tally
    summary = {"layers": len(names), "sequences": corpus_plan.total, "documents": tally.documents,
               "bad_rows": tally.total_bad, "corpus": tally.as_dict(), "seconds": time.monotonic() - started,
               **timings}
    metadata = {"model_fingerprint": description["fingerprint"], "model": model, "arguments": arguments,
                "tokens": covariance.tokens if covariance else None, "sequences": corpus_plan.total,
                "summary": summary, "versions": versions()}
    factors = assemble_factors(config.strategy, description["layers"], covariance, bases, corrections, metadata)
    factors.save(out, {"command": "fit"})
    state.finish(summary)
    log.info("wrote %s in %.1fs", out, summary["seconds"])
    return summary


def plan_corpus(corpus: CorpusSource, settings: ReadSettings, max_sequences: int | None) -> PlannedCorpus:
    """Scan every fragment once (bad rows, duplicate ids, sequences per fragment) and plan the passes."""
    from flows.corpus_pipeline import reduce_scans, run_scan
    from whence.corpus import list_fragments
    from whence.errors import CorpusError

    fragments = list_fragments(corpus.paths)
    tally, skip, counts, _ = reduce_scans(run_scan(fragments, settings))
    plan = FragmentPlan(skip_lines=skip, quota=_quotas(counts, max_sequences))
    total = sum(plan.quota.values()) if plan.quota is not None else sum(counts.values())
    if total == 0:
        raise CorpusError(f"no training sequences in {', '.join(corpus.paths)} ({tally.total_bad} bad rows)")
    log.info("corpus: %d fragments, %d documents, %d bad rows, %d sequences to fit on",
             len(fragments), tally.documents, tally.total_bad, total)
    return PlannedCorpus(fragments, settings, plan, total, tally)


def fit_passes(pool: FitterPool, state, config: FitConfig, corpus: PlannedCorpus, names: list[str],
               started: float):
    """(covariance, bases, corrections, timings): the passes the strategy needs, each pass's merged sums saved
    in the run directory as soon as it ends and loaded instead of recomputed when a resumed run finds them."""
    import ray

    from whence.factors import load_sums, save_sums, sums_exist
    from whence.fitting import needs_correction, needs_covariance

    def saved_or_run(kind: str, name: str, bases=None):
        path = state.path / name
        if sums_exist(path):
            log.info("resuming: %s pass already done (%s)", kind, name)
            return load_sums(path), False
        sums = pool.run_pass(kind, corpus, None if bases is None else ray.put(bases))
        save_sums(path, sums)
        return sums, True

    timings = {}
    covariance, bases, corrections = None, dict.fromkeys(names), None
    if needs_covariance(config.strategy):
        covariance, _ = saved_or_run("covariance", COVARIANCE_SUMS_FILE)
        timings["covariance_s"] = time.monotonic() - started
        tick = time.monotonic()
        bases = pool.eigendecompose(covariance)
        timings["eigendecomposition_s"] = time.monotonic() - tick
    if needs_correction(config.strategy):
        tick = time.monotonic()
        pass_bases = bases if config.strategy == "ekfac" else dict.fromkeys(names)
        corrections, computed = saved_or_run("correction", CORRECTION_SUMS_FILE, pass_bases)
        if computed:
            timings["correction_s"] = time.monotonic() - tick
    return covariance, bases, corrections, timings


def _quotas(counts: dict[int, int], max_sequences: int | None) -> dict[int, int] | None:
    """The first max_sequences sequences in corpus order (fragment, then position): a deterministic subset."""
    if max_sequences is None:
        return None
    quotas, remaining = {}, max_sequences
    for fragment in sorted(counts):
        quotas[fragment] = min(counts[fragment], remaining)
        remaining -= quotas[fragment]
    return quotas


class FitterPool:
    """W FitterActors (or sharded pipelines), each fed one iterator of a streaming split of the sequences."""

    def __init__(self, spec, config: FitConfig, cluster: ClusterSettings):
        import ray

        from actors.fitter import FitterActor
        from flows.cluster import actor_resources, gpu_share, torch_threads

        workers, shards = cluster.workers, cluster.shards
        self.workers, self.shards = workers, shards
        resources = actor_resources(workers)
        # Restarted up to twice (a restart reloads the model); a pass is retried as a whole (run_pass).
        policy = dict(max_restarts=2, max_task_retries=0, max_concurrency=2)
        if cluster.actor_env:
            policy["runtime_env"] = {"env_vars": dict(cluster.actor_env)}
        if shards > 1:
            from actors.sharded_worker import ShardedWorker, ShardOptions

            remote = ray.remote(ShardedWorker).options(num_cpus=0, **policy)
            options = ShardOptions(stage_gpus=gpu_share(workers * shards))  # W pipelines x N stages share GPUs
            self.actors = [remote.remote(spec, shards, config.fisher, config.num_blocks, config.seed,
                                         config.batch_size, options) for _ in range(workers)]
        else:
            threads = torch_threads(resources.get("num_cpus", 1))
            remote = ray.remote(FitterActor).options(**resources, **policy)
            self.actors = [remote.remote(spec, config.fisher, config.num_blocks, config.seed, config.batch_size,
                                         threads) for _ in range(workers)]

    def describe(self) -> dict:
        import ray

        return ray.get(self.actors[0].describe.remote())

    def eigendecompose(self, covariance):
        """Every layer's eigenbases in float64, the layers dealt out over the actors so that they run in
        parallel, each on the device its actor holds (a GPU when the cluster has them: the actors already hold
        every GPU the run was given, so a separate task would wait for one)."""
        import ray

        names = list(covariance.activation)
        shares = [names[i :: len(self.actors)] for i in range(len(self.actors))]
        for attempt in range(1, PASS_ATTEMPTS + 1):
            refs = [actor.eigendecompose.remote(covariance.subset(share))
                    for actor, share in zip(self.actors, shares) if share]
            try:
                return {name: basis for part in ray.get(refs) for name, basis in part.items()}
            except ray.exceptions.RayActorError as error:  # an actor died: Ray restarts it; ask again
                if attempt == PASS_ATTEMPTS:
                    raise
                log.warning("an actor died during the eigendecomposition (%s); retrying", error)

    def run_pass(self, kind: str, corpus: PlannedCorpus, bases_ref=None):
        """One pass over the sequences; retried from the start if an actor dies (its restart reloads the model)."""
        import ray

        from flows.corpus_pipeline import sequences_dataset
        from flows.progress import Progress

        for attempt in range(1, PASS_ATTEMPTS + 1):
            progress = Progress(f"{kind} pass", corpus.total)
            splits = sequences_dataset(corpus.fragments, corpus.settings, corpus.plan).streaming_split(self.workers)
            if kind == "covariance":
                refs = [actor.covariance_pass.remote(split) for actor, split in zip(self.actors, splits)]
            else:
                refs = [actor.correction_pass.remote(split, bases_ref) for actor, split in zip(self.actors, splits)]
            try:
                start = sum(ray.get([actor.progress.remote() for actor in self.actors]))
                while ray.wait(refs, num_returns=len(refs), timeout=5.0)[1]:
                    done = sum(ray.get([actor.progress.remote() for actor in self.actors])) - start
                    progress.advance(done - progress.done)
                parts = ray.get(refs)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                if attempt == PASS_ATTEMPTS or not isinstance(error, ray.exceptions.RayActorError):
                    raise
                log.warning("a fitting actor died during the %s pass (%s); restarting the pass", kind, error)
                continue
            merged = parts[0]
            for part in parts[1:]:
                merged = merged + part
            progress.advance(merged.sequences - progress.done)
            progress.finish()
            return merged
        raise RuntimeError("unreachable")

