"""A model's safetensors checkpoint, read tensor by tensor: where each stored tensor lies (one model.safetensors,
or the shards a model.safetensors.index.json names), read a chunk at a time into one reused buffer.

whence.skeleton loads only some modules' weights from it (a pipeline stage's) and hashes every weight without
holding the model. Tensors are read with plain reads, never memory-mapped: a mapped file's touched pages count as
the process's resident memory, so mapping the file would cost what reading only a part saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from whence.errors import ModelError
from whence.model import CHECK_CHUNK_BYTES, read_chunks, safetensors_header

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
# safetensors dtype names -> torch dtypes (the ones a causal LM's checkpoint holds).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a .safetensors file: its dtype and shape as stored, and where its bytes are."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte, from the start of the file
    size: int  # bytes


class Checkpoint:
    """The tensors of a safetensors checkpoint by their stored names, read `CHECK_CHUNK_BYTES` at a time."""

    def __init__(self, tensors: dict[str, StoredTensor]):
        self.tensors = tensors
        self._buffer: bytearray | None = None  # allocated at the first read, reused by every read after it

    @classmethod
    def find(cls, path_or_id: str) -> Checkpoint | None:
        """The safetensors checkpoint of a local model directory or of a hub id (from the hub's cache, or
        downloaded as from_pretrained would), or None when the model has no safetensors weights (.bin, GGUF)."""
        from transformers.utils import cached_file

        def resolve(name: str) -> Path | None:
            found = cached_file(path_or_id, name, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
            return Path(found) if found else None

        single = resolve(SAFE_WEIGHTS)
        if single is not None:
            return cls.of_files([single])
        index = resolve(SAFE_WEIGHTS_INDEX)
        if index is None:
            return None
        import json

        shards = [resolve(name) for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        return None if any(shard is None for shard in shards) else cls.of_files(shards)

    @classmethod
    def of_files(cls, files: list[Path]) -> Checkpoint | None:
        """The tensors the headers of `files` list (None if one holds a dtype SAFETENSORS_DTYPES lacks)."""
        tensors = {}
        for file in files:
            header, data_start = safetensors_header(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    return None
                start, stop = entry["data_offsets"]
                tensors[name] = StoredTensor(file, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                             data_start + start, stop - start)
        return cls(tensors)

    def chunks(self, name: str):
        """The stored values of tensor `name`, flattened, as consecutive 1-D tensors of its stored dtype. Each one
        shares this checkpoint's read buffer: use it before taking the next."""
        stored = self.tensors[name]
        if self._buffer is None:
            self._buffer = bytearray(CHECK_CHUNK_BYTES)
        with open(stored.file, "rb", buffering=0) as handle:
            yield from read_chunks(handle, stored.offset, stored.size, stored.dtype, self._buffer)

    def read_into(self, name: str, destination: torch.Tensor) -> None:
        """Fill `destination` (contiguous, on the CPU, of the stored shape) with tensor `name`, cast to its dtype
        as `Tensor.to` casts."""
        stored = self.tensors[name]
        if tuple(destination.shape) != stored.shape:
            raise ModelError(f"{stored.file}: {name} is stored with shape {stored.shape}, the model's is "
                             f"{tuple(destination.shape)}")
        flat = destination.detach().view(-1)  # (numel,)
        start = 0
        for piece in self.chunks(name):
            flat[start : start + piece.numel()].copy_(piece)
            start += piece.numel()
