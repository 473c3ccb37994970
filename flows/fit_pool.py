"""FitterPool: the fitting actors of `whence fit` and the steps the driver asks of them.

The driver holds actor handles, ObjectRefs, plans and counts only; sums and factors never pass through it:

    run_pass   each actor reads its own run of sequences (whence.fit_plan.assign_sequences) and keeps its partial
               sums (a pipeline's stages keep theirs); it returns its counts
    finish     each owner fetches the other actors' parts of its layers (ObjectRefs from `export`), adds them in
               worker order, and writes the layers' files (actors.owner.LayerOwner.finish)
    bases      each owner's bases as object-store objects (one per layer, in the actors' compute dtype), passed on to
               every actor for the correction pass
    step       a pass and its finish, retried as a whole (after the actors are up again) when an actor dies:
               a dead actor's partial sums are gone, so the pass is rerun; finished layers stay finished
"""

from __future__ import annotations

import logging
import time

from flows.cluster import ClusterSettings
from whence.config import FitConfig
from whence.factor_owners import COVARIANCE, FinishJob
from whence.storage import Location

log = logging.getLogger("whence.fit")

PASS_ATTEMPTS = 3
ACTOR_RESTART_TIMEOUT_S = 600.0  # how long the pool waits for a restarted actor (it reloads the model)


class FitterPool:
    """W FitterActors (or W sharded pipelines with --shards), each reading a fixed set of fragments."""

    def __init__(self, spec, config: FitConfig, cluster: ClusterSettings):
        import ray

        from actors.fitter import FitterActor
        from flows.cluster import actor_resources, gpu_share, torch_threads

        workers, shards = cluster.workers, cluster.shards
        self.workers, self.shards = workers, shards
        # The rotations' precision (whence.factors.compute_dtype): float64 models rotate in float64, others in float32.
        self.basis_dtype = "float64" if cluster.dtype == "float64" else "float32"
        self.sequences_total: int | None = None  # for the progress lines
        resources = actor_resources(workers)
        # Restarted up to twice (a restart reloads the model); a step is retried as a whole (step).
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
                                         threads, config.skip_non_finite, cluster.checkpointing)
                           for _ in range(workers)]

    def describe(self) -> dict:
        import ray

        return ray.get(self.actors[0].describe.remote())

    def wait_ready(self) -> None:
        """Return once every actor answers (a restarted one has reloaded its model)."""
        import ray

        deadline = time.monotonic() + ACTOR_RESTART_TIMEOUT_S
        for actor in self.actors:
            while True:
                try:
                    ray.get(actor.ready.remote())
                    break
                except ray.exceptions.ActorDiedError:
                    raise  # restarts used up
                except ray.exceptions.RayActorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def step(self, kind: str, datasets: list, names: list[str], owners: list[list[str]], job: FinishJob,
             bases_from: str | Location | None = None) -> tuple[dict, dict]:
        """Run one pass over `names` and finish the owners' layers: (records {layer: {kind: record}}, counts).
        datasets: one Ray Dataset (or None) per actor; owners: the layers each actor owns (all layers);
        bases_from: the factors directory whose bases the correction pass uses (None: identity bases)."""
        import ray

        from actors.owner import SumsLost

        for attempt in range(1, PASS_ATTEMPTS + 1):
            self.wait_ready()
            try:
                bases = [] if bases_from is None else self.bases(bases_from, names, owners)
                counts = self.run_pass(kind, datasets, names, bases)
                totals = {key: sum(c[key] for c in counts) for key in ("tokens", "sequences")}
                totals["non_finite"] = [name for c in counts for name in c.get("non_finite", [])]  # worker order
                if totals["non_finite"] and not totals["sequences"]:
                    from whence.errors import NonFiniteError

                    raise NonFiniteError(f"every one of the {len(totals['non_finite'])} sequences holds NaN or inf "
                                         f"in the {kind} pass: is the model finite in its dtype?")
                if kind == COVARIANCE:
                    job = FinishJob(job.directory, job.strategy, job.factor_dtype, totals["tokens"], totals["sequences"])
                else:
                    job = FinishJob(job.directory, job.strategy, job.factor_dtype, job.tokens, totals["sequences"])
                return self.finish(kind, names, owners, job), totals
            except (ray.exceptions.RayActorError, SumsLost) as error:
                if attempt == PASS_ATTEMPTS:
                    raise
                log.warning("a fitting actor or stage died during the %s pass (%s); rerunning the pass", kind,
                            type(error).__name__)
        raise RuntimeError("unreachable")

    def run_pass(self, kind: str, datasets: list, names: list[str], bases: list) -> list[dict]:
        """One pass: every actor over its dataset; returns each actor's counts (its sums stay with it)."""
        import ray

        from flows.progress import Progress

        progress = Progress(f"{kind} pass", self.sequences_total)
        if kind == COVARIANCE:
            refs = [actor.covariance_pass.remote(data, names) for actor, data in zip(self.actors, datasets)]
        else:
            refs = [actor.correction_pass.remote(data, names, bases) for actor, data in zip(self.actors, datasets)]
        start = sum(ray.get([actor.progress.remote() for actor in self.actors]))
        while ray.wait(refs, num_returns=len(refs), timeout=5.0)[1]:
            done = sum(ray.get([actor.progress.remote() for actor in self.actors])) - start
            progress.advance(done - progress.done)
        counts = ray.get(refs)
        progress.advance(sum(c["sequences"] for c in counts) - progress.done)
        progress.finish()
        return counts

    def finish(self, kind: str, names: list[str], owners: list[list[str]], job: FinishJob) -> dict:
        """Each owner reduces and writes its layers among `names`; the parts move between actors as ObjectRefs."""
        import ray

        wanted = set(names)
        owned = [[n for n in layers if n in wanted] for layers in owners]
        refs = []
        for position, layers in enumerate(owned):
            if not layers:
                continue
            parts = [None if w == position else {n: actor.export.remote(kind, n) for n in layers}
                     for w, actor in enumerate(self.actors)]
            refs.append(self.actors[position].finish.remote(kind, layers, position, parts, job))
        records = {}
        for part in ray.get(refs):
            records.update(part)
        ray.get([actor.drop_held.remote() for actor in self.actors])
        return records

    def bases(self, directory: str | Location, names: list[str], owners: list[list[str]]) -> list:
        """ObjectRefs of the bases of `names`, one per layer, each read by its owner from its files: handed to
        every actor, never fetched by the driver (objects the driver owns: an owner's death loses none)."""
        wanted = set(names)
        return [self.actors[position].load_bases.remote(directory, [name], self.basis_dtype)
                for position, layers in enumerate(owners) for name in layers if name in wanted]
