"""How much memory each process of a fit will need at its peak: pure arithmetic over layer shapes and settings.

Bytes per process (flows.memory_check compares them with the cluster's memory before any work):

    driver          DRIVER_BASELINE: plans, counts and ObjectRefs only; no sums or factors pass through it
    fitting actor   ACTOR_BASELINE + model weights + the larger of its phases:
      covariance    its partial sums of every tracked layer (float64, C = sum_l layer_sum_bytes) + one batch's
                    captures and autograd graph (ACTIVATION_FACTOR x B T (d_in + d_out) per layer, compute
                    dtype) + the logits' softmax and gradient (3 B T V floats)
      finish        what is left of C + one reduced layer + eigh's copies of its largest block (normalised,
                    symmetrised, eigenvectors: 3 x 8 d^2)
      correction    every layer's bases as fetched (factor dtype) and as used (compute dtype) while they are cast;
                    then the bases used, the Lambda sums (float64, d_out d_in per layer), one layer's rotated
                    per-sequence gradients (B d_out d_in) and a batch's activations, as above
    pipeline (--shards N): each stage loads the whole model before keeping its blocks (weights x 1, at start);
                    the pipeline's worker process collects every layer's sums (C) and finishes its layers, as a
                    fitting actor without weights.

Python, torch and Ray's worker take ACTOR_BASELINE before any tensor (measured on CPU: `whence bench --only
memory` prints the estimate beside the measured peaks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from whence.factors import block_slices
from whence.fit_plan import FLOAT64_BYTES, layer_sum_bytes, plan_owners

DRIVER_BASELINE = 600 * 2**20  # the driver: Python, torch, Ray's core worker and Ray Data's executor
ACTOR_BASELINE = 540 * 2**20  # a fitting actor before its model: Python, torch, transformers, Ray Data (measured)
# One batch's activations: the captured inputs and output gradients of every tracked layer plus the tensors
# autograd saves for the backward pass, about ACTIVATION_FACTOR x B T sum_l (d_in + d_out) (measured: a
# SmolLM2-135M actor at batch 8 x 256 tokens held ~5.5 GB beyond its weights and sums).
ACTIVATION_FACTOR = 3
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class FitShape:
    """What the estimate needs to know about a fit. layers: TrackedLayer.describe() dicts (name, d_out, d_in)."""

    layers: list[dict]
    parameters: int  # the model's parameter count
    vocab_size: int
    model_dtype: str = "float32"  # as loaded in the actors
    batch_size: int = 8
    seq_len: int = 512
    num_blocks: int = 1
    factor_dtype: str = "float64"
    workers: int = 1
    shards: int = 1


@dataclass
class MemoryEstimate:
    """Peak bytes per process: the driver, each fitting actor (or pipeline worker), each stage (with shards)."""

    driver: int
    actors: list[int]
    stages: list[int] = field(default_factory=list)
    factors: int = 0  # bytes of the factors written

    @property
    def total(self) -> int:
        return self.driver + sum(self.actors) + sum(self.stages)

    @property
    def largest(self) -> int:
        return max([self.driver, *self.actors, *self.stages])

    def describe(self) -> str:
        stages = f"; stages {', '.join(map(_size, self.stages))}" if self.stages else ""
        return (f"driver {_size(self.driver)}; fitting actors {', '.join(map(_size, self.actors))}{stages}; total "
                f"{_size(self.total)} for {_size(self.factors)} of factors")


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _basis_bytes(layer: dict, num_blocks: int, element: int) -> int:
    squares = sum((s.stop - s.start) ** 2 for s in block_slices(layer["d_in"], num_blocks))
    squares += sum((s.stop - s.start) ** 2 for s in block_slices(layer["d_out"], num_blocks))
    return element * (squares + layer["d_in"] + layer["d_out"])


def _largest_block(layer: dict, num_blocks: int) -> int:
    return max(s.stop - s.start for d in (layer["d_in"], layer["d_out"]) for s in block_slices(d, num_blocks))


def owner_peak(shape: FitShape, owned: list[dict], weights: int) -> int:
    """Peak bytes of one fitting actor (weights: its model's bytes; 0 for a pipeline's worker process)."""
    compute = 8 if shape.model_dtype == "float64" else 4
    stored = DTYPE_BYTES[shape.factor_dtype]
    sums = sum(layer_sum_bytes(layer["d_out"], layer["d_in"], shape.num_blocks) for layer in shape.layers)
    tokens = shape.batch_size * shape.seq_len
    captures = sum(ACTIVATION_FACTOR * tokens * (layer["d_in"] + layer["d_out"]) * compute
                   for layer in shape.layers) if weights else 0
    logits = 3 * tokens * shape.vocab_size * compute if weights else 0
    covariance = sums + captures + logits
    finish = sums + max((layer_sum_bytes(layer["d_out"], layer["d_in"], shape.num_blocks)
                         + 3 * FLOAT64_BYTES * _largest_block(layer, shape.num_blocks) ** 2 for layer in owned),
                        default=0)
    bases = sum(_basis_bytes(layer, shape.num_blocks, stored) + _basis_bytes(layer, shape.num_blocks, compute)
                for layer in shape.layers)
    lambdas = sum(FLOAT64_BYTES * layer["d_out"] * layer["d_in"] for layer in shape.layers)
    rotated = max(shape.batch_size * layer["d_out"] * layer["d_in"] * compute for layer in shape.layers)
    used = sum(_basis_bytes(layer, shape.num_blocks, compute) for layer in shape.layers)
    correction = max(bases, used + lambdas + rotated + captures + logits)  # fetched copies go before any batch
    return ACTOR_BASELINE + weights + max(covariance, finish, correction)


def estimate_fit(shape: FitShape) -> MemoryEstimate:
    """The peak of every process of the fit `shape` describes."""
    weights = shape.parameters * DTYPE_BYTES.get(shape.model_dtype, 4)
    owners = plan_owners(shape.layers, shape.workers, shape.num_blocks)
    by_name = {layer["name"]: layer for layer in shape.layers}
    stored = DTYPE_BYTES[shape.factor_dtype]
    factors = sum(_basis_bytes(layer, shape.num_blocks, stored) + stored * layer["d_out"] * layer["d_in"]
                  for layer in shape.layers)
    if shape.shards > 1:
        actors = [owner_peak(shape, [by_name[n] for n in names], 0) for names in owners]
        stage = ACTOR_BASELINE + weights + sum(layer_sum_bytes(lay["d_out"], lay["d_in"], shape.num_blocks)
                                               for lay in shape.layers) // shape.shards
        return MemoryEstimate(DRIVER_BASELINE, actors, [stage] * (shape.workers * shape.shards), factors)
    actors = [owner_peak(shape, [by_name[n] for n in names], weights) for names in owners]
    return MemoryEstimate(DRIVER_BASELINE, actors, [], factors)
