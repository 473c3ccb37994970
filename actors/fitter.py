"""FitterActor: holds a model replica and accumulates partial factor sums over its share of the stream.

A plain class: `flows.fit` makes it remote (with its resources and restart policy) and hands each actor one
iterator of `Dataset.streaming_split`. Partial sums come back to the driver and are added up there.
"""

from __future__ import annotations

from actors.hosting import ModelSpec, host_model, maybe_fail, pad_id_of, rows_to_batch, sequence_rows_mask
from whence.factors import CovarianceSums, LayerBasis
from whence.fitting import FactorFitter, eigendecompose
from whence.model import model_fingerprint


class FitterActor:
    def __init__(self, spec: ModelSpec, fisher: str, num_blocks: int, seed: int, batch_size: int,
                 num_threads: int | None = None):
        self.model, self.tokenizer, self.layers = host_model(spec, num_threads)
        self.fitter = FactorFitter(self.model, self.layers, fisher, num_blocks)
        self.seed = seed
        self.batch_size = batch_size
        self.pad_id = pad_id_of(self.tokenizer)
        self.batches_done = 0
        self.sequences_done = 0

    def describe(self) -> dict:
        return {"layers": [layer.describe() for layer in self.layers], "fingerprint": model_fingerprint(self.model),
                "dtype": str(next(self.model.parameters()).dtype), "device": str(self.fitter.device)}

    def _batches(self, split):
        for rows in split.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            keep = sequence_rows_mask(rows)
            if keep.any():
                yield rows_to_batch(rows, keep, self.pad_id, self.seed), int(keep.sum())

    def covariance_pass(self, split):
        """Covariance sums over this actor's split: (CovarianceSums, sequences)."""
        for batch, sequences in self._batches(split):
            self.fitter.covariance_step(batch)
            self._count(sequences)
        return self.fitter.take_covariance()

    def correction_pass(self, split, bases: dict[str, LayerBasis | None]):
        """Eigenvalue-correction sums over this actor's split, in the given bases."""
        self.fitter.set_bases(bases)
        for batch, sequences in self._batches(split):
            self.fitter.correction_step(batch)
            self._count(sequences)
        return self.fitter.take_corrections()

    def eigendecompose(self, covariance: CovarianceSums) -> dict[str, LayerBasis]:
        """Eigenbases of the given layers' sums, on this actor's device (its GPU, when it has one)."""
        return eigendecompose(covariance, self.fitter.device)

    def progress(self) -> int:
        """Sequences processed so far by this actor (answered while a pass runs: max_concurrency=2)."""
        return self.sequences_done

    def _count(self, sequences: int):
        self.batches_done += 1
        self.sequences_done += sequences
        maybe_fail(self.batches_done)
