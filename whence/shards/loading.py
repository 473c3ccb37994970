"""Building one pipeline stage from a model's checkpoint with only that stage's weights in memory.

`load_stage` builds the model on the meta device (whence.skeleton), plans the stages on it as split_model plans
them (the plan needs shapes only), reads the stage's own parameters and buffers from the safetensors checkpoint
and computes its non-persistent buffers. Every other module stays on the meta device and goes with the skeleton.
The model's fingerprint (whence.model.model_fingerprint, which the factors' and results' manifests record and the
compatibility checks compare) is hashed from the checkpoint a chunk at a time, so it is the same value without the
whole model in memory. Where the model cannot be loaded that way (a hub id not cached as safetensors, .bin or GGUF
weights, tensors that need converting: whence.skeleton.PartialLoadUnsupported) the whole model is loaded, split,
and all but the stage freed, as before; the process logs why, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from whence.model import check_finite_parameters, find_tracked_layers, load_causal_lm, model_fingerprint
from whence.shards.architecture import MODEL_TYPES, architecture_of
from whence.shards.planning import stage_specs
from whence.shards.stage import Stage
from whence.skeleton import PartialLoadUnsupported, model_skeleton

log = logging.getLogger(__name__)
_logged_fallbacks: set[str] = set()  # each reason to load the whole model is logged once per process


@dataclass
class LoadedStage:
    """A stage on the CPU and what its actor reports about the whole model."""

    stage: Stage
    fingerprint: str  # model_fingerprint of the whole model
    model_layers: list[dict]  # TrackedLayer.describe() of every tracked layer of the model, in model order
    whole_model_loaded: bool  # True when the fallback loaded every weight


def load_stage(path_or_id: str, stage_index: int, num_stages: int, modules: str = "mlp",
               dtype: torch.dtype = torch.float32, *, fisher: str = "true", num_blocks: int = 1) -> LoadedStage:
    """Stage `stage_index` of `num_stages` of the causal LM at `path_or_id` (tracked modules `modules`, weights in
    `dtype`, on the CPU), equal to split_model(load_causal_lm(...))[stage_index]: only its own weights are read
    when the checkpoint allows it, else the whole model is loaded and the rest freed (logged once)."""
    try:
        return load_stage_only(path_or_id, stage_index, num_stages, modules, dtype, fisher=fisher,
                               num_blocks=num_blocks)
    except PartialLoadUnsupported as reason:
        _log_fallback(path_or_id, str(reason))
    return load_stage_from_whole_model(path_or_id, stage_index, num_stages, modules, dtype, fisher=fisher,
                                       num_blocks=num_blocks)


def load_stage_only(path_or_id: str, stage_index: int, num_stages: int, modules: str = "mlp",
                    dtype: torch.dtype = torch.float32, *, fisher: str = "true", num_blocks: int = 1) -> LoadedStage:
    """load_stage reading only the stage's weights; PartialLoadUnsupported when the checkpoint does not allow it."""
    skeleton = model_skeleton(path_or_id, dtype)
    model = skeleton.model
    if getattr(model.config, "model_type", None) not in MODEL_TYPES:
        raise PartialLoadUnsupported(f"model type {model.config.model_type!r} has no pipeline stages")
    layers = find_tracked_layers(model, modules)
    spec = stage_specs(model, num_stages, layers)[stage_index]
    first, last = spec.index == 0, spec.index == num_stages - 1
    parts = architecture_of(model).stage_parts(model, spec.block_range, first, last)
    skeleton.materialise(parts.values())
    check_finite_parameters(model, path_or_id)  # the stage's, named as in the model (the rest are on meta)
    stage = Stage(model, spec, fisher=fisher, num_blocks=num_blocks)
    return LoadedStage(stage, skeleton.fingerprint(), [layer.describe() for layer in layers], False)


def load_stage_from_whole_model(path_or_id: str, stage_index: int, num_stages: int, modules: str = "mlp",
                                dtype: torch.dtype = torch.float32, *, fisher: str = "true", num_blocks: int = 1
                                ) -> LoadedStage:
    """load_stage by loading the whole model: the stage keeps references to its own modules only, so the others
    are freed with the model when this returns. Only this stage is built (split_model would build every stage,
    each with its layers' float64 sums)."""
    model, _ = load_causal_lm(path_or_id, device="cpu", dtype=dtype)
    architecture_of(model)  # ModelError for a family that has no pipeline stages
    layers = find_tracked_layers(model, modules)
    spec = stage_specs(model, num_stages, layers)[stage_index]
    stage = Stage(model, spec, fisher=fisher, num_blocks=num_blocks)
    return LoadedStage(stage, model_fingerprint(model), [layer.describe() for layer in layers], True)


def _log_fallback(path_or_id: str, reason: str) -> None:
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        log.warning("%s: loading the whole model for each pipeline stage (%s)", path_or_id, reason)
