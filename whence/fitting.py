"""Fitting factors from batches of training sequences: the covariance pass and the eigenvalue-correction pass.

`FactorFitter` is the unit of work that Ray actors wrap: it holds a model and its tracked layers, and turns
batches into mergeable partial sums. `fit_factors` runs the whole recipe in one process (notebooks, tests):

    1. covariance pass       CovarianceSums     (skipped for diagonal and identity)
    2. eigendecomposition    LayerBasis per layer, float64
    3. correction pass       LambdaSums         (ekfac: in the eigenbasis; diagonal: in the identity basis)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from whence.factors import (
    CovarianceSums,
    Factors,
    LambdaSums,
    LayerBasis,
    assemble_factors,
    compute_dtype,
    eigendecompose_layer,
)
from whence.model import TrackedLayer
from whence.task import LanguageModelingTask
from whence.tracking import LayerTracker


def needs_covariance(strategy: str) -> bool:
    return strategy in ("ekfac", "kfac")


def needs_correction(strategy: str) -> bool:
    return strategy in ("ekfac", "diagonal")


class FactorFitter:
    """Accumulates a model's factor statistics over batches (dicts from whence.text.collate plus `seeds`)."""

    def __init__(self, model, layers: list[TrackedLayer], fisher: str = "true", num_blocks: int = 1,
                 task: LanguageModelingTask | None = None):
        self.model = model
        self.layers = layers
        self.fisher = fisher
        self.task = task or LanguageModelingTask()
        self.tracker = LayerTracker(layers)
        self.shapes = {layer.name: (layer.d_out, layer.d_in) for layer in layers}
        self.num_blocks = num_blocks
        self.device = next(model.parameters()).device
        # Allocated at a pass's first batch: a fitter running one pass never holds the other pass's sums.
        self.covariance: CovarianceSums | None = None
        self.corrections: LambdaSums | None = None
        self.bases: dict[str, LayerBasis | None] = dict.fromkeys(self.shapes)

    def _captures(self, batch: dict):
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        captures = self.tracker.capture(
            self.model, batch, lambda logits, b: self.task.fisher_objective(logits, b, self.fisher), self.task.forward
        )
        tokens = int(batch["attention_mask"].sum())
        return dict(zip(self.shapes, captures)), tokens, batch["input_ids"].shape[0]

    def covariance_step(self, batch: dict) -> None:
        captures, tokens, sequences = self._captures(batch)
        if self.covariance is None:
            self.covariance = CovarianceSums.zeros(self.shapes, self.num_blocks, self.device)
        self.covariance.accumulate(captures, tokens, sequences)

    def set_bases(self, bases: dict[str, LayerBasis | None]) -> None:
        """Bases for the correction pass (None for a layer means the identity basis: the diagonal strategy)."""
        # Cast once to the precision the rotations run in (float32 for float32 and bfloat16 models, float64 for
        # float64 ones) instead of converting the float64 eigenvectors at every batch; sums stay float64.
        dtype = compute_dtype(next(self.model.parameters()).dtype)
        self.bases = {name: basis_to(basis, self.device, dtype) for name, basis in bases.items()}

    def correction_step(self, batch: dict) -> None:
        captures, _, sequences = self._captures(batch)
        if self.corrections is None:
            self.corrections = LambdaSums.zeros(self.shapes, self.device)
        self.corrections.accumulate(captures, self.bases, sequences)

    def take_covariance(self) -> CovarianceSums:
        """The partial sums so far (on CPU), and reset."""
        result = self.covariance or CovarianceSums.zeros(self.shapes, self.num_blocks, self.device)
        self.covariance = None
        return result.to("cpu")

    def take_corrections(self) -> LambdaSums:
        result = self.corrections or LambdaSums.zeros(self.shapes, self.device)
        self.corrections = None
        return result.to("cpu")


def basis_to(basis: LayerBasis | None, device, dtype: torch.dtype | None = None) -> LayerBasis | None:
    """The basis on `device`, its eigenvectors in `dtype` (default: as stored)."""
    if basis is None:
        return None
    return LayerBasis([q.to(device, dtype) for q in basis.activation_vectors], basis.activation_values.to(device),
                      [q.to(device, dtype) for q in basis.gradient_vectors], basis.gradient_values.to(device))


def eigendecompose(covariance: CovarianceSums, device: torch.device | str | None = None) -> dict[str, LayerBasis]:
    """Every layer's eigenbases, computed on `device` (default: where the sums are), returned on the CPU."""
    return {name: eigendecompose_layer(covariance, name, device) for name in covariance.activation}


def fit_factors(
    model,
    layers: list[TrackedLayer],
    batches: Callable[[], Iterable[dict]],
    strategy: str = "ekfac",
    fisher: str = "true",
    num_blocks: int = 1,
    metadata: dict | None = None,
    task: LanguageModelingTask | None = None,
) -> Factors:
    """Fit factors in this process. `batches()` returns a fresh iterable of batches for each pass."""
    fitter = FactorFitter(model, layers, fisher, num_blocks, task)
    covariance, bases = None, {layer.name: None for layer in layers}
    if needs_covariance(strategy):
        for batch in batches():
            fitter.covariance_step(batch)
        covariance = fitter.take_covariance()
        bases = eigendecompose(covariance, fitter.device)  # on the model's device: the GPU when there is one
    corrections = None
    if needs_correction(strategy):
        fitter.set_bases(bases if strategy == "ekfac" else {layer.name: None for layer in layers})
        for batch in batches():
            fitter.correction_step(batch)
        corrections = fitter.take_corrections()
    meta = dict(metadata or {})
    if covariance is not None:
        meta.setdefault("tokens", covariance.tokens)
        meta.setdefault("sequences", covariance.sequences)
    elif corrections is not None:
        meta.setdefault("sequences", corrections.sequences)
    return assemble_factors(strategy, [layer.describe() for layer in layers], covariance, bases, corrections, meta)
