"""`whence fit`: fit EK-FAC factors of a causal LM on a corpus with Ray.

    scan         read every fragment once: bad rows, duplicate ids, sequences per fragment
    covariance   Ray Data streams sequences to W FitterActors (streaming_split); partial sums add up
    eigh         the tracked layers dealt out over the fitting actors, on their devices, in parallel
    correction   the same stream again, in the eigenbases
    write        factors.safetensors + manifest.json, once
Each pass's merged sums are saved as soon as it ends, so an interrupted run resumes at the next pass.
"""

from __future__ import annotations

import argparse
import logging
import time

from flows.cluster import surface_user_errors
from flows.options import add_model_and_corpus, positive_int
from flows.provenance import versions
from whence.config import FitConfig, help_for
from whence.factors import STRATEGIES

log = logging.getLogger("whence.fit")

COVARIANCE_FILE = "covariance.safetensors"
CORRECTIONS_FILE = "corrections.safetensors"
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
    config = FitConfig(modules=args.modules, strategy=args.strategy, fisher=args.fisher, seq_len=args.seq_len,
                       max_sequences=args.max_sequences, batch_size=args.batch_size, seed=args.seed,
                       num_blocks=args.num_blocks)
    summary = fit_corpus(args.model, args.corpus, args.out, config, workers=args.workers, shards=args.shards,
                         dtype=args.dtype, address=args.address, strict=args.strict, overwrite=args.overwrite,
                         id_field=args.id_field, text_field=args.text_field)
    print(f"factors written to {args.out} ({summary['layers']} layers, {summary['sequences']:,} sequences, "
          f"{summary['bad_rows']} bad rows skipped, {summary['seconds']:.1f}s)")
    return 0


@surface_user_errors
def fit_corpus(model: str, corpus: list[str], out: str, config: FitConfig, workers: int = 1, shards: int = 1,
               dtype: str = "auto", address: str | None = None, strict: bool = False, overwrite: bool = False,
               id_field: str = "id", text_field: str = "text") -> dict:
    """Fit factors with Ray and write them to `out`. Returns the run summary."""
    import ray

    from actors.hosting import ModelSpec
    from flows.cluster import connect
    from flows.corpus_pipeline import FragmentPlan, ReadSettings, reduce_scans, run_scan
    from flows.run_state import RunDirectory
    from whence.corpus import list_fragments
    from whence.fitting import needs_correction, needs_covariance
    from whence.model import check_model_source

    check_model_source(model)  # before any Ray work: a clear error naming the path
    started = time.monotonic()
    arguments = {"model": model, "corpus": list(corpus), "dtype": dtype, "id_field": id_field,
                 "text_field": text_field, "strict": strict, **config.to_dict()}
    state = RunDirectory(out, "fit", arguments)
    if state.finished and not overwrite:
        log.info("%s already holds a finished run with these arguments; nothing to do", out)
        return state.saved_summary()
    if state.open(overwrite):
        log.info("resuming the unfinished run in %s", out)
    connect(address)
    fragments = list_fragments(corpus)
    settings = ReadSettings(model, config.seq_len, id_field, text_field, strict)
    tally, skip, counts, _ = reduce_scans(run_scan(fragments, settings))
    plan = FragmentPlan(skip_lines=skip, quota=_quotas(counts, config.max_sequences))
    total = sum(plan.quota.values()) if plan.quota is not None else sum(counts.values())
    if total == 0:
        from whence.errors import CorpusError

        raise CorpusError(f"no training sequences in {', '.join(corpus)} ({tally.total_bad} bad rows)")
    log.info("corpus: %d fragments, %d documents, %d bad rows, %d sequences to fit on",
             len(fragments), tally.documents, tally.total_bad, total)

    spec = ModelSpec(model, config.modules, dtype)
    pool = FitterPool(spec, config, workers, shards)
    description = pool.describe()
    names = [layer["name"] for layer in description["layers"]]
    log.info("tracking %d layers on %d worker(s): %s ...", len(names), workers, ", ".join(names[:3]))
    for stage, held in enumerate(description.get("memory", [])):  # with --shards: what each stage holds
        log.info("stage %d holds %s", stage, held)

    timings = {}
    covariance, bases = None, dict.fromkeys(names)
    if needs_covariance(config.strategy):
        covariance = _load_sums(state, COVARIANCE_FILE)
        if covariance is None:
            covariance = pool.run_pass("covariance", fragments, settings, plan, total)
            _save_sums(state, COVARIANCE_FILE, covariance)
        timings["covariance_s"] = time.monotonic() - started
        tick = time.monotonic()
        bases = pool.eigendecompose(covariance)
        timings["eigendecomposition_s"] = time.monotonic() - tick
    corrections = None
    if needs_correction(config.strategy):
        corrections = _load_sums(state, CORRECTIONS_FILE)
        if corrections is None:
            tick = time.monotonic()
            pass_bases = bases if config.strategy == "ekfac" else dict.fromkeys(names)
            corrections = pool.run_pass("correction", fragments, settings, plan, total, ray.put(pass_bases))
            _save_sums(state, CORRECTIONS_FILE, corrections)
            timings["correction_s"] = time.monotonic() - tick

    from whence.factors import assemble_factors

    summary = {"layers": len(names), "sequences": total, "documents": tally.documents,
               "bad_rows": tally.total_bad, "corpus": tally.as_dict(), "seconds": time.monotonic() - started,
               **timings}
    metadata = {"model_fingerprint": description["fingerprint"], "model": model, "arguments": arguments,
                "tokens": covariance.tokens if covariance else None, "sequences": total,
                "summary": summary, "versions": versions()}
    factors = assemble_factors(config.strategy, description["layers"], covariance, bases, corrections, metadata)
    factors.save(out, {"command": "fit"})
    state.finish(summary)
    log.info("wrote %s in %.1fs", out, summary["seconds"])
    return summary


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

    def __init__(self, spec, config: FitConfig, workers: int, shards: int):
        import ray

        from actors.fitter import FitterActor
        from flows.cluster import actor_resources, gpu_share, torch_threads

        self.workers, self.shards = workers, shards
        self.batch_size = config.batch_size
        resources = actor_resources(workers)
        if shards > 1:
            from actors.shard import ShardedWorker, ShardOptions

            remote = ray.remote(ShardedWorker).options(num_cpus=0, max_restarts=2, max_task_retries=0,
                                                      max_concurrency=2)
            options = ShardOptions(stage_gpus=gpu_share(workers * shards))  # W pipelines x N stages share GPUs
            self.actors = [remote.remote(spec, shards, config.fisher, config.num_blocks, config.seed,
                                         config.batch_size, options) for _ in range(workers)]
        else:
            threads = torch_threads(resources.get("num_cpus", 1))
            remote = ray.remote(FitterActor).options(**resources, max_restarts=2, max_task_retries=0,
                                                    max_concurrency=2)
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

    def run_pass(self, kind: str, fragments, settings, plan, total: int, bases_ref=None):
        """One pass over the sequences; retried from the start if an actor dies (its restart reloads the model)."""
        import ray

        from flows.corpus_pipeline import sequences_dataset
        from flows.progress import Progress

        for attempt in range(1, PASS_ATTEMPTS + 1):
            progress = Progress(f"{kind} pass", total)
            splits = sequences_dataset(fragments, settings, plan).streaming_split(self.workers)
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


def _save_sums(state, name: str, sums) -> None:
    import torch
    from safetensors.torch import save_file

    from whence.factors import CovarianceSums

    if isinstance(sums, CovarianceSums):
        tensors = {f"{n}/A/{i}": t for n, blocks in sums.activation.items() for i, t in enumerate(blocks)}
        tensors |= {f"{n}/S/{i}": t for n, blocks in sums.gradient.items() for i, t in enumerate(blocks)}
        meta = {"kind": "covariance", "tokens": str(sums.tokens), "sequences": str(sums.sequences)}
    else:
        tensors = {f"{n}/L": t for n, t in sums.sums.items()}
        meta = {"kind": "correction", "sequences": str(sums.sequences)}
    partial = state.path / (name + ".partial")
    save_file({k: v.contiguous().to(torch.float64) for k, v in tensors.items()}, str(partial), metadata=meta)
    partial.replace(state.path / name)


def _load_sums(state, name: str):
    from safetensors import safe_open

    from whence.factors import CovarianceSums, LambdaSums

    path = state.path / name
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    log.info("resuming: %s pass already done (%s)", meta["kind"], path.name)
    if meta["kind"] == "correction":
        return LambdaSums({k.rsplit("/", 1)[0]: v for k, v in tensors.items()}, int(meta["sequences"]))
    activation, gradient = {}, {}
    for key in sorted(tensors, key=lambda k: (k.rsplit("/", 2)[0], int(k.rsplit("/", 1)[1]))):
        layer, kind, _ = key.rsplit("/", 2)
        (activation if kind == "A" else gradient).setdefault(layer, []).append(tensors[key])
    return CovarianceSums(activation, gradient, int(meta["tokens"]), int(meta["sequences"]))
