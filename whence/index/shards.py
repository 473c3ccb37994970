"""The index directory's files: each corpus fragment's shard, in one or more part files, and what the manifest
says about them.

An index directory (written by `whence index`, flows.index):
    run.json                  the build's arguments and status (flows.run_state)
    manifest.json             command, arguments, layers (name, d_out, d_in, k_out, k_in, rank, offset), projection
                              (kind, dim, seed), storage dtype, part size, shards (fragment -> its part files and
                              their row counts), model (path, fingerprint), factors (path, fingerprint, strategy),
                              fisher_sequences, sequences, summary, versions
    projections.safetensors   the projections (whence.index.projection)
    shards/shard-NNNNNN-PPPP.safetensors   part PPPP of fragment NNNNNN's shard, with a sha256 sidecar
                              (whence.checksums): at most the build's part size of rows each, in corpus order
    shards/shard-NNNNNN.json  the fragment's record, written once its last part is: its parts and row counts

A part holds the tensor GRADIENTS (N, width) in the storage dtype: row i is a sequence's compressed gradient
(every layer's block, whence.index.projection), and in its metadata the sequences' doc ids and chunks (JSON
arrays, row order), the fragment and part indices and the row count. A fragment is written part by part as it
is indexed, so an indexing actor holds one part's rows however large the fragment (one .jsonl.gz file is one
fragment). The directory may be on any pyarrow filesystem: each part is written atomically (whence.storage:
PART.partial and a rename locally, one upload on an object store), then its checksum, then (after the last part)
the record. A fragment is finished when its record is there and every part it names matches its checksum
(`finished_shards`); a fragment interrupted between parts keeps its verified leading parts (`finished_parts`),
and its indexing resumes after them. Indexes written before parts existed hold one shards/shard-NNNNNN.safetensors
per fragment and no records: they are read as one-part shards.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from whence.checksums import checksum_problem, remove_with_checksum, sidecar, write_checksum
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


DEFAULT_PART_BYTES = 256 << 20  # stored rows per part file unless --part-size says otherwise


def part_rows(width: int, storage_dtype: str, part_size: int | None = None) -> int:
    """Rows per part file: `part_size`, else as many rows of `width` values in `storage_dtype` as fit in
    DEFAULT_PART_BYTES (at least one)."""
    if part_size is not None:
        return part_size
    return max(1, DEFAULT_PART_BYTES // (width * STORAGE_DTYPES[storage_dtype].itemsize))


def part_path(index_dir: str | Path | Location, fragment: int, part: int) -> Location:
    return Location.of(index_dir) / SHARDS_DIR / f"shard-{fragment:06d}-{part:04d}.safetensors"


def record_path(index_dir: str | Path | Location, fragment: int) -> Location:
    return Location.of(index_dir) / SHARDS_DIR / f"shard-{fragment:06d}.json"


def legacy_shard_path(index_dir: str | Path | Location, fragment: int) -> Location:
    """Where an index written before parts existed holds fragment `fragment`'s whole shard."""
    return Location.of(index_dir) / SHARDS_DIR / f"shard-{fragment:06d}.safetensors"


def check_storable(fragment: int, rows: torch.Tensor, storage_dtype: str, where: str = "") -> None:
    """WhenceError naming the fragment (and `where` in it) unless every one of `rows`, already rounded to
    `storage_dtype`, is finite: float16 overflows above 65504. Checked a block of rows at a time: the mask of a
    whole shard would be half its float16 size."""
    if not all(bool(torch.isfinite(rows[start : start + 4096]).all()) for start in range(0, len(rows), 4096)):
        raise WhenceError(f"fragment {fragment}: compressed gradients overflow {storage_dtype}{where}; "
                          "build the index with --dtype bfloat16 or float32")


def write_part(index_dir: str | Path | Location, shard: Shard, part: int, storage_dtype: str) -> Location:
    """Write `shard`'s rows as part `part` of its fragment, in `storage_dtype`, atomically (whence.storage), then
    its checksum; a value the dtype cannot hold (float16 overflows above 65504) is a WhenceError naming the
    fragment."""
    from safetensors.torch import save_file

    stored = shard.gradients.to(STORAGE_DTYPES[storage_dtype]).contiguous()  # no copy when made in this dtype
    check_storable(shard.fragment, stored, storage_dtype)
    path = part_path(index_dir, shard.fragment, part)
    metadata = {"fragment": str(shard.fragment), "part": str(part), "sequences": str(shard.num_sequences),
                "doc_ids.json": json.dumps(list(shard.doc_ids)),
                "chunks.json": json.dumps([int(c) for c in shard.chunks])}
    checksum = path.write_through(lambda local: save_file({GRADIENTS: stored}, local, metadata=metadata))
    write_checksum(path, checksum)
    return path


def write_record(index_dir: str | Path | Location, fragment: int, parts: list[int]) -> Location:
    """Fragment `fragment`'s record, written once every part is: `parts` holds each part's row count in order."""
    path = record_path(index_dir, fragment)
    path.write_text(json.dumps({"fragment": fragment, "sequences": sum(parts),
                                "parts": [{"file": part_path(index_dir, fragment, i).name, "sequences": n}
                                          for i, n in enumerate(parts)]}))
    return path


def write_shard(index_dir: str | Path | Location, shard: Shard, storage_dtype: str) -> Location:
    """Write `shard` as its fragment's only part, then the fragment's record; returns the part's location."""
    path = write_part(index_dir, shard, 0, storage_dtype)
    write_record(index_dir, shard.fragment, [shard.num_sequences])
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


def part_sequences(path: str | Path | Location) -> int:
    """A part's row count, from its safetensors header's metadata (the tensor is not read)."""
    from whence.model import safetensors_header

    header, _ = safetensors_header(path)
    return int(header["__metadata__"]["sequences"])


def fragment_parts(index_dir: str | Path | Location, fragment: int) -> list[tuple[str, int]] | None:
    """(file name, rows) of each of a finished fragment's parts, from its record (or its legacy single shard);
    None when the fragment has neither."""
    record = record_path(index_dir, fragment)
    if record.is_file():
        try:
            parts = json.loads(record.read_text())["parts"]
            return [(str(p["file"]), int(p["sequences"])) for p in parts]
        except (ValueError, KeyError, TypeError) as error:
            log.warning("%s is damaged (%s); indexing fragment %d again", record, error, fragment)
            record.remove()
            return None
    legacy = legacy_shard_path(index_dir, fragment)
    if legacy.is_file():
        return [(legacy.name, part_sequences(legacy))]
    return None


def finished_shards(index_dir: str | Path | Location, fragments: list[int]) -> dict[int, list[tuple[str, int]]]:
    """The fragments whose record is in place and whose every part matches its checksum -> (file, rows) of their
    parts. A damaged part (or one without its checksum) is deleted with a warning, with the parts after it and
    the fragment's record, so the fragment is indexed again from that part on."""
    done = {}
    for fragment in fragments:
        parts = fragment_parts(index_dir, fragment)
        if parts is None:
            continue
        shards = Location.of(index_dir) / SHARDS_DIR
        problems = [(name, checksum_problem(shards / name)) for name, _ in parts]
        if all(problem is None for _, problem in problems):
            done[fragment] = parts
            continue
        first = next(i for i, (_, problem) in enumerate(problems) if problem is not None)
        log.warning("%s: %s; indexing fragment %d again from part %d", shards / parts[first][0],
                    problems[first][1], fragment, first)
        for name, _ in parts[first:]:  # the parts after a damaged one go too: finished_parts keeps a prefix
            remove_with_checksum(shards / name)
        record_path(index_dir, fragment).remove()
    return done


def finished_parts(index_dir: str | Path | Location, fragment: int) -> list[int]:
    """Row counts of an unfinished fragment's leading parts that match their checksums (parts 0, 1, ... up to
    the first missing or damaged one, which is deleted with those after it): indexing resumes after them."""
    kept, part = [], 0
    while (path := part_path(index_dir, fragment, part)).exists():
        problem = checksum_problem(path)
        if problem is not None:
            log.warning("%s: %s; indexing fragment %d again from part %d", path, problem, fragment, part)
            break
        kept.append(part_sequences(path))
        part += 1
    while (path := part_path(index_dir, fragment, part)).exists() or Location.of(sidecar(path)).exists():
        remove_with_checksum(path)
        part += 1
    return kept


@dataclass(frozen=True)
class IndexPart:
    """One part file of an index: its fragment, location and row count."""

    fragment: int
    path: Location
    sequences: int


def index_parts(index_dir: str | Path | Location, manifest: dict) -> list[IndexPart]:
    """Every part file the index's manifest names, fragment by fragment in order. A manifest written before
    parts existed lists the fragments only: each has one legacy shard file, its row count read from its header."""
    shards = Location.of(index_dir) / SHARDS_DIR
    recorded = manifest["shards"]
    if isinstance(recorded, list):  # legacy: [fragment, ...]
        return [IndexPart(int(f), path, part_sequences(path))
                for f in recorded for path in [legacy_shard_path(index_dir, int(f))]]
    return [IndexPart(int(fragment), shards / name, int(rows))
            for fragment, parts in sorted(recorded.items(), key=lambda item: int(item[0])) for name, rows in parts]
