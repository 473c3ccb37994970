"""Before a fit starts: estimate every process's peak memory (whence.memory_estimate), log it, and refuse with the
options that would fit when the cluster cannot hold it.

The model is built on PyTorch's meta device from its config (shapes, no weights), so the check costs the driver
nothing and runs before any actor starts.
"""

from __future__ import annotations

import dataclasses
import logging

from whence.errors import WhenceError
from whence.memory_estimate import FitShape, MemoryEstimate, estimate_fit

log = logging.getLogger("whence.fit")


class InsufficientMemoryError(WhenceError):
    """The fit's estimated peak memory exceeds what the cluster's nodes hold."""


def fit_shape(model: str, modules: str, config, cluster) -> FitShape:
    """The shapes of the fit of `model` with FitConfig `config` and ClusterSettings `cluster`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from whence.model import find_tracked_layers

    model_config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model_config)
    tracked = find_tracked_layers(meta, modules)
    layers = [layer.describe() for layer in tracked]
    dtype = cluster.dtype if cluster.dtype in ("float64", "float32", "bfloat16", "float16") else "float32"
    blocks = _block_count(meta, required=cluster.checkpointing)
    return FitShape(layers, sum(p.numel() for p in meta.parameters()), int(model_config.vocab_size), dtype,
                    config.batch_size, config.seq_len, config.num_blocks, config.factor_dtype, cluster.workers,
                    cluster.shards, largest_tensor_bytes(model), _stages(meta, tracked, cluster.shards),
                    checkpointing=cluster.checkpointing, blocks=blocks,
                    hidden=int(getattr(model_config, "hidden_size", 0) or 0))


def _block_count(meta, required: bool) -> int:
    """The transformer blocks that activation checkpointing recomputes one at a time (0 for a family whose blocks
    the stages cannot run, whence.shards.architecture); required: ModelError for such a family instead, before
    any actor starts."""
    from whence.errors import ModelError
    from whence.shards.architecture import architecture_of

    try:
        return len(architecture_of(meta).blocks_of(meta))
    except ModelError as error:
        if required:
            raise ModelError(f"--activation-checkpointing runs the model block by block: {error}") from None
        return 0


def _stages(meta, tracked, shards: int):
    """Each pipeline stage's (tracked layer names, parameter count) as whence.shards.planning plans them on the
    meta model (None without shards, or for a family that has no stages: the estimate splits evenly)."""
    if shards <= 1:
        return None
    from whence.errors import ModelError
    from whence.shards.architecture import architecture_of
    from whence.shards.planning import parameter_count, stage_specs

    try:
        architecture = architecture_of(meta)
        specs = stage_specs(meta, shards, tracked)
    except ModelError:
        return None
    plan = []
    for spec in specs:
        first, last = spec.index == 0, spec.index == shards - 1
        held = architecture.held_modules(meta, spec.block_range, first, last)
        plan.append((tuple(layer.name for layer in spec.layers), parameter_count(held)))
    return tuple(plan)


def largest_tensor_bytes(model: str) -> int:
    """Bytes of a local checkpoint's largest tensor, from its *.safetensors files' headers; 0 for a hub id
    (whence.model.check_finite_checkpoint reads local files only)."""
    from pathlib import Path

    from whence.model import safetensors_header, tensor_spans

    files = sorted(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
    return max((span for file in files for span in tensor_spans(safetensors_header(file)[0])), default=0)


def cluster_memory() -> tuple[int, int]:
    """(bytes of all alive nodes, bytes of the largest): Ray's memory and object-store resources per node."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    sizes = [int(r.get("memory", 0) + r.get("object_store_memory", 0)) for r in nodes]
    return sum(sizes), max(sizes, default=0)


def fits(estimate: MemoryEstimate, total: int, largest: int) -> bool:
    return estimate.total <= total and estimate.largest <= largest


def alternatives(shape: FitShape, total: int, largest: int) -> list[str]:
    """The command-line changes, one at a time, under which the estimate fits."""
    candidates = [(f"--num-blocks {b}", {"num_blocks": b}) for b in (2, 4, 8, 16) if b > shape.num_blocks]
    if shape.factor_dtype != "float32":
        candidates.append(("--factor-dtype float32", {"factor_dtype": "float32"}))
    candidates += [(f"--workers {w}", {"workers": w}) for w in range(shape.workers - 1, 0, -1)]
    candidates += [(f"--shards {s}", {"shards": s}) for s in (2, 4) if s > shape.shards]
    candidates += [(f"--batch-size {b}", {"batch_size": b}) for b in (4, 1) if b < shape.batch_size]
    if not shape.checkpointing and shape.shards == 1 and shape.blocks:
        candidates.append(("--activation-checkpointing", {"checkpointing": True}))
    return [flag for flag, change in candidates if fits(estimate_fit(dataclasses.replace(shape, **change)), total,
                                                         largest)]


def check_fit_memory(shape: FitShape) -> MemoryEstimate:
    """Log the estimate; InsufficientMemoryError listing what would fit when the cluster cannot hold it."""
    estimate = estimate_fit(shape)
    total, largest = cluster_memory()
    log.info("memory estimate: %s (cluster: %.2f GiB, largest node %.2f GiB)", estimate.describe(), total / 2**30,
             largest / 2**30)
    if total and not fits(estimate, total, largest):
        options = alternatives(shape, total, largest)
        raise InsufficientMemoryError(
            f"this fit needs about {estimate.total / 2**30:.1f} GiB ({estimate.describe()}), more than the cluster's "
            f"{total / 2**30:.1f} GiB (largest node {largest / 2**30:.1f} GiB); options that would fit: "
            + ", ".join(options + ["fewer tracked modules (--modules REGEX)", "a larger cluster (--address)"]))
    return estimate
