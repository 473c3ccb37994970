"""Model adapter: load a Hugging Face causal LM and find the linear layers whose influence we track.

A tracked layer is a linear map y = W a (+ b) inside a transformer block. We always view its weight as
(d_out, d_in) and fold the bias in as an extra input fixed to 1, so d_in counts that extra column. HF GPT-2's
`Conv1D` stores its weight transposed, (d_in, d_out); the tracking code only sees inputs and output gradients,
so the orientation of the stored weight matters only where we map back to parameters (LiSSA, tests).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from whence.errors import ModelError, NonFiniteError

# Where the transformer blocks live, by family. Anything else falls back to "the ModuleList whose length is
# config.num_hidden_layers", which covers most decoder-only models on the Hub.
BLOCK_CONTAINERS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers")
# The name of the MLP submodule inside a block, by family (GPT-2, Llama/Mistral/Qwen2/SmolLM: "mlp").
MLP_NAMES = ("mlp", "feed_forward", "ffn")

MODULE_SELECTIONS = ("mlp", "all")


def default_device() -> torch.device:
    """`cuda` when a GPU is present, else `cpu`."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` means bfloat16 on GPUs that support it, float32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ModelError(f"unknown dtype {name!r}; choose one of auto, {', '.join(dtypes)}")
    return dtypes[name]


def check_model_source(path_or_id: str):
    """(config, tokenizer) of a causal LM, without loading its weights; ModelError naming the path otherwise."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    local = Path(path_or_id)
    if local.exists() and not (local / "config.json").exists():
        raise ModelError(f"{path_or_id}: not a Hugging Face model directory (no config.json)")
    if local.is_dir() and not any(any(local.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.index.json")):
        raise ModelError(f"{path_or_id}: no model weights (model.safetensors or pytorch_model.bin) beside config.json")
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as error:
        raise ModelError(f"{path_or_id}: cannot read a model config: {error}") from error
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{path_or_id}: not a causal language model (model type {config.model_type!r} has no "
                         "causal-LM head in transformers)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError) as error:
        raise ModelError(f"{path_or_id}: cannot load its tokenizer: {error}") from error
    return config, tokenizer


def load_causal_lm(path_or_id: str, device: torch.device | str | None = None, dtype: str | torch.dtype | None = "auto"):
    """Load (model, tokenizer) from a local directory or a hub id, in eval mode on `device`.

    Raises ModelError naming the path when it is not a causal language model.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    config, tokenizer = check_model_source(path_or_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=parse_dtype(dtype, device))
    except (OSError, ValueError) as error:
        raise ModelError(f"{path_or_id}: cannot load a {config.model_type} causal LM from it: {error}") from error
    check_finite_parameters(model, path_or_id)
    model.to(device).eval()
    return model, tokenizer


# check_finite_checkpoint reads a tensor at most this many bytes at a time, into one reused buffer: the driver
# never maps the checkpoint (a memory-mapped file's touched pages count as the process's resident memory).
CHECK_CHUNK_BYTES = 16 * 2**20
SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_header(file) -> tuple[dict, int]:
    """(the JSON header of a .safetensors file, the offset its data starts at): an 8-byte little-endian header
    length, then the header, whose entries give each tensor's dtype, shape and data_offsets from that start.
    `file`: a local path or a whence.storage.Location (only the header's bytes are read)."""
    import struct

    from whence.storage import Location

    location = Location.of(file)
    with location.errors_named("read its header"), location.filesystem.open_input_file(location.path) as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(length)), 8 + length


def tensor_spans(header: dict) -> list[int]:
    """The bytes of each tensor a safetensors header lists (its data_offsets), in header order."""
    return [end - start for key, entry in header.items() if key != "__metadata__" for start, end in
            [entry["data_offsets"]]]


def check_finite_checkpoint(path_or_id: str) -> None:
    """NonFiniteError naming the first tensor of a local model directory's *.safetensors files that holds NaN
    or inf, on the driver, before any Ray work: each floating-point tensor read CHECK_CHUNK_BYTES at a time, so
    this costs the driver one chunk whatever the model's size. Hub ids and other weight formats are checked when
    the model loads (load_causal_lm)."""
    local = Path(path_or_id)
    if not local.is_dir():
        return
    for file in sorted(local.glob("*.safetensors")):
        header, data_start = safetensors_header(file)
        buffer = bytearray(check_buffer_bytes(header))
        with open(file, "rb", buffering=0) as handle:
            for key, entry in header.items():
                dtype = SAFETENSORS_FLOATS.get(entry.get("dtype")) if key != "__metadata__" else None
                if dtype is None:
                    continue
                start, stop = entry["data_offsets"]
                nans, infs = _non_finite_counts(handle, data_start + start, stop - start, dtype, buffer)
                if nans or infs:
                    raise NonFiniteError(f"{file}: parameter {key} {tuple(entry['shape'])} holds {nans} NaN and "
                                         f"{infs} infinite value(s); the checkpoint is damaged or diverged",
                                         layer=key)


def check_buffer_bytes(header: dict) -> int:
    """The buffer check_finite_checkpoint reads a file's tensors through: CHECK_CHUNK_BYTES, or the file's largest
    tensor rounded up to 8 bytes when smaller (a multiple of every itemsize either way)."""
    return min(CHECK_CHUNK_BYTES, -(-max(tensor_spans(header), default=8) // 8) * 8)


def _non_finite_counts(handle, offset: int, size: int, dtype: torch.dtype, buffer: bytearray) -> tuple[int, int]:
    """(NaN count, inf count) of the `size` bytes of `dtype` values at `offset`, read a buffer at a time."""
    nans = infs = 0
    for values in read_chunks(handle, offset, size, dtype, buffer):
        if not bool(torch.isfinite(values).all()):
            nans, infs = nans + int(torch.isnan(values).sum()), infs + int(torch.isinf(values).sum())
    return nans, infs


def read_chunks(handle, offset: int, size: int, dtype: torch.dtype, buffer: bytearray):
    """The `size` bytes of `dtype` values at `offset` of an open binary file, as 1-D tensors over `buffer`, one
    buffer's worth at a time (a whole number of elements each: the buffer's size is a multiple of every itemsize).
    Each tensor shares the buffer's memory: use it before taking the next."""
    handle.seek(offset)
    view = memoryview(buffer)
    while size > 0:
        want, got = min(size, len(buffer)), 0
        while got < want:
            read = handle.readinto(view[got:want])
            if not read:
                raise ModelError(f"{handle.name}: the file ends inside a tensor's data (truncated checkpoint)")
            got += read
        yield torch.frombuffer(buffer, dtype=dtype, count=want // dtype.itemsize)
        size -= want


def check_finite_parameters(model: nn.Module, source: str = "the model") -> None:
    """NonFiniteError naming the first parameter that holds NaN or inf (and how many of its values do), before
    any fitting or scoring: such a weight makes every factor and score NaN. Parameters still on the meta device
    (not loaded: whence.skeleton) are skipped."""
    for name, parameter in model.named_parameters():
        if parameter.is_meta or not parameter.is_floating_point() or bool(torch.isfinite(parameter).all()):
            continue
        values = parameter.detach()
        nans, infs = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
        raise NonFiniteError(f"{source}: parameter {name} {tuple(parameter.shape)} holds {nans} NaN and {infs} "
                             "infinite value(s); the checkpoint is damaged or diverged", layer=name)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or HF GPT-2's Conv1D (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class TrackedLayer:
    """One tracked linear layer. Shapes are in the (d_out, d_in) convention, d_in including the bias column."""

    name: str
    module: nn.Module
    d_in: int  # input features, +1 when the layer has a bias
    d_out: int
    has_bias: bool
    block: int  # index of the transformer block that holds it

    @property
    def transposed(self) -> bool:
        """True for GPT-2's Conv1D, whose weight is stored (d_in, d_out)."""
        return type(self.module).__name__ == "Conv1D"

    def describe(self) -> dict:
        return {"name": self.name, "d_in": self.d_in, "d_out": self.d_out, "bias": self.has_bias, "block": self.block}


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D: (d_in, d_out)
    return d_in, d_out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: (qualified name, ModuleList)."""
    modules = dict(model.named_modules())
    for name in BLOCK_CONTAINERS:
        if isinstance(modules.get(name), nn.ModuleList):
            return name, modules[name]
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers:
            return name, module
    raise ModelError(
        f"cannot find the transformer blocks of {type(model).__name__}; "
        f"select tracked modules with a regex instead. Its modules: {_module_listing(model)}"
    )


def find_tracked_layers(model: nn.Module, modules: str = "mlp") -> list[TrackedLayer]:
    """Tracked layers in forward order.

    modules: "mlp" (every block's MLP linear layers, the paper's choice), "all" (every linear layer inside the
    blocks, attention too), or a regular expression matched (re.search) against qualified module names.
    """
    named = list(model.named_modules())
    if modules in MODULE_SELECTIONS:
        prefix, blocks = find_blocks(model)
        selected = []
        for index, block in enumerate(blocks):
            scope = block
            if modules == "mlp":
                scope = next((getattr(block, n) for n in MLP_NAMES if hasattr(block, n)), None)
                if scope is None:
                    raise ModelError(
                        f"block {prefix}.{index} of {type(model).__name__} has no MLP submodule "
                        f"(looked for {', '.join(MLP_NAMES)}); select modules with a regex. "
                        f"Its modules: {_module_listing(block)}"
                    )
            selected += [(id(m), index) for m in scope.modules() if is_linear(m)]
        wanted = dict(selected)
    else:
        try:
            pattern = re.compile(modules)
        except re.error as error:
            raise ModelError(f"invalid module regex {modules!r}: {error}") from error
        wanted = {id(m): _block_index(name) for name, m in named if is_linear(m) and pattern.search(name)}
        if not wanted:
            raise ModelError(
                f"module regex {modules!r} matches no linear layer of {type(model).__name__}. "
                f"Its linear layers: {', '.join(n for n, m in named if is_linear(m))}"
            )
    layers = []
    for name, module in named:
        if id(module) in wanted:
            d_in, d_out = _linear_shape(module)
            has_bias = getattr(module, "bias", None) is not None
            layers.append(TrackedLayer(name, module, d_in + int(has_bias), d_out, has_bias, wanted[id(module)]))
    if not layers:
        raise ModelError(f"no linear layers selected by {modules!r} in {type(model).__name__}")
    return layers


def _block_index(name: str) -> int:
    match = re.search(r"\.(\d+)\.", name + ".")
    return int(match.group(1)) if match else -1


def _module_listing(model: nn.Module, limit: int = 60) -> str:
    names = [n for n, _ in model.named_modules() if n]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def model_fingerprint(model: nn.Module) -> str:
    """A stable hash of the architecture and of every weight: config, parameter names, shapes and the bytes of
    every parameter's values (a changed value anywhere changes it; about a second per GB of weights).

    Values are hashed as float32 when that is exact (float32, bfloat16 and float16 weights, and float64 weights
    that are float32 values), else as float64, so the same checkpoint loaded with --dtype float32 or float64
    has one fingerprint."""
    digest = fingerprint_digest(getattr(model, "config", None))
    for name, parameter in model.named_parameters():
        digest.update(parameter_label(name, parameter.shape))
        digest.update(_canonical_bytes(parameter.detach()))
    return fingerprint_of(digest)


def fingerprint_digest(config) -> hashlib._Hash:
    """model_fingerprint's running hash before the first parameter: the architecture's config values."""
    digest = hashlib.sha256()
    if config is not None:
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "n_embd", "n_layer")
        digest.update(json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True).encode())
    return digest


def parameter_label(name: str, shape) -> bytes:
    """What model_fingerprint hashes before a parameter's values: its name and shape."""
    return f"{name}:{tuple(shape)}".encode()


def fingerprint_of(digest) -> str:
    """The fingerprint a finished running hash gives: its first 32 hex digits."""
    return digest.hexdigest()[:32]


def _canonical_bytes(values: torch.Tensor) -> bytes:
    """The tensor's values as float32 bytes when float32 holds them exactly, else as float64 bytes (CPU)."""
    values = values.to("cpu").reshape(-1)
    if not values.is_floating_point():
        return values.numpy().tobytes()
    single = values.to(torch.float32)
    if values.dtype == torch.float64 and not torch.equal(single.to(torch.float64), values):
        return values.numpy().tobytes()
    return single.numpy().tobytes()
