"""A causal LM built on the meta device from its config, then loaded one part at a time from its safetensors
checkpoint: a pipeline stage materialises its own modules only (whence.shards.loading), and the model's
fingerprint is hashed from the checkpoint tensor by tensor.

Both give what load_causal_lm gives, bit for bit (tests/test_stage_loading.py): the skeleton is built as
from_pretrained builds its model (on the meta device, in the load dtype, weights tied), each checkpoint name is
mapped to the model's as from_pretrained maps it (transformers' renamings, the base-model prefix), values are cast
to the load dtype as from_pretrained casts them, and non-persistent buffers (rotary `inv_freq`), which are not in
the checkpoint, are computed by the model's own `_init_weights`, as from_pretrained computes them.

What this cannot load the same way raises PartialLoadUnsupported (callers load the whole model instead): no
safetensors weights, a checkpoint whose tensors need converting (fused or split) rather than renaming, a weight
the checkpoint lacks or holds twice (tied weights stored twice), quantized or fp32-pinned modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from whence.checkpoint import Checkpoint
from whence.model import check_model_source, fingerprint_digest, fingerprint_of, parameter_label


class PartialLoadUnsupported(Exception):
    """The model cannot be loaded part by part; the message says why."""


@dataclass
class ModelSkeleton:
    """A causal LM on the meta device and where each of its tensors is stored.

    sources: for every parameter and persistent buffer, under its first name (named_parameters' order, tied
    weights once), the checkpoint's name for it. parameters: (name, shape, dtype) of each parameter as
    named_parameters lists them before any is materialised (a materialised tied weight is no longer shared with
    the meta modules, so the model's own listing changes)."""

    model: nn.Module
    checkpoint: Checkpoint
    sources: dict[str, str]
    parameters: list[tuple[str, torch.Size, torch.dtype]]

    def materialise(self, modules: Iterable[nn.Module]) -> None:
        """Give `modules` (and their submodules) real CPU tensors: parameters and persistent buffers read from the
        checkpoint, non-persistent buffers computed by the model's _init_weights. A tensor shared by several
        modules (tied weights) stays one tensor. Everything else stays on the meta device."""
        names = _first_names(self.model)
        owners = list({id(m): m for module in modules for m in module.modules()}.values())
        made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id of a meta tensor -> (it, its CPU replacement)
        stored: dict[int, tuple[torch.Tensor, str]] = {}  # replacements read from the checkpoint: (tensor, name)
        for owner in owners:
            for slots in (owner._parameters, owner._buffers):
                for key, meta in slots.items():
                    if meta is None or not meta.is_meta:
                        continue
                    if id(meta) not in made:
                        made[id(meta)] = (meta, _empty_like(meta))
                    real = slots[key] = made[id(meta)][1]
                    if slots is owner._parameters or key not in owner._non_persistent_buffers_set:
                        stored[id(real)] = (real, names[id(meta)])
        computed = self._compute_buffers(owners)
        for tensor, name in stored.values():  # after _init_weights, which may also write parameters
            self.checkpoint.read_into(self.sources[name], tensor)
        for owner, buffer in computed:
            if bool(torch.isnan(buffer).any()):
                raise PartialLoadUnsupported(f"{type(self.model).__name__}._init_weights does not compute the "
                                             f"non-persistent buffers of {type(owner).__name__}")

    def _compute_buffers(self, owners: list[nn.Module]) -> list[tuple[nn.Module, torch.Tensor]]:
        """Compute the owners' non-persistent buffers (rotary inv_freq) with the model's _init_weights, as
        from_pretrained initialises what the checkpoint does not hold. Returns (owner, floating-point buffer)
        pairs, each filled with NaN first so that a buffer _init_weights leaves alone is noticed."""
        computed = []
        for owner in owners:
            buffers = [buffer for key, buffer in owner._buffers.items()
                       if buffer is not None and key in owner._non_persistent_buffers_set]
            if buffers:
                computed += [(owner, b.fill_(float("nan"))) for b in buffers if b.is_floating_point()]
                self.model._init_weights(owner)
        return computed

    def fingerprint(self) -> str:
        """whence.model.model_fingerprint of the model load_causal_lm loads in the skeleton's dtype, hashed from the
        checkpoint a chunk at a time (one chunk held, whatever the model's size).

        model_fingerprint hashes each parameter's values as float32 when float32 holds them exactly, else as
        float64: a float64 parameter is hashed both ways as it is read, and the float64 hash is kept if some value
        was not a float32 value."""
        digest = fingerprint_digest(self.model.config)
        for name, shape, dtype in self.parameters:
            digest.update(parameter_label(name, shape))
            wide = digest.copy() if dtype == torch.float64 else None  # the float64 alternative
            exact = True
            for piece in self.checkpoint.chunks(self.sources[name]):
                values = piece.to(dtype)  # what the loaded model holds
                if not values.is_floating_point():
                    digest.update(values.numpy())
                    continue
                single = values.to(torch.float32)
                digest.update(single.numpy())
                if wide is not None:
                    wide.update(values.numpy())
                    exact = exact and torch.equal(single.to(torch.float64), values)
            if not exact:
                digest = wide
        return fingerprint_of(digest)


def model_skeleton(path_or_id: str, dtype: torch.dtype) -> ModelSkeleton:
    """The causal LM at `path_or_id` built on the meta device in `dtype` (as load_causal_lm(path, dtype=dtype) would
    load it), with its checkpoint; PartialLoadUnsupported when it cannot be loaded part by part."""
    from transformers import AutoModelForCausalLM

    config, _ = check_model_source(path_or_id)
    if getattr(config, "quantization_config", None) is not None:
        raise PartialLoadUnsupported("a quantized checkpoint")
    checkpoint = Checkpoint.find(path_or_id)
    if checkpoint is None:
        raise PartialLoadUnsupported("no safetensors weights (model.safetensors or model.safetensors.index.json)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        raise PartialLoadUnsupported(f"{type(model).__name__} keeps some modules in float32")
    model.eval()
    parameters = [(name, meta.shape, meta.dtype) for name, meta in model.named_parameters()]
    return ModelSkeleton(model, checkpoint, _sources(model, checkpoint), parameters)


def _empty_like(meta: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU tensor (a parameter for a parameter) of a meta tensor's shape and dtype."""
    tensor = torch.empty_like(meta, device="cpu")
    return nn.Parameter(tensor, meta.requires_grad) if isinstance(meta, nn.Parameter) else tensor


def _first_names(model: nn.Module) -> dict[int, str]:
    """id of each parameter and buffer -> its first qualified name (named_parameters' order, tied weights once)."""
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(tensor), name)
    return names


def _sources(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Each parameter and persistent buffer (first name) -> the checkpoint name it is loaded from: the one stored
    name, after renaming, of any of its names (a tied weight is stored under one of its names)."""
    stored = _model_names_of_stored(model, checkpoint)  # model name -> stored name
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
    sources = {}
    for names in aliases.values():
        found = [stored[name] for name in names if name in stored]
        if len(found) != 1:
            held = "holds none of" if not found else "holds several of"
            raise PartialLoadUnsupported(f"the checkpoint {held} {', '.join(names)}")
        sources[names[0]] = found[0]
    for name, source in sources.items():
        if tuple(checkpoint.tensors[source].shape) != tuple(model.get_parameter_or_buffer(name).shape):
            raise PartialLoadUnsupported(f"{source} is stored with shape {checkpoint.tensors[source].shape}")
    return sources


def _model_names_of_stored(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """model name -> stored name for every stored tensor the model has, renamed as from_pretrained renames them
    (transformers.core_model_loading: legacy names, the base-model prefix added or dropped)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError as error:
        raise PartialLoadUnsupported(f"this transformers has no checkpoint renaming API ({error})") from error
    transforms = get_model_conversion_mapping(model, None, None)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    prefix = model.base_model_prefix
    names: dict[str, str] = {}
    for stored in checkpoint.tensors:
        name, converted = rename_source_key(stored, renamings, converters, prefix, expected)
        if name not in expected and stored in expected:  # as from_pretrained: a name that needed no renaming
            name, converted = rename_source_key(stored, [], [], prefix, expected)
        if converted is not None:
            raise PartialLoadUnsupported(f"checkpoint tensor {stored} needs converting ({converted}), not renaming")
        if name in names:
            raise PartialLoadUnsupported(f"checkpoint tensors {names[name]} and {stored} are both {name}")
        if name in expected:
            names[name] = stored
    return names
