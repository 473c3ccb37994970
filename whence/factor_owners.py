"""What the owner of a layer does with it: reduce the workers' partial sums, eigendecompose, write the factors.

A fit's data-parallel workers each hold partial sums for every tracked layer; each layer has one owner
(whence.fit_plan.plan_owners). After a pass the owner adds the workers' parts of its layers in worker order (a
fixed order: the same sum in every run), one layer at a time, and finishes that layer before taking the next, so
it holds at most one reduced layer beyond its own partial sums:

    covariance   S_l = sum_w S_l^w, A_l likewise -> eigh in float64 (whence.factors.eigendecompose_layer) -> the
                 layer's basis file; with kfac also Lambda_KFAC; the sums are freed once the basis exists
    correction   L_l = sum_w L_l^w -> Lambda_l = L_l / sequences -> the layer's lambda file

Functions take `fetch(worker) -> part` so the same code runs in a Ray actor (parts from other actors through the
object store) and in one process (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from whence.factor_files import BASIS, LAMBDA, write_basis, write_lambda
from whence.factors import CovarianceSums, LambdaSums, eigendecompose_layer, kfac_eigenvalues
from whence.storage import Location

COVARIANCE, CORRECTION = "covariance", "correction"


@dataclass(frozen=True)
class FinishJob:
    """How owners finish their layers after a pass: where to write, the strategy, the storage dtype, and the
    pass's total counts over all workers (the driver adds up the workers' counts)."""

    directory: str | Location  # the factors directory (whence.storage: any pyarrow filesystem)
    strategy: str
    factor_dtype: str = "float64"
    tokens: int = 0
    sequences: int = 0


def reduce_layer(name: str, workers: int, fetch: Callable[[int], CovarianceSums | LambdaSums]
                 ) -> CovarianceSums | LambdaSums:
    """sum_w part_w of one layer, w = 0, 1, ..., workers - 1 in that order (fetch(w): worker w's part, holding
    at least that layer)."""
    total = None
    for worker in range(workers):
        part = fetch(worker)
        if isinstance(part, CovarianceSums):
            part = CovarianceSums({name: part.activation[name]}, {name: part.gradient[name]})
        else:
            part = LambdaSums({name: part.sums[name]})
        total = part if total is None else total + part
    return total


def finish_covariance_layer(name: str, sums: CovarianceSums, job: FinishJob, device=None) -> dict:
    """Eigendecompose one layer's reduced sums (float64) and write its basis (with kfac, its Lambda too);
    returns the layer's manifest records {kind: {"file", "sha256"}}."""
    sums = CovarianceSums(sums.activation, sums.gradient, job.tokens, job.sequences)  # normalise by the totals
    basis = eigendecompose_layer(sums, name, device)
    records = {BASIS: write_basis(job.directory, name, basis, job.factor_dtype)}
    if job.strategy == "kfac":
        per_sequence = job.tokens / max(job.sequences, 1)
        records[LAMBDA] = write_lambda(job.directory, name, kfac_eigenvalues(basis, per_sequence),
                                       job.factor_dtype)
    return records


def finish_correction_layer(name: str, sums: LambdaSums, job: FinishJob) -> dict:
    """Lambda_l = (sum over sequences of (Q_S^T dW_n Q_A)^2) / sequences, written; returns its records."""
    eigenvalues = sums.sums[name] / max(job.sequences, 1)
    return {LAMBDA: write_lambda(job.directory, name, eigenvalues, job.factor_dtype)}


def finish_layers(kind: str, names: list[str], workers: int, fetch: Callable[[int, str], object], job: FinishJob,
                  device=None) -> dict[str, dict]:
    """Reduce and finish each of `names` in turn (fetch(worker, name): that worker's part of the layer); each
    layer's sums are dropped as soon as its file is written."""
    records = {}
    for name in names:
        sums = reduce_layer(name, workers, lambda worker, name=name: fetch(worker, name))
        if kind == COVARIANCE:
            records[name] = finish_covariance_layer(name, sums, job, device)
        else:
            records[name] = finish_correction_layer(name, sums, job)
        del sums
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records
