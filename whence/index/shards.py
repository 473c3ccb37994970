"""The index directory's files: one shard per corpus fragment, and what the manifest says about them.

An index directory (written by `whence index`, flows.index):
    run.json                  the build's arguments and status (flows.run_state)
    manifest.json             command, arguments, layers (name, d_out, d_in, k_out, k_in, rank, offset), projection
                              (kind, dim, seed), storage dtype, model (path, fingerprint), factors (path,
                              fingerprint, strategy), fisher_sequences, sequences, summary, versions
    projections.safetensors   the projections (whence.index.projection)
    shards/shard-NNNNNN.safetensors   one per corpus fragment NNNNNN, with a sha256 sidecar (whence.checksums)

A shard holds the tensor GRADIENTS (N, width) in the storage dtype: row i is sequence i's compressed gradient
(every layer's block, whence.index.projection), and in its metadata the sequences' doc ids and chunks (JSON
arrays, row order), the fragment index and the row count. The directory may be on any pyarrow filesystem: a
shard is written atomically (whence.storage: SHARD.partial and a rename locally, one upload on an object
store), then its checksum; a resumed build keeps a shard only if it matches its checksum (`finished_shards`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from whence.checksums import checksum_problem, remove_with_checksum, write_checksum
from whence.errors import WhenceError
from whence.storage import Location

log = logging.getLogger("whence.index")

SHARDS_DIR = "shards"
GRADIENTS = "gradients"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_STORAGE_DTYPE = "float16"


@dataclass
class Shard:
    """One fragment's compressed gradients: rows (N, width) and the sequences' keys."""

    fragment: int
    gradients: torch.Tensor  # (N, width)
    doc_ids: list[str]
    chunks: np.ndarray  # (N,) int64

    @property
    def num_sequences(self) -> int:
        return len(self.doc_ids)


def shard_path(index_dir: str | Path | Location, fragment: int) -> Location:
    return Location.of(index_dir) / SHARDS_DIR / f"shard-{fragment:06d}.safetensors"


def check_storable(fragment: int, rows: torch.Tensor, storage_dtype: str, where: str = "") -> None:
    """WhenceError naming the fragment (and `where` in it) unless every one of `rows`, already rounded to
    `storage_dtype`, is finite: float16 overflows above 65504. Checked a block of rows at a time: the mask of a
    whole shard would be half its float16 size."""
    if not all(bool(torch.isfinite(rows[start : start + 4096]).all()) for start in range(0, len(rows), 4096)):
        raise WhenceError(f"fragment {fragment}: compressed gradients overflow {storage_dtype}{where}; "
                          "build the index with --dtype bfloat16 or float32")


def write_shard(index_dir: str | Path | Location, shard: Shard, storage_dtype: str) -> Location:
    """Write `shard` in `storage_dtype` atomically (whence.storage), then its checksum; a value the dtype cannot
    hold (float16 overflows above 65504) is a WhenceError naming the fragment."""
    from safetensors.torch import save_file

    stored = shard.gradients.to(STORAGE_DTYPES[storage_dtype]).contiguous()  # no copy when made in this dtype
    check_storable(shard.fragment, stored, storage_dtype)
    path = shard_path(index_dir, shard.fragment)
    metadata = {"fragment": str(shard.fragment), "sequences": str(shard.num_sequences),
                "doc_ids.json": json.dumps(list(shard.doc_ids)),
                "chunks.json": json.dumps([int(c) for c in shard.chunks])}
    checksum = path.write_through(lambda local: save_file({GRADIENTS: stored}, local, metadata=metadata))
    write_checksum(path, checksum)
    return path


def read_shard(path: str | Path | Location) -> Shard:
    """The shard at `path`; a WhenceError naming the file when it is unreadable."""
    from safetensors import SafetensorError, safe_open

    path = Location.of(path)
    try:
        with path.local_copy() as local, safe_open(str(local), framework="pt") as handle:
            metadata = handle.metadata()
            gradients = handle.get_tensor(GRADIENTS)
    except (SafetensorError, OSError) as error:
        raise WhenceError(f"{path} is damaged ({error}); rerun `whence index` with the same arguments") from error
    return Shard(int(metadata["fragment"]), gradients, json.loads(metadata["doc_ids.json"]),
                 np.asarray(json.loads(metadata["chunks.json"]), dtype=np.int64))


def shard_sequences(path: str | Path | Location) -> int:
    """A shard's row count, from its safetensors header's metadata (the tensor is not read)."""
    from whence.model import safetensors_header

    header, _ = safetensors_header(path)
    return int(header["__metadata__"]["sequences"])


def finished_shards(index_dir: str | Path | Location, fragments: list[int]) -> dict[int, Location]:
    """The fragments whose shard is in place and matches its checksum. A damaged shard (or one without its
    checksum: the build stopped between the two) is deleted with a warning, so its fragment is indexed again."""
    done = {}
    for fragment in fragments:
        path = shard_path(index_dir, fragment)
        if not path.exists():
            continue
        problem = checksum_problem(path)
        if problem is None:
            done[fragment] = path
            continue
        log.warning("%s: %s; indexing fragment %d again", path, problem, fragment)
        remove_with_checksum(path)
    return done


def shard_fragments(index_dir: str | Path | Location) -> list[int]:
    """The fragments whose shard file is in the index directory, in order."""
    names = [child.name for child in (Location.of(index_dir) / SHARDS_DIR).children()]
    return sorted(int(name[len("shard-"):-len(".safetensors")]) for name in names
                  if name.startswith("shard-") and name.endswith(".safetensors"))
