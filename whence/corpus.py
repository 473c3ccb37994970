"""Reading corpus files: JSON lines (optionally gzipped) and Parquet, local or in object storage, streamed.

The unit of parallel reading and of resuming is a `Fragment`: a byte range of an uncompressed JSON-lines file
(files over FRAGMENT_BYTES are split at line starts, so one large file is read by several tasks), a whole
gzipped JSON-lines file (gzip cannot be split: a gzip stream can only be decompressed from its start, so a
`.jsonl.gz` file is always one fragment; ship a large corpus as several shards or as Parquet), or one row group
of a Parquet file. `list_fragments` expands the user's paths into fragments numbered 0..n-1 in a deterministic
order (paths in the order given; directories walked recursively in sorted order; byte ranges and Parquet row
groups in file order). That order, then the line (or row) number within a file, is "corpus order"; a byte-range
fragment knows the line number it starts at (newlines counted before it when listing), so its rows, line
numbers and errors are exactly those of reading the whole file.

`read_fragment` streams one fragment and yields a `Document` per good row and a `BadRow` per malformed one (or
raises `CorpusError` at the first malformed row when `strict=True`). Nothing here loads a whole file in memory.

Duplicate ids are found after reading, across fragments read in parallel: each worker reports, per fragment,
its rows' line numbers and 64-bit id hashes (`id_hash`), and `find_duplicate_rows` names every row whose id
already occurred earlier in corpus order. Partial `CorpusTally` objects from workers sum with `merge`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from whence.errors import CorpusError

JSONL = "jsonl"
PARQUET = "parquet"
# Longest suffixes first: ".jsonl.gz" must win over a hypothetical ".gz" rule.
SUFFIX_FORMATS = ((".jsonl.gz", JSONL), (".jsonl", JSONL), (".parquet", PARQUET))

DUPLICATE_ID = "duplicate id"  # the tally reason for rows dropped by `find_duplicate_rows`

_READ_CHUNK_BYTES = 1 << 20  # bytes read from a JSON-lines stream at a time
# An uncompressed JSON-lines file is split into fragments of about this many bytes (each ends at a line end):
# a few seconds of tokenising each, small next to a task's start-up, many per file for parallel reads.
FRAGMENT_BYTES = 8 << 20
_PARQUET_BATCH_ROWS = 1024  # rows decoded from a Parquet row group at a time


@dataclass(frozen=True)
class CorpusSource:
    """What a run reads as its corpus: the user's paths, the fields that hold each row's id and text, and whether a
    malformed row stops the run (`strict`) or is skipped and counted. Travels together through fit, score and eval."""

    paths: tuple[str, ...]
    id_field: str = "id"
    text_field: str = "text"
    strict: bool = False

    def __post_init__(self):
        if isinstance(self.paths, str):  # one path given bare: a tuple of its characters would be nonsense
            object.__setattr__(self, "paths", (self.paths,))
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        if not self.paths:
            raise CorpusError("no corpus paths given")

    @classmethod
    def of(cls, corpus: CorpusSource | str | Sequence[str]) -> CorpusSource:
        """A CorpusSource from itself, one path, or a list of paths (the Python API accepts all three)."""
        return corpus if isinstance(corpus, CorpusSource) else cls(corpus)

    def to_arguments(self) -> dict:
        """The run-directory arguments that identify this corpus (the keys run.json has always used); credentials
        in a URI are redacted (whence.redact), as these are written to run.json, manifest.json and the report."""
        from whence.redact import redact_uri

        return {"corpus": [redact_uri(p) for p in self.paths], "id_field": self.id_field, "text_field": self.text_field,
                "strict": self.strict}


@dataclass(frozen=True)
class Fragment:
    """One unit of parallel reading: a whole JSON-lines file, or one row group of a Parquet file.

    `index` is the fragment's position in corpus order (0..n-1); `path` is an absolute local path or a URI;
    `format` is "jsonl" or "parquet"; `row_group` is the Parquet row group (None for JSON lines). A byte range
    of an uncompressed JSON-lines file: bytes [start, end) (end None: to the end of the file), its first line
    being line `first_line` of the file; start, end and first_line are aligned by `list_fragments`.
    """

    index: int
    path: str
    format: str
    row_group: int | None = None
    start: int = 0
    end: int | None = None
    first_line: int = 1


@dataclass(frozen=True)
class Document:
    """A good corpus row. `line` is the 1-based line number (JSON lines) or row number within the file (Parquet)."""

    doc_id: str
    text: str
    path: str
    line: int


@dataclass(frozen=True)
class BadRow:
    """A malformed corpus row, skipped and counted by default. `reason` is short and bounded (a tally key)."""

    path: str
    line: int
    reason: str


@dataclass
class CorpusTally:
    """Counts of documents read and of bad rows by reason; partial tallies from parallel workers `merge` by sum."""

    documents: int = 0
    bad: dict[str, int] = field(default_factory=dict)

    def add(self, row: Document | BadRow) -> None:
        """Count one row as `read_fragment` yields it."""
        if isinstance(row, BadRow):
            self.add_bad(row.reason)
        else:
            self.documents += 1

    def add_bad(self, reason: str, count: int = 1) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + count

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    def merge(self, other: CorpusTally) -> CorpusTally:
        """A new tally holding the sums of both; neither input changes."""
        merged = CorpusTally(self.documents + other.documents, dict(self.bad))
        for reason, count in other.bad.items():
            merged.add_bad(reason, count)
        return merged

    __add__ = merge

    def as_dict(self) -> dict:
        return {
            "documents": self.documents,
            "bad_rows": self.total_bad,
            "bad_by_reason": dict(sorted(self.bad.items())),
        }

    @classmethod
    def from_dict(cls, data: dict) -> CorpusTally:
        """Inverse of `as_dict` (for resuming from a saved tally)."""
        return cls(int(data["documents"]), {str(k): int(v) for k, v in data["bad_by_reason"].items()})


# ---------------------------------------------------------------------------------------------------------------
# Listing fragments


def corpus_format(path: str) -> str | None:
    """The format ("jsonl" or "parquet") a file name's suffix names, or None when it names none."""
    name = path.split("?", 1)[0].lower()
    for suffix, fmt in SUFFIX_FORMATS:
        if name.endswith(suffix):
            return fmt
    return None


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `path` and the path within it (URIs through pyarrow; other paths are local)."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorpusError(f"{path}: cannot open corpus location: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _normalise(path: str) -> str:
    """Local paths become absolute (Ray workers may run in another directory); URIs are kept as given."""
    return path if "://" in path else os.path.abspath(path)


def _child_location(root: str, root_fs_path: str, child_fs_path: str) -> str:
    """The user-facing location (URI or local path) of a file found under the directory `root`."""
    relative = child_fs_path[len(root_fs_path.rstrip("/")) :]
    base, sep, query = root.partition("?")
    return base.rstrip("/") + relative + sep + query


def _expand(path: str) -> list[str]:
    """The corpus files `path` names: itself, or the corpus files under it (recursively, sorted)."""
    fs, fs_path = _resolve(path)
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"corpus path not found: {path}")
    if info.type == pafs.FileType.File:
        if corpus_format(path) is None:
            raise CorpusError(f"unsupported corpus file {path}: expected .jsonl, .jsonl.gz or .parquet")
        return [_normalise(path)]
    infos = fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and corpus_format(i.path))
    if not found:
        raise CorpusError(f"no corpus files (.jsonl, .jsonl.gz, .parquet) in directory {path}")
    root = _normalise(path)
    return [_child_location(root, fs_path, child) for child in found]


@contextmanager
def _open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """The Parquet file at `path`, opened for random access: only its footer is read until rows are asked for."""
    fs, fs_path = _resolve(path)
    try:
        source = fs.open_input_file(fs_path)
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: cannot read Parquet file: {exc}") from exc
    with source:
        yield parquet


def file_stamp(path: str) -> tuple[int | None, int | None]:
    """(size in bytes, modification time in ns) of a corpus file, local or in object storage (None: not known)."""
    fs, fs_path = _resolve(path)
    info = fs.get_file_info(fs_path)
    return info.size, info.mtime_ns


def _gzipped(path: str) -> bool:
    return path.split("?", 1)[0].lower().endswith(".gz")


def line_ranges(path: str, fragment_bytes: int = FRAGMENT_BYTES) -> list[tuple[int, int | None, int]]:
    """(start, end, first_line) of the byte ranges an uncompressed JSON-lines file is read in: ranges of about
    `fragment_bytes` each ending just after a newline, found by one sequential read that counts newlines."""
    fs, fs_path = _resolve(path)
    size = fs.get_file_info(fs_path).size or 0
    if size <= fragment_bytes:
        return [(0, None, 1)]
    starts = [(0, 1)]  # (byte offset of a line start, its 1-based line number)
    target, offset, newlines = fragment_bytes, 0, 0
    try:
        with fs.open_input_stream(fs_path) as stream:
            while chunk := stream.read(_READ_CHUNK_BYTES):
                at = max(0, target - 1 - offset)  # a line starting at >= target follows a newline at >= target - 1
                while (found := chunk.find(b"\n", at)) >= 0:
                    boundary = offset + found + 1
                    if boundary >= size:
                        break
                    starts.append((boundary, newlines + chunk.count(b"\n", 0, found + 1) + 1))
                    target = boundary + fragment_bytes
                    at = max(found + 1, target - 1 - offset)
                newlines += chunk.count(b"\n")
                offset += len(chunk)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: cannot read file: {exc}") from exc
    ends = [start for start, _ in starts[1:]] + [None]
    return [(start, end, line) for (start, line), end in zip(starts, ends)]


def list_fragments(paths: Sequence[str], fragment_bytes: int = FRAGMENT_BYTES) -> list[Fragment]:
    """Fragments of the corpus named by `paths` (files, directories, URIs), numbered 0..n-1 in corpus order.

    One per `fragment_bytes` (or fewer) of an uncompressed JSON-lines file, one per gzipped JSON-lines file, one
    per Parquet row group (an empty Parquet file has none). Raises `CorpusError` for a missing path, a directory
    holding no corpus files, or an unsupported file suffix.
    """
    if isinstance(paths, str):
        paths = [paths]
    fragments: list[Fragment] = []
    for path in paths:
        for file in _expand(path):
            fmt = corpus_format(file)
            if fmt == JSONL:
                ranges = [(0, None, 1)] if _gzipped(file) else line_ranges(file, fragment_bytes)
                for start, end, first_line in ranges:
                    fragments.append(Fragment(len(fragments), file, JSONL, None, start, end, first_line))
                continue
            with _open_parquet(file) as parquet:
                num_row_groups = parquet.num_row_groups
            for row_group in range(num_row_groups):
                fragments.append(Fragment(len(fragments), file, PARQUET, row_group))
    return fragments


# ---------------------------------------------------------------------------------------------------------------
# Reading rows


def _validate(record: dict, id_field: str, text_field: str) -> tuple[str, str] | str:
    """(doc_id, text) for a good record, else the reason it is bad."""
    if id_field not in record:
        return f"missing field '{id_field}'"
    if text_field not in record:
        return f"missing field '{text_field}'"
    doc_id, text = record[id_field], record[text_field]
    if doc_id is None:
        return f"field '{id_field}' is null"
    # bool is a subclass of int, but `true` is not an id.
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return f"field '{id_field}' is not a string or integer"
    doc_id = str(doc_id)
    if not doc_id:
        return f"field '{id_field}' is empty"
    if not isinstance(text, str):
        return f"field '{text_field}' is not a string"
    if not text.strip():
        return f"field '{text_field}' is empty"
    return doc_id, text


def _parse_line(raw: bytes) -> dict | str:
    """The JSON object on one line, else the reason the line is bad."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg}"
    if not isinstance(record, dict):
        return "JSON is not an object"
    return record


def _stream_lines(fragment: Fragment) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the line ending) for every line of the fragment's byte range
    (the whole file when gzipped), read in bounded chunks."""
    path = fragment.path
    fs, fs_path = _resolve(path)
    compression = "gzip" if _gzipped(path) else None
    try:
        # An uncompressed file is opened for random access, so a byte range starts with a seek.
        opened = fs.open_input_stream(fs_path, compression="gzip") if compression else fs.open_input_file(fs_path)
        with opened as stream:
            if fragment.start and compression is None:
                stream.seek(fragment.start)
            left = None if fragment.end is None else fragment.end - fragment.start  # bytes still to read
            number, pieces = fragment.first_line - 1, []  # pieces: the unfinished line, as read so far
            while left != 0 and (chunk := stream.read(_READ_CHUNK_BYTES if left is None
                                                      else min(left, _READ_CHUNK_BYTES))):
                left = None if left is None else left - len(chunk)
                parts = chunk.split(b"\n")
                for part in parts[:-1]:
                    number += 1
                    yield number, (b"".join(pieces) + part).rstrip(b"\r")
                    pieces = []
                pieces.append(parts[-1])
            if any(pieces):  # a last line with no line ending
                yield number + 1, b"".join(pieces).rstrip(b"\r")
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise CorpusError(f"{path}: cannot read file: {exc}") from exc


def _jsonl_rows(fragment: Fragment, id_field: str, text_field: str) -> Iterator[Document | BadRow]:
    for number, raw in _stream_lines(fragment):
        if not raw.strip():
            continue  # blank lines are not rows
        record = _parse_line(raw)
        checked = record if isinstance(record, str) else _validate(record, id_field, text_field)
        if isinstance(checked, str):
            yield BadRow(fragment.path, number, checked)
        else:
            yield Document(checked[0], checked[1], fragment.path, number)


def _parquet_rows(fragment: Fragment, id_field: str, text_field: str) -> Iterator[Document | BadRow]:
    with _open_parquet(fragment.path) as parquet:
        meta, group = parquet.metadata, fragment.row_group
        # Row numbers count from the start of the file, across earlier row groups.
        first = sum(meta.row_group(g).num_rows for g in range(group))
        columns = [name for name in (id_field, text_field) if name in parquet.schema_arrow.names]
        if not columns:  # neither field exists: every row lacks the id
            for offset in range(meta.row_group(group).num_rows):
                yield BadRow(fragment.path, first + offset + 1, f"missing field '{id_field}'")
            return
        records = (
            r
            for b in parquet.iter_batches(_PARQUET_BATCH_ROWS, [group], columns, use_threads=False)
            for r in b.to_pylist()
        )
        for number, record in enumerate(records, start=first + 1):
            checked = _validate_parquet(record, id_field, text_field)
            if isinstance(checked, str):
                yield BadRow(fragment.path, number, checked)
            else:
                yield Document(checked[0], checked[1], fragment.path, number)


def _validate_parquet(record: dict, id_field: str, text_field: str) -> tuple[str, str] | str:
    """As `_validate`, decoding a binary text column as UTF-8 the way JSON lines are decoded."""
    text = record.get(text_field)
    if isinstance(text, bytes):
        try:
            record[text_field] = text.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid UTF-8"
    return _validate(record, id_field, text_field)


def read_fragment(
    fragment: Fragment, id_field: str = "id", text_field: str = "text", strict: bool = False
) -> Iterator[Document | BadRow]:
    """Stream a fragment's rows in order: a `Document` per good row, a `BadRow` per malformed one.

    Bad rows: invalid UTF-8, invalid JSON, JSON that is not an object, a missing id or text field, an id that is
    null, empty or neither a string nor an integer (integers become strings), text that is not a string or is
    empty or whitespace only. Blank JSON lines are skipped silently. With `strict=True`, the first bad row raises
    `CorpusError("{path}:{line}: {reason}")` instead. A file that cannot be read at all raises `CorpusError`.
    """
    if fragment.format == JSONL:
        rows = _jsonl_rows(fragment, id_field, text_field)
    elif fragment.format == PARQUET:
        rows = _parquet_rows(fragment, id_field, text_field)
    else:
        raise CorpusError(f"{fragment.path}: unsupported fragment format {fragment.format!r}")
    for row in rows:
        if strict and isinstance(row, BadRow):
            raise CorpusError(f"{row.path}:{row.line}: {row.reason}")
        yield row


# ---------------------------------------------------------------------------------------------------------------
# Duplicate ids


def id_hash(doc_id: str) -> int:
    """A 64-bit unsigned hash of a document id, stable across processes and runs (blake2b, 8-byte digest)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def id_hashes(doc_ids: Iterable[str]) -> np.ndarray:
    """`id_hash` of every id, as a uint64 array."""
    return np.fromiter((id_hash(d) for d in doc_ids), dtype=np.uint64)


def find_duplicate_rows(per_fragment: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> set[tuple[int, int]]:
    """(fragment_index, line) of every row whose id already occurred earlier in corpus order.

    `per_fragment` holds, for every fragment, (fragment_index, lines int64 (n,), id hashes uint64 (n,)), the
    lines and `id_hash`es of its good rows, in any order. The first occurrence of each id (smallest fragment
    index, then smallest line) is kept; every later one is returned, whatever order fragments were read in.

    Method: each row's corpus position is packed into one uint64, (fragment_index << 32) | line, and rows are
    sorted by (id hash, position); a row whose hash equals its predecessor's is a repeat. Memory: 16 bytes per
    document (hash and position) plus an 8-byte sort index, so about 24 bytes per document. Ids are compared by
    64-bit hash: two distinct ids collide with probability about n^2 / 2^65 (n = 10^8 documents: ~3e-4).
    """
    positions, hashes = [], []
    for fragment_index, lines, line_hashes in per_fragment:
        lines = np.asarray(lines, dtype=np.int64)
        line_hashes = np.asarray(line_hashes, dtype=np.uint64)
        if lines.shape != line_hashes.shape or lines.ndim != 1:
            raise ValueError(
                f"fragment {fragment_index}: lines {lines.shape} and hashes {line_hashes.shape} differ"
            )
        if not 0 <= fragment_index < 2**31 or (lines.size and not (lines.min() >= 0 and lines.max() < 2**32)):
            raise ValueError(f"fragment {fragment_index}: index or line numbers out of range")
        positions.append((np.uint64(fragment_index) << np.uint64(32)) | lines.astype(np.uint64))
        hashes.append(line_hashes)
    if not positions:
        return set()
    position, digest = np.concatenate(positions), np.concatenate(hashes)
    del positions, hashes
    order = np.lexsort((position, digest))  # by hash, then corpus position
    sorted_hash = digest[order]
    repeat = np.zeros(order.size, dtype=bool)
    repeat[1:] = sorted_hash[1:] == sorted_hash[:-1]
    repeated = position[order[repeat]]
    fragments = (repeated >> np.uint64(32)).astype(np.int64)
    lines = (repeated & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return set(zip(fragments.tolist(), lines.tolist()))
