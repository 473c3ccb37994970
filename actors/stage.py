"""StageActor: one pipeline stage (whence.shards.Stage) in its own process, on its own device.

It holds its stage's blocks only (read alone from the checkpoint: whence.shards.loading), its tracked layers'
partial sums and its queries, and answers the stage protocol's forward / backward / accumulate / score calls
keyed by micro-batch id. A plain class: actors.sharded_worker.ShardedWorker applies `ray.remote` and drives N of
them. Every process start gets a new `incarnation`, by which the worker notices a restart and re-sends bases and
queries.
"""

from __future__ import annotations

import functools
import gc
import time
import uuid

import ray
import torch

from actors.hosting import ModelSpec, map_large_blocks, maybe_fail, quiet_model_loading
from actors.owner import LayerOwner, release_free_memory
from whence.factor_owners import CORRECTION, COVARIANCE
from whence.factors import CovarianceSums, LambdaSums, LayerBasis
from whence.fitting import eigendecompose
from whence.model import default_device, parse_dtype
from whence.queries import PreparedQueries
from whence.scoring import BatchScores
from whence.shards.loading import load_stage

# The passes a stage runs, and what it does with a micro-batch after its backward pass in each.
SCORE, PRODUCT = "score", "product"  # the passes besides whence.factor_owners' COVARIANCE and CORRECTION
# StageActor's concurrency group for `export` (one thread beside the default one, where every other call runs in
# order): see StageActor.export. Launchers pass STAGE_CONCURRENCY to ray.remote.
EXPORTS = "exports"
STAGE_CONCURRENCY = {EXPORTS: 1}
CONSUMERS = {COVARIANCE: "accumulate_covariance", CORRECTION: "accumulate_corrections", SCORE: "score",
             PRODUCT: "product_coefficients"}  # PRODUCT: the first half of ekfac-cg's Fisher-vector product


def _timed(method):
    """Add the call's duration to the actor's busy time (idle = wall time - busy time)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy_s += time.perf_counter() - start

    return wrapper


class StageActor(LayerOwner):
    """Holds stage `stage_index` of `num_stages` of the model at `spec.path`, on this process's device.

    Only this stage's weights are read from the checkpoint, on the CPU, before the stage moves to the device
    (whence.shards.loading.load_stage; its fingerprint of the whole model is hashed from the checkpoint a chunk at
    a time). A checkpoint that cannot be read part by part is loaded whole and every module outside this stage
    freed first, so the device only ever holds this stage either way.
    """

    def __init__(self, spec: ModelSpec | str, stage_index: int, num_stages: int, fisher: str = "true",
                 num_blocks: int = 1, num_threads: int | None = None):
        spec = ModelSpec.of(spec)
        map_large_blocks()  # before the stage's weights and passes: see actors.hosting.MMAP_THRESHOLD_BYTES
        if num_threads:
            torch.set_num_threads(num_threads)
        self.incarnation = uuid.uuid4().hex  # new after every restart: the worker re-sends bases and queries
        device = default_device()
        quiet_model_loading()
        loaded = load_stage(spec.path, stage_index, num_stages, spec.modules, parse_dtype(spec.dtype, device),
                            fisher=fisher, num_blocks=num_blocks)
        self.stage, self.fingerprint, self.model_layers = loaded.stage, loaded.fingerprint, loaded.model_layers
        del loaded
        gc.collect()  # the rest of the model (meta tensors, or the whole model's weights when it was loaded)
        self.stage.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.backwards_done = 0
        self.held: dict = {}  # its layers' sums of the last fitting pass, until their owner finishes them
        self.reset_timing()

    # -- description and accounting --------------------------------------------------------------------------
    def describe(self) -> dict:
        return {**self.stage.describe(), "incarnation": self.incarnation, "fingerprint": self.fingerprint,
                "model_layers": self.model_layers, "dtype": str(self.stage.dtype)}

    def state(self) -> dict:
        stats = self.stage.statistics
        return {"incarnation": self.incarnation, COVARIANCE: set(stats.covariance_ids),
                CORRECTION: set(stats.correction_ids)}

    def memory_report(self) -> dict:
        """Bytes of weights, factors and queries this stage holds."""
        return self.stage.memory_report()

    def reset_timing(self) -> None:
        self._busy_s = 0.0
        self._clock = time.perf_counter()

    def timing(self) -> dict:
        """Seconds since reset_timing: wall, busy (in forward/backward/accumulate/score) and idle (waiting)."""
        wall = time.perf_counter() - self._clock
        return {"stage": self.stage.index, "wall_s": wall, "busy_s": self._busy_s, "idle_s": wall - self._busy_s}

    # -- the pipeline protocol (whence.shards.Stage) -----------------------------------------------------------
    @_timed
    def forward(self, micro_batch_id: int, inputs: dict, objective: str = "fisher") -> dict:
        return self.stage.forward(micro_batch_id, inputs, objective)

    @_timed
    def backward(self, micro_batch_id: int, grad_outputs: dict | None, capture: bool = True) -> dict:
        result = self.stage.backward(micro_batch_id, grad_outputs, capture)
        self.backwards_done += 1
        maybe_fail(self.backwards_done)  # fault injection for tests (WHENCE_FAULT_AFTER_BATCHES)
        return result

    @_timed
    def accumulate_covariance(self, micro_batch_id: int, batch_key: int | None = None) -> None:
        self.stage.accumulate_covariance(micro_batch_id, batch_key)

    @_timed
    def accumulate_corrections(self, micro_batch_id: int, batch_key: int | None = None) -> None:
        self.stage.accumulate_corrections(micro_batch_id, batch_key)

    @_timed
    def score(self, micro_batch_id: int, per_token: bool = False) -> BatchScores:
        return self.stage.score(micro_batch_id, per_token)

    @_timed
    def product_coefficients(self, micro_batch_id: int, key: int | None = None) -> torch.Tensor | None:
        return self.stage.product_coefficients(micro_batch_id, key)

    @_timed
    def accumulate_products(self, key: int, c: torch.Tensor) -> None:
        self.stage.accumulate_products(key, c)

    def take_products(self) -> tuple[dict[str, torch.Tensor], int]:
        return self.stage.take_products()

    def discard(self, micro_batch_ids: list[int] | None = None) -> None:
        self.stage.discard(micro_batch_ids)

    # -- state set by the worker -----------------------------------------------------------------------------
    def set_bases(self, bases: dict[str, LayerBasis | None]) -> None:
        self.stage.set_bases(bases)

    def fetch_bases(self, bases_refs: list) -> None:
        """This stage's layers' bases from the owners' objects (LayerOwner.load_bases, in the compute dtype), shared
        with the object store's pages: no copy of them in this process (a basis sent as torch tensors is pickled, and
        was held twice). Other layers' are dropped."""
        from actors.fitter import fetch_bases

        self.stage.set_bases(fetch_bases(self.stage.layer_names, bases_refs))

    def set_queries(self, queries: PreparedQueries, path: str = "auto") -> None:
        self.stage.set_queries(queries, path)

    def set_directions(self, directions: dict[str, torch.Tensor], path: str = "auto") -> None:
        self.stage.set_directions(directions, path)

    def eigendecompose(self, covariance: CovarianceSums) -> dict[str, LayerBasis]:
        """Eigenbases of the given layers' sums on this stage's device."""
        return eigendecompose(covariance, self.stage.device)

    @ray.method(concurrency_group=EXPORTS)
    def export(self, kind: str, name: str):
        """LayerOwner.export, in a thread of its own: while this stage finishes its layers (waiting on the other
        pipelines' parts), its parts of theirs must still go out, or two pipelines' stages would wait on each
        other for ever. It only pops a layer the default thread's finish never touches."""
        return super().export(kind, name)

    def reset(self, kind: str) -> None:
        """Drop the partial sums of `kind` and the micro-batch ids they include (a pass starts, and its phase)."""
        self.stage.drop_sums(kind)
        self.begin_phase()

    def hold(self, kind: str, expected: set[int]) -> dict | None:
        """Keep this pass's sums as this stage's layers' owner (LayerOwner.held) if they include exactly the
        `expected` micro-batches: their counts, else None (the worker re-runs what is missing and asks again)."""
        if not self._includes(kind, expected):
            return None
        sums, _ = self.take(kind)
        self.held[kind] = sums
        self.end_phase(kind)
        release_free_memory()  # the pass's activations, freed but still in the allocator's arenas, before finishing
        return {"tokens": getattr(sums, "tokens", 0), "sequences": sums.sequences}

    def peaks(self) -> dict:
        return {"stage": self.stage.index, "peak_rss": self.peak_rss(), "phases": self.phase_peaks()}

    def eigh_device(self):
        return self.stage.device

    def _includes(self, kind: str, expected: set[int]) -> bool:
        stats = self.stage.statistics
        return set(stats.covariance_ids if kind == COVARIANCE else stats.correction_ids) == set(expected)

    def take(self, kind: str) -> tuple[CovarianceSums | LambdaSums, set[int]]:
        """(partial sums, the micro-batch ids they include), and reset."""
        stats = self.stage.statistics
        if kind == COVARIANCE:
            ids = set(stats.covariance_ids)
            return self.stage.take_covariance(), ids
        ids = set(stats.correction_ids)
        return self.stage.take_corrections(), ids
