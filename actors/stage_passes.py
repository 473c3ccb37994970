"""The passes of a ShardedWorker (actors.sharded_worker) whose results stay on its stages: the fit's covariance
and correction passes, after which each stage owns its layers' sums (actors.owner.LayerOwner: the worker hands
`export` and `finish` to the stage holding the layer, which reduces the other workers' parts, eigendecomposes and
writes the layer's files), and ekfac-cg's Fisher-vector products (whence.refine), whose coefficients are summed
over the stages between the two halves of each product.

A mixin: ShardedWorker supplies the stages and their protocol (stages, stage_layer_names, _run, _configure,
_micro_batches, _settle, _recover, _split_groups, _log, _collected, sequences_done, set_bases, options).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from actors.owner import LayerOwner
from actors.stage import PRODUCT
from whence.factor_owners import CORRECTION, COVARIANCE
from whence.shards import merge_products, sum_coefficients

# Re-run rounds before giving up on micro-batches that keep failing while stages keep restarting.
MAX_RECOVERY_ROUNDS = 8


class _PassLost(RuntimeError):
    """Calls of a Fisher-vector product pass failed (a stage restarted, or an error to raise): {(id, stage): error}."""

    def __init__(self, errors: dict):
        super().__init__(f"{len(errors)} call(s) of the pass failed")
        self.errors = errors


class StagePasses(LayerOwner):
    """ShardedWorker's passes whose sums stay on the stages (see the module docstring)."""

    def covariance_pass(self, dataset, names: list[str] | None = None) -> dict:
        """Covariance sums over a Ray Dataset of sequence rows (None: no rows), each stage keeping its layers' for
        their owners (actors.owner.LayerOwner: `export` and `finish` go to the stage that holds the layer); returns
        the counts. The stages accumulate every tracked layer; `names` only says which the owners will ask for."""
        return self._pass_kept_by_stages(COVARIANCE, dataset)

    def correction_pass(self, dataset, names: list[str] | None = None, bases_refs: list = ()) -> dict:
        """Correction sums in the owners' bases (ObjectRefs of {name: basis}; a layer without one: identity), each
        stage keeping its layers'. Each stage fetches its layers' bases from the object store itself
        (StageActor.fetch_bases: the store's pages, no copy); they never pass through this process."""
        self._configure("fetch_bases", [(list(bases_refs),)] * self.num_stages, "bases")
        return self._pass_kept_by_stages(CORRECTION, dataset)

    def _pass_kept_by_stages(self, kind: str, dataset) -> dict:
        """One pass whose sums stay on the stages (never collected here). The micro-batches stay logged for the
        whole pass, so a stage that restarts re-runs all of them (checkpoint_every does not apply: a collection
        would move the sums here). At the end each stage holds its sums as an owner's (StageActor.hold)."""
        import ray

        self._log[kind].clear()
        self._collected[kind] = None
        ray.get([stage.reset.remote(kind) for stage in self.stages])
        for group in self._split_groups(dataset):
            _, jobs, sequences = self._micro_batches(group)
            self._log[kind].update(jobs)
            _, errors = self._run(jobs, kind)
            if errors:
                self._recover(errors)
            self.sequences_done += sequences
        for _ in range(MAX_RECOVERY_ROUNDS):
            self._settle(kind, range(self.num_stages))
            try:
                counts = ray.get([stage.hold.remote(kind, set(self._log[kind])) for stage in self.stages])
            except ray.exceptions.RayActorError:
                continue  # a stage restarted before it answered: settle it again
            if all(c is not None for c in counts):
                break
        else:
            raise RuntimeError(f"{kind} pass: the stages' sums never matched the micro-batches run")
        if len({(c["tokens"], c["sequences"]) for c in counts}) > 1:
            raise RuntimeError(f"stages counted different micro-batches: {counts}")
        self._log[kind].clear()
        return counts[0]

    # -- LayerOwner, through the stages: each stage owns the sums of its layers ---------------------------------
    def export(self, kind: str, name: str):
        """An ObjectRef of this pipeline's part of layer `name`, handed over by the stage that holds it (the owner
        fetches it from there: it does not pass through this process)."""
        return self.stages[self._stage_of(name)].export.remote(kind, name)

    def finish(self, kind: str, names: list[str], position: int, parts: list, job) -> dict[str, dict]:
        """Each stage reduces, finishes and writes its layers among `names` (actors.owner.LayerOwner.finish)."""
        import ray

        refs = [self.stages[k].finish.remote(kind, [n for n in names if n in own], position, parts, job)
                for k, own in enumerate(map(set, self.stage_layer_names)) if own & set(names)]
        return {name: record for part in ray.get(refs) for name, record in part.items()}

    def load_bases(self, directory, names: list[str], dtype: str | None = None) -> list:
        """ObjectRefs of the bases of `names` (LayerOwner.load_bases), each read by the stage that owns the layer and
        put in the object store by it: the bases never pass through this process (its answer holds refs only;
        actors.fitter.fetch_bases follows them)."""
        by_stage: dict[int, list[str]] = {}
        for name in names:
            by_stage.setdefault(self._stage_of(name), []).append(name)
        return [self.stages[k].load_bases.remote(directory, own, dtype) for k, own in sorted(by_stage.items())]

    def drop_held(self) -> None:
        import ray

        ray.get([stage.drop_held.remote() for stage in self.stages])
        super().drop_held()

    def stage_peaks(self) -> list[dict]:
        """Each stage's peak resident bytes and its phases' (the processes that hold the sums)."""
        import ray

        return ray.get([stage.peaks.remote() for stage in self.stages])

    def _stage_of(self, name: str) -> int:
        return next(k for k, names in enumerate(self.stage_layer_names) if name in names)

    # -- ekfac-cg's Fisher-vector products (whence.refine) -------------------------------------------------------
    def fisher_vector_product(self, batches: Callable[[], Iterable[dict]], directions: dict[str, torch.Tensor],
                              path: str = "auto") -> dict[str, torch.Tensor]:
        """G V over the stages, as whence.refine.FisherVectorProduct: batches() a fresh iterable of fitting
        batches (with seeds), directions layer -> (Q, d_out, d_in). Per group of micro-batches the stages give
        their layers' parts of c (B, Q) after the backward pass; their sum goes back to every stage, which adds its
        layers' products. A stage lost on the way costs the pass, which runs again from the start (the
        directions, replayed on the restarted stage, reset every stage's sums)."""
        import ray

        per_stage = [({n: directions[n].to("cpu") for n in names}, path) for names in self.stage_layer_names]
        for _ in range(MAX_RECOVERY_ROUNDS):
            self._configure("set_directions", per_stage)
            try:
                return self._product_pass(batches())
            except _PassLost as lost:
                self._recover(lost.errors)
            except ray.exceptions.RayActorError as error:
                self._recover({None: error})
        raise RuntimeError(f"Fisher-vector product failed after {MAX_RECOVERY_ROUNDS} rounds of stage restarts")

    def _product_pass(self, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
        """One pass of the product over `batches`, max_in_flight micro-batches at a time (each stage keeps their
        captures between the two halves); raises _PassLost when a call failed."""
        import ray

        _, jobs, _ = self._micro_batches(batches)
        group = self.options.max_in_flight or self.num_stages
        order = sorted(jobs)
        for start in range(0, len(order), group):
            results, errors = self._run({mb: jobs[mb] for mb in order[start : start + group]}, PRODUCT)
            if errors:
                raise _PassLost(errors)
            refs = []
            for mb in order[start : start + group]:
                c = sum_coefficients([results[mb, k] for k in range(self.num_stages)])
                refs += [stage.accumulate_products.remote(mb, c) for stage in self.stages]
            ray.get(refs)
        return merge_products(ray.get([stage.take_products.remote() for stage in self.stages]))
