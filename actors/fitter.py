"""FitterActor: holds a model replica, accumulates partial factor sums over its share of the sequences, and owns
a set of layers (actors.owner.LayerOwner): it reduces, eigendecomposes and writes their factors itself.

A plain class: `flows.fit_pool` makes it remote (with its resources and restart policy) and hands each actor a
Ray Dataset of its fragments (a fixed assignment, so that every run sums the same parts). Passes return counts
only; the sums stay here until their owners fetch them.
"""

from __future__ import annotations

import numpy as np

from actors.hosting import (
    ModelSpec,
    host_model,
    map_large_blocks,
    maybe_fail,
    pad_id_of,
    rows_to_batch,
    sequence_rows_mask,
)
from actors.owner import LayerOwner, basis_from_transfer, release_free_memory
from whence.errors import NonFiniteError
from whence.factor_owners import CORRECTION, COVARIANCE
from whence.fitting import FactorFitter
from whence.model import model_fingerprint
from whence.shards import ShardedPipeline


class FitterActor(LayerOwner):
    def __init__(self, spec: ModelSpec, fisher: str, num_blocks: int, seed: int, batch_size: int,
                 num_threads: int | None = None, skip_non_finite: bool = False, checkpointing: bool = False):
        map_large_blocks()  # before the model and the passes: see actors.hosting.MMAP_THRESHOLD_BYTES
        self.model, self.tokenizer, self.layers = host_model(spec, num_threads)
        self.fisher, self.num_blocks = fisher, num_blocks
        self.checkpointing = checkpointing
        self.fitter = self._fitter(self.layers)
        self.seed = seed
        self.batch_size = batch_size
        self.pad_id = pad_id_of(self.tokenizer)
        self.batches_done = 0
        self.sequences_done = 0
        self.held = {}
        self.skip_non_finite = skip_non_finite
        self.non_finite: list[str] = []  # this pass's sequences skipped for NaN or inf ("doc_id#chunk")

    def describe(self) -> dict:
        return {"layers": [layer.describe() for layer in self.layers], "fingerprint": model_fingerprint(self.model),
                "dtype": str(next(self.model.parameters()).dtype), "device": str(self.fitter.device),
                "checkpointing": isinstance(self.fitter, ShardedPipeline)}

    def ready(self) -> bool:
        return True

    def _batches(self, dataset):
        """(rows, the sequence rows' mask, their labels "doc_id#chunk") for each batch of this actor's sequences."""
        if dataset is None:  # more workers than fragments: this one has none
            return
        for rows in dataset.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            keep = sequence_rows_mask(rows)
            if keep.any():
                labels = [f"{doc_id}#{chunk}" for doc_id, chunk in zip(rows["doc_id"][keep], rows["chunk"][keep])]
                yield rows, keep, labels

    def _accumulate(self, dataset, step) -> None:
        """step(batch) over this actor's batches; a NaN or inf names its sequences, not just its batch rows. With
        skip_non_finite the batch is taken one sequence at a time instead and the sequences that fail are skipped
        and named in self.non_finite (a failed step adds nothing: captures are checked before any sum)."""
        for rows, keep, labels in self._batches(dataset):
            try:
                step(rows_to_batch(rows, keep, self.pad_id, self.seed))
            except NonFiniteError as error:
                if not self.skip_non_finite:
                    raise error.naming(labels) from None
                self._one_by_one(rows, keep, labels, step)
            self._count(len(labels))

    def _one_by_one(self, rows, keep, labels: list[str], step) -> None:
        for row, label in zip(np.flatnonzero(keep), labels):
            alone = np.zeros_like(keep)
            alone[row] = True
            try:
                step(rows_to_batch(rows, alone, self.pad_id, self.seed))  # its labels seeded by its key, as in a batch
            except NonFiniteError:
                self.non_finite.append(label)

    def _track(self, names: list[str]) -> None:
        """Accumulate the layers `names` only (a resumed fit skips the finished ones); sums start at zero."""
        self.held, self.non_finite = {}, []
        self.fitter = self._fitter([layer for layer in self.layers if layer.name in set(names)])
        release_free_memory()  # what the last pass freed, on another thread's arena

    def _fitter(self, layers):
        """FactorFitter over `layers`; with activation checkpointing the same methods over one stage per block
        (whence.shards.ShardedPipeline.checkpointed), each block's graph rebuilt at its backward."""
        if self.checkpointing:
            return ShardedPipeline.checkpointed(self.model, layers, self.fisher, self.num_blocks)
        return FactorFitter(self.model, layers, self.fisher, self.num_blocks)

    def covariance_pass(self, dataset, names: list[str]) -> dict:
        """Covariance sums of the layers `names` over this actor's sequences, kept here: returns the counts."""
        self._track(names)
        with self.phase(COVARIANCE):
            self._accumulate(dataset, self.fitter.covariance_step)
            sums = self.held[COVARIANCE] = self.fitter.take_covariance()
        return {"tokens": sums.tokens, "sequences": sums.sequences, "non_finite": list(self.non_finite)}

    def correction_pass(self, dataset, names: list[str], bases_refs: list) -> dict:
        """Eigenvalue-correction sums of `names` in the owners' bases (bases_refs: ObjectRefs of {name: its basis's
        arrays}, fetched here from the object store; a layer without one uses the identity basis: diagonal)."""
        self._track(names)
        with self.phase(CORRECTION):
            self.fitter.set_bases(fetch_bases(names, bases_refs))  # in the compute dtype already: no copy
            self._accumulate(dataset, self.fitter.correction_step)
            self.fitter.set_bases(dict.fromkeys(names))  # the bases are not needed any more
            sums = self.held[CORRECTION] = self.fitter.take_corrections()
        return {"tokens": 0, "sequences": sums.sequences, "non_finite": list(self.non_finite)}

    def eigh_device(self):
        return self.fitter.device  # its GPU, when it has one

    def progress(self) -> int:
        """Sequences processed so far by this actor (answered while a pass runs: max_concurrency=2)."""
        return self.sequences_done

    def _count(self, sequences: int):
        self.batches_done += 1
        self.sequences_done += sequences
        maybe_fail(self.batches_done)


def fetch_bases(names: list[str], bases_refs: list) -> dict:
    """{name: basis or None} for `names`, from the owners' objects (LayerOwner.load_bases; other layers dropped;
    a pipeline owner answers with a list of its stages' objects: actors.stage_passes.StagePasses.load_bases).
    The bases share the object store's memory: fetched, they take no memory beyond the store's pages."""
    import ray

    bases = dict.fromkeys(names)
    for part in ray.get(list(bases_refs)):
        for piece in ray.get(part) if isinstance(part, list) else [part]:
            bases.update({name: basis_from_transfer(arrays) for name, arrays in piece.items() if name in bases})
    return bases
