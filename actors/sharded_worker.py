"""ShardedWorker: one model split over N stage actors (actors.stage.StageActor), driven as a pipeline.

It launches the stage actors and sends micro-batches through them several at a time, in the 1F1B order of
whence.shards.schedule (micro-batch i + 1 enters stage 0 while i is further down), with the methods of
whence.fitting.FactorFitter and whence.scoring.QueryScorer, over lists of batches too; plus the FitterActor
surface the `whence fit` flow uses (describe, covariance_pass, correction_pass, progress) and the LayerOwner one
(actors.owner: export, finish), which it hands to its stages: after a pass each stage keeps its layers' sums and
reduces, finishes and writes the layers it holds, so no sums pass through this process (those passes, and
ekfac-cg's Fisher-vector products, are in actors.stage_passes).
A plain class: `ray.remote` is applied where it is launched; it launches its stage actors itself.

Fault tolerance. A stage actor that dies is restarted by Ray (max_restarts) and reloads its stage; its kept
graphs and partial sums are lost. The worker notices (failed calls, or a new `incarnation` in the stage's state),
sends the restarted stage its bases / queries again, and re-runs from the first stage every micro-batch the stage
lost. Each stage records the micro-batch ids its sums include and the worker re-accumulates only where one is
missing, so nothing is counted twice and results are unchanged. The worker keeps the batches (in the object store)
since the last time it collected the stages' sums (every `checkpoint_every` micro-batches in *_steps; in the fit's
passes, whose sums stay on the stages, the whole pass). A stage lost after a pass has lost its sums: its owner
calls raise actors.owner.SumsLost, and `whence fit` runs the pass again. A stage lost during an ekfac-cg
Fisher-vector product costs that product's pass, which runs again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from actors.hosting import ModelSpec, gpu_share, pad_id_of, rows_to_batch, sequence_rows_mask
from actors.stage import CONSUMERS, SCORE, STAGE_CONCURRENCY, StageActor
from actors.stage_passes import MAX_RECOVERY_ROUNDS, StagePasses
from whence.factor_owners import CORRECTION, COVARIANCE
from whence.factors import CovarianceSums, LambdaSums, LayerBasis
from whence.queries import PreparedQueries
from whence.scoring import BatchScores
from whence.settings import setting
from whence.shards import (
    FORWARD,
    concat_scores,
    merge_corrections,
    merge_covariance,
    merge_scores,
    pipeline_micro_batch,
    pipeline_schedule,
    select_layers,
    split_batch,
)

log = logging.getLogger("whence.shards")

# How long a call waits for a stage actor that is restarting (it reloads the model).
STAGE_RESTART_TIMEOUT_S = 600.0


@dataclass
class ShardOptions:
    """How a ShardedWorker runs its stages (help text: whence.settings.help_for(ShardOptions, name))."""

    micro_batch_size: int | None = setting("cut each batch into micro-batches of at most this many sequences "
                                           "(None: batch_size / the number of stages, so that no stage keeps more "
                                           "than one batch's graphs: whence.shards.pipeline_micro_batch)", None)
    max_in_flight: int | None = setting("micro-batches inside the pipeline at once (None: the number of stages); "
                                        "each stage keeps at most this many graphs", None)
    stage_cpus: float = setting("CPUs each stage actor reserves; 0 lets stages share CPUs (they mostly wait on "
                                "each other)", 0.0)
    stage_gpus: float | None = setting("GPUs each stage actor reserves (None: 1 when the cluster has a GPU per "
                                       "stage, an equal share of them when it has fewer, 0 without GPUs; a "
                                       "fraction puts several stages on one GPU)", None)
    num_threads: int | None = setting("torch threads in each stage actor (None: torch's default, which follows "
                                      "the OMP_NUM_THREADS that Ray sets from the actor's CPUs, at least 1)", None)
    max_restarts: int = setting("times Ray restarts a dead stage actor", 3)
    max_task_retries: int = setting("times Ray retries a call lost with a stage's process; 0 (default) lets the "
                                    "worker re-run the lost micro-batches itself, from the first stage", 0)
    checkpoint_every: int = setting("covariance_steps / correction_steps: collect the stages' partial sums every "
                                    "this many micro-batches, so a restarted stage re-runs at most that many (the "
                                    "fit's passes keep the sums on the stages, and a restarted stage re-runs the "
                                    "pass's micro-batches)", 256)
    group_size: int | None = setting("batches of a Ray Data split submitted together in the *_pass methods "
                                     "(None: 4 x the number of stages)", None)

    def __post_init__(self):
        for name in ("micro_batch_size", "max_in_flight", "num_threads", "group_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.stage_cpus < 0 or (self.stage_gpus or 0) < 0 or self.max_restarts < 0 or self.checkpoint_every < 1:
            raise ValueError("stage_cpus, stage_gpus and max_restarts must be >= 0 and checkpoint_every >= 1")


class ShardedWorker(StagePasses):
    """N StageActors that together hold one model; FactorFitter's and QueryScorer's methods over them.

    spec: the model (a ModelSpec, or a path: MLP layers, dtype "auto"). num_stages: pipeline stages (at most the
    number of transformer blocks). fisher, num_blocks: as FactorFitter. seed, batch_size: how the *_pass methods
    cut a Ray Data split into batches (as actors.fitter.FitterActor).
    """

    def __init__(self, spec: ModelSpec | str, num_stages: int, fisher: str = "true", num_blocks: int = 1,
                 seed: int = 0, batch_size: int = 8, options: ShardOptions | None = None):
        import ray
        from transformers import AutoTokenizer

        self.spec, self.num_stages = ModelSpec.of(spec), num_stages
        self.seed, self.batch_size = seed, batch_size
        self.options = options or ShardOptions()
        self.micro_batch_size = self.options.micro_batch_size or pipeline_micro_batch(batch_size, num_stages)
        self.stages = self._launch_stages(fisher, num_blocks)
        self.stage_info = ray.get([stage.describe.remote() for stage in self.stages])
        self.incarnations = [info["incarnation"] for info in self.stage_info]
        self.layers = self.stage_info[0]["model_layers"]  # TrackedLayer.describe() of every layer, model order
        self.layer_names = [layer["name"] for layer in self.layers]
        self.positions = [info["positions"] for info in self.stage_info]  # each stage's layers' model positions
        self.stage_layer_names = [[layer["name"] for layer in info["layers"]] for info in self.stage_info]
        self.fingerprint = self.stage_info[0]["fingerprint"]
        self.pad_id = pad_id_of(AutoTokenizer.from_pretrained(self.spec.path))
        self._setup: list[dict[str, tuple]] = [{} for _ in self.stages]  # slot -> (method, args), replayed on restart
        self._log: dict[str, dict[int, object]] = {COVARIANCE: {}, CORRECTION: {}}  # id -> batch ref since collect
        self._collected: dict[str, CovarianceSums | LambdaSums | None] = {COVARIANCE: None, CORRECTION: None}
        self._states: list[dict] = []  # the stages' last answers to state()
        # Called as on_micro_batch(kind, id) when a micro-batch's calls have all returned (progress, tests).
        self.on_micro_batch: Callable[[str, int], None] | None = None
        self._next_id = 0  # micro-batch ids
        self._next_attempt = 0  # ids of runs of micro-batches (a lost one is run again under a new id)
        self.sequences_done = 0
        self.restarts_seen = 0
        self.held: dict = {}  # the last passes' sums, until their owners take them (LayerOwner)
        self.memory_reports = self.memory_report()
        for report in self.memory_reports:
            log.info("stage %d (blocks %d-%d, %s) holds %.1f MiB of weights, %.1f MiB of factors, %.1f MiB of queries",
                     report["stage"], report["blocks"][0], report["blocks"][1] - 1, report["device"],
                     report["weights"] / 2**20, report["factors"] / 2**20, report["queries"] / 2**20)

    def _launch_stages(self, fisher: str, num_blocks: int) -> list:
        """The stage actors (handles), one per stage, with the options' resources and restart policy."""
        import ray

        num_stages, cluster_gpus = self.num_stages, ray.cluster_resources().get("GPU", 0)
        stage_gpus = self.options.stage_gpus
        if stage_gpus is None:  # a GPU per stage, or an equal share when the cluster has fewer GPUs than stages
            stage_gpus = gpu_share(cluster_gpus, num_stages)
        if stage_gpus and stage_gpus * num_stages > cluster_gpus:
            log.warning("%d stages x %g GPU each exceed the cluster's %g GPUs: stages wait until the cluster grows",
                        num_stages, stage_gpus, cluster_gpus)
        remote = ray.remote(num_gpus=stage_gpus, num_cpus=self.options.stage_cpus,
                            max_restarts=self.options.max_restarts, max_task_retries=self.options.max_task_retries,
                            concurrency_groups=STAGE_CONCURRENCY)(StageActor)
        return [remote.remote(self.spec, k, num_stages, fisher, num_blocks, self.options.num_threads)
                for k in range(num_stages)]

    # -- FactorFitter's methods ------------------------------------------------------------------------------
    def covariance_step(self, batch: dict) -> None:
        self.covariance_steps([batch])

    def covariance_steps(self, batches: Iterable[dict]) -> None:
        """Accumulate covariance sums over `batches` (dicts from whence.text.collate plus `seeds`)."""
        self._accumulate(COVARIANCE, batches)

    def set_bases(self, bases: dict[str, LayerBasis | None]) -> None:
        """Bases for the correction pass (None for a layer: the identity basis). Each stage gets its layers'."""
        self._configure("set_bases", [({n: bases[n] for n in names},) for names in self.stage_layer_names], "bases")

    def eigendecompose(self, covariance: CovarianceSums) -> dict[str, LayerBasis]:
        """The eigenbases of the layers in `covariance`, each computed by the stage that holds the layer (on
        its device)."""
        import ray

        per_stage = [[n for n in names if n in covariance.activation] for names in self.stage_layer_names]
        refs = [self.stages[k].eigendecompose.remote(covariance.subset(names))
                for k, names in enumerate(per_stage) if names]
        return {name: basis for part in ray.get(refs) for name, basis in part.items()}

    def correction_step(self, batch: dict) -> None:
        self.correction_steps([batch])

    def correction_steps(self, batches: Iterable[dict]) -> None:
        self._accumulate(CORRECTION, batches)

    def take_covariance(self) -> CovarianceSums:
        """The sums so far over all stages (CPU, layers in model order), and reset."""
        return self._take(COVARIANCE)

    def take_corrections(self) -> LambdaSums:
        return self._take(CORRECTION)

    # -- QueryScorer's methods -------------------------------------------------------------------------------
    def set_queries(self, queries: PreparedQueries, path: str = "auto") -> None:
        """Prepared queries for every tracked layer; each stage receives only its layers'."""
        if queries.layer_names != self.layer_names:
            raise ValueError("prepared queries were made for other tracked layers")
        self._configure("set_queries", [(select_layers(queries, names), path) for names in self.stage_layer_names])

    def score(self, batch: dict, per_token: bool = False) -> BatchScores:
        return self.score_batches([batch], per_token)[0]

    def score_batches(self, batches: Iterable[dict], per_token: bool = False) -> list[BatchScores]:
        """Scores of every query against every sequence of each batch, as QueryScorer.score, per batch."""
        per_batch, jobs, sequences = self._micro_batches(batches)
        wanted = {(mb, k) for mb in jobs for k in range(self.num_stages)}
        results: dict[tuple[int, int], BatchScores] = {}
        for _ in range(MAX_RECOVERY_ROUNDS):
            missing = wanted - results.keys()
            if not missing:
                break
            consume_on: dict[int, set[int]] = {}
            for mb, k in missing:
                consume_on.setdefault(mb, set()).add(k)
            done, errors = self._run({mb: jobs[mb] for mb in sorted(consume_on)}, SCORE, consume_on, per_token)
            results.update(done)
            if errors:
                self._recover(errors)
        else:
            raise RuntimeError(f"scoring failed after {MAX_RECOVERY_ROUNDS} rounds of stage restarts")
        self.sequences_done += sequences
        merged = {mb: merge_scores([results[mb, k] for k in range(self.num_stages)], self.positions,
                                   len(self.layers)) for mb in jobs}
        return [concat_scores([merged[mb] for mb in ids]) for ids in per_batch]

    # -- the FitterActor surface used by `whence fit` (flows/fit.py) -------------------------------------------
    def describe(self) -> dict:
        return {"layers": self.layers, "fingerprint": self.fingerprint, "dtype": self.stage_info[0]["dtype"],
                "device": self.stage_info[0]["device"], "stages": [
                    {"stage": i["stage"], "blocks": i["blocks"], "device": i["device"], "parameters": i["parameters"],
                     "layers": [layer["name"] for layer in i["layers"]]} for i in self.stage_info],
                "memory": self.memory_reports}

    def ready(self) -> bool:
        return True

    def progress(self) -> int:
        """Sequences processed so far (answered while a pass runs when the worker has max_concurrency=2)."""
        return self.sequences_done

    # -- benchmark and housekeeping --------------------------------------------------------------------------
    def memory_report(self) -> list[dict]:
        import ray

        return ray.get([stage.memory_report.remote() for stage in self.stages])

    def reset_timing(self) -> None:
        import ray

        ray.get([stage.reset_timing.remote() for stage in self.stages])

    def stage_timings(self) -> list[dict]:
        """Per stage since reset_timing: wall_s, busy_s and idle_s (time spent waiting for work)."""
        import ray

        return ray.get([stage.timing.remote() for stage in self.stages])

    def shutdown(self) -> None:
        import ray

        for stage in self.stages:
            ray.kill(stage, no_restart=True)

    # -- internals -------------------------------------------------------------------------------------------
    def _configure(self, method: str, per_stage_args: list[tuple], slot: str | None = None) -> None:
        """Call a setup method on every stage and remember it, to replay on a stage that restarts. `slot` (default:
        the method) names what it sets: a later call for the same slot replaces it (set_bases and fetch_bases both
        set the bases)."""
        import ray

        refs = []
        for k, args in enumerate(per_stage_args):
            self._setup[k][slot or method] = (method, args)
            refs.append(getattr(self.stages[k], method).remote(*args))
        try:
            ray.get(refs)
        except ray.exceptions.RayActorError:
            self._refresh()  # a stage restarted: it is sent its whole setup, this call included

    def _micro_batches(self, batches: Iterable[dict]) -> tuple[list[list[int]], dict[int, object], int]:
        """Ids of each batch's micro-batches, id -> object ref of the micro-batch (put once, re-run cheaply),
        and the number of sequences."""
        import ray

        per_batch, jobs, sequences = [], {}, 0
        for batch in batches:
            sequences += int(batch["input_ids"].shape[0])
            ids = []
            for part in split_batch(batch, self.micro_batch_size):
                jobs[self._next_id] = ray.put(part)
                ids.append(self._next_id)
                self._next_id += 1
            per_batch.append(ids)
        return per_batch, jobs, sequences

    def _run(self, jobs: dict[int, object], kind: str, consume_on: dict[int, set[int]] | None = None,
             per_token: bool = False) -> tuple[dict, dict]:
        """Submit every micro-batch of `jobs` through all stages in the 1F1B schedule; wait for them.

        consume_on[id]: the stages that accumulate / score that micro-batch (default: all); the others only pass
        gradients on. Returns ({(id, stage): result}, {(id, stage): error}).

        Every run of a micro-batch has a fresh attempt id, under which the stages keep its graph: a call left over
        from an earlier, failed run can never meet a later run's state. Sums record the micro-batch's own id.
        """
        import ray

        last = self.num_stages - 1
        objective = "log_likelihood" if kind == SCORE else "fisher"
        attempts = {}  # attempt id -> micro-batch id
        for mb in jobs:
            attempts[self._next_attempt] = mb
            self._next_attempt += 1
        outputs, grads, pending = {}, {}, {}
        for op, k, attempt in pipeline_schedule(list(attempts), self.num_stages, self.options.max_in_flight):
            stage, mb = self.stages[k], attempts[attempt]
            if op == FORWARD:
                source = jobs[mb] if k == 0 else outputs.pop((k - 1, attempt))
                outputs[k, attempt] = stage.forward.remote(attempt, source, objective)
                continue
            if k == last:
                outputs.pop((k, attempt))  # the objective values: not needed here
            consume = consume_on is None or k in consume_on.get(mb, ())
            upstream = None if k == last else grads.pop((k + 1, attempt))
            grads[k, attempt] = stage.backward.remote(attempt, upstream, consume)
            if k == 0:
                grads.pop((k, attempt))
            if consume:
                extra = (per_token,) if kind == SCORE else (mb,)
                pending[mb, k] = getattr(stage, CONSUMERS[kind]).remote(attempt, *extra)
        results, errors = {}, {}
        for mb in sorted({mb for mb, _ in pending}):
            for k in range(self.num_stages):
                if (mb, k) not in pending:
                    continue
                try:
                    results[mb, k] = ray.get(pending.pop((mb, k)))
                except ray.exceptions.RayError as error:  # a stage died, or a call to its new process failed
                    errors[mb, k] = error
            if self.on_micro_batch is not None:
                self.on_micro_batch(kind, mb)
        return results, errors

    def _refresh(self) -> bool:
        """Ask every stage for its state; replay the setup of any that restarted. True if one did."""

        states = [self._call_when_up(k, "state") for k in range(self.num_stages)]
        restarted = False
        for k, state in enumerate(states):
            if state["incarnation"] != self.incarnations[k]:
                log.warning("stage %d restarted; re-sending its setup and re-running its lost micro-batches", k)
                self.incarnations[k] = state["incarnation"]
                self.restarts_seen += 1
                restarted = True
                for method, args in self._setup[k].values():
                    self._call_when_up(k, method, *args)
        self._states = states
        return restarted

    def _call_when_up(self, k: int, method: str, *args):
        """ray.get of one call to stage k, waiting (up to STAGE_RESTART_TIMEOUT_S) while it restarts."""
        import ray

        deadline = time.monotonic() + STAGE_RESTART_TIMEOUT_S
        while True:
            try:
                return ray.get(getattr(self.stages[k], method).remote(*args))
            except ray.exceptions.ActorDiedError:
                raise  # restarts used up: the stage is gone for good
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _recover(self, errors: dict) -> None:
        """After failed calls: if a stage restarted, drop stale graphs everywhere (the caller re-runs what is
        missing); otherwise the failure is not a lost process, so raise it."""
        import ray

        restarted = self._refresh()
        ray.get([stage.discard.remote() for stage in self.stages])
        if not restarted:
            raise next(iter(errors.values()))

    def _accumulate(self, kind: str, batches: Iterable[dict]) -> None:
        _, jobs, sequences = self._micro_batches(batches)
        self._log[kind].update(jobs)
        _, errors = self._run(jobs, kind)
        if errors:
            self._recover(errors)
        self._settle(kind, range(self.num_stages))
        self.sequences_done += sequences
        if len(self._log[kind]) >= self.options.checkpoint_every:
            self._collect(kind)

    def _settle(self, kind: str, stages: Iterable[int]) -> None:
        """Re-run, from the first stage, every logged micro-batch that one of `stages` has not accumulated (lost
        with a restarted process); only the stages missing it accumulate it again."""
        stages = list(stages)
        for _ in range(MAX_RECOVERY_ROUNDS):
            self._refresh()
            expected = set(self._log[kind])
            consume_on: dict[int, set[int]] = {}
            for k in stages:
                for mb in expected - self._states[k][kind]:
                    consume_on.setdefault(mb, set()).add(k)
            if not consume_on:
                return
            log.warning("re-running %d micro-batch(es) lost by restarted stage(s)", len(consume_on))
            _, errors = self._run({mb: self._log[kind][mb] for mb in sorted(consume_on)}, kind, consume_on)
            if errors:
                self._recover(errors)
        raise RuntimeError(f"{kind} pass: micro-batches still missing after {MAX_RECOVERY_ROUNDS} re-runs")

    def _collect(self, kind: str) -> None:
        """Move every stage's partial sums to this process, checking each includes exactly the logged
        micro-batches (a stage that restarted just before is re-run alone and asked again)."""
        import ray

        expected = set(self._log[kind])
        parts: dict[int, CovarianceSums | LambdaSums] = {}
        for _ in range(MAX_RECOVERY_ROUNDS):
            remaining = [k for k in range(self.num_stages) if k not in parts]
            if not remaining:
                break
            self._settle(kind, remaining)
            for k in remaining:
                try:
                    sums, ids = ray.get(self.stages[k].take.remote(kind))
                except ray.exceptions.RayActorError:
                    continue  # restarted while answering: settle again
                if ids == expected:
                    parts[k] = sums
        else:
            raise RuntimeError(f"could not collect the {kind} sums of every stage")
        merge = merge_covariance if kind == COVARIANCE else merge_corrections
        merged = merge([parts[k] for k in range(self.num_stages)], self.layer_names)
        previous = self._collected[kind]
        self._collected[kind] = merged if previous is None else previous + merged
        self._log[kind].clear()

    def _take(self, kind: str):
        self._collect(kind)
        result, self._collected[kind] = self._collected[kind], None
        return result

    def _split_groups(self, split) -> Iterator[list[dict]]:
        """Batches of a Ray Data split (sequence rows; marker rows skipped), in groups submitted together."""
        size = self.options.group_size or 4 * self.num_stages
        group = []
        if split is None:
            return
        for rows in split.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            keep = sequence_rows_mask(rows)
            if keep.any():
                group.append(rows_to_batch(rows, keep, self.pad_id, self.seed))
            if len(group) >= size:
                yield group
                group = []
        if group:
            yield group

