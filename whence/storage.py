"""Where outputs live: a file or directory on any pyarrow filesystem (a local path, file://, s3://, gs://, hdfs://).

A Location is a (filesystem, path) pair. It pickles (pyarrow's filesystems do, with their options), so an actor on
another node writes straight into the output directory: factors, index shards and run state never pass through
the driver on their way to an object store.

    Location.of("runs/factors")                                       a local directory (made absolute)
    Location.of("s3://bucket/factors?region=eu-west-1")               an S3 prefix (options as pyarrow reads them)
    location / "layers" / "m.0.basis.safetensors"                     a file below it

Writes are atomic. On a local disk a file is written as NAME.partial and renamed into place (a rename is atomic
there). On an object store an object appears whole when its upload completes, and a "rename" is a copy and a
delete, so files are written in place. Either way a reader sees the whole file or none of it.

`str(location)` is what messages and manifests show: the local path, or the URI as given with its credentials
redacted (whence.redact).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from whence.errors import StorageError
from whence.redact import redact_uri

PARTIAL_SUFFIX = ".partial"
CHUNK_BYTES = 1 << 22  # bytes read at a time when hashing or copying: a 2 GB file never sits in memory


def is_uri(target: str | os.PathLike) -> bool:
    """A URI (scheme://...) rather than a local path."""
    return "://" in str(target)


class Location:
    """A file or directory on a pyarrow filesystem; see the module docstring."""

    __slots__ = ("filesystem", "path", "uri")

    def __init__(self, filesystem: pafs.FileSystem, path: str, uri: str):
        self.filesystem = filesystem  # pafs.FileSystem
        self.path = path  # the path within `filesystem` ("bucket/key/..." on S3; absolute on a local disk)
        self.uri = uri  # the user's spelling (URI with its options, or a local path), joined with relative parts

    @classmethod
    def of(cls, target: str | os.PathLike | Location) -> Location:
        if isinstance(target, Location):
            return target
        target = str(target)
        if is_uri(target):
            try:
                filesystem, path = pafs.FileSystem.from_uri(target)
            except (OSError, ValueError) as error:  # pyarrow: unknown scheme, bad options (ArrowInvalid)
                raise StorageError(f"{redact_uri(target)}: not a location pyarrow can open ({error})") from None
            if isinstance(filesystem, pafs.LocalFileSystem):  # file:///abs/path: a local path after all
                return cls(filesystem, path, path)
            return cls(filesystem, path.rstrip("/"), target)
        path = os.path.abspath(os.path.expanduser(target))
        return cls(pafs.LocalFileSystem(), path, path)

    def __reduce__(self):
        return (Location, (self.filesystem, self.path, self.uri))

    # -- naming --------------------------------------------------------------------------------------------

    def __truediv__(self, relative: str) -> Location:
        relative = str(relative).strip("/")
        if self.is_local:
            path = os.path.join(self.path, relative)
            return Location(self.filesystem, path, path)
        base, _, query = self.uri.partition("?")
        uri = f"{base.rstrip('/')}/{relative}" + (f"?{query}" if query else "")
        return Location(self.filesystem, f"{self.path}/{relative}", uri)

    def __str__(self) -> str:
        return redact_uri(self.uri)

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and (self.filesystem.type_name, self.path) == (
            other.filesystem.type_name, other.path)

    def __hash__(self) -> int:
        return hash((self.filesystem.type_name, self.path))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def with_name(self, name: str) -> Location:
        """The sibling called `name`."""
        if self.is_local:
            path = os.path.join(os.path.dirname(self.path), name)
            return Location(self.filesystem, path, path)
        base, _, query = self.uri.partition("?")
        uri = base.rstrip("/").rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
        return Location(self.filesystem, self.path.rsplit("/", 1)[0] + f"/{name}", uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def local(self) -> Path:
        """The local path (only for a local Location)."""
        if not self.is_local:
            raise ValueError(f"{self} is not on the local disk")
        return Path(self.path)

    # -- what is there -------------------------------------------------------------------------------------

    @contextmanager
    def errors_named(self, action: str) -> Iterator[None]:
        """Filesystem errors (an unreachable store, a missing bucket, no permission) as StorageError naming this
        location and what was being done."""
        try:
            yield
        except StorageError:
            raise
        except OSError as error:
            raise StorageError(f"{self}: cannot {action} ({redact_uri(str(error))})") from error

    def info(self) -> pafs.FileInfo:
        with self.errors_named("look it up"):
            return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A directory, or on an object store a prefix with objects below it."""
        return self.info().type == pafs.FileType.Directory

    def children(self) -> list[Location]:
        """What is directly inside this directory, sorted by name ([] when it does not exist)."""
        if not self.is_dir():
            return []
        with self.errors_named("list it"):
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return [self / info.base_name for info in sorted(infos, key=lambda info: info.base_name)]

    def files(self) -> Iterator[tuple[str, pafs.FileInfo]]:
        """(path relative to this directory, FileInfo) of every file below it, sorted by path."""
        if not self.is_dir():
            return iter(())
        with self.errors_named("list it"):
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True))
        prefix = self.path.rstrip("/") + "/"
        found = [(info.path[len(prefix):], info) for info in infos if info.type == pafs.FileType.File]
        return iter(sorted(found, key=lambda item: item[0]))

    # -- reading -------------------------------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        with self.errors_named("read it"), self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def sha256(self) -> str:
        """The hex SHA-256 of the file's bytes, read a chunk at a time."""
        digest = hashlib.sha256()
        with self.errors_named("read it"), self.filesystem.open_input_stream(self.path) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """A local path holding the file: the file itself on a local disk, else a temporary download (deleted
        afterwards), for readers that want a path (safetensors maps local files instead of reading them)."""
        if self.is_local:
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="whence-") as scratch:
            copy = Path(scratch) / self.name
            with self.errors_named("read it"), self.filesystem.open_input_stream(self.path) as stream, \
                    open(copy, "wb") as handle:
                while chunk := stream.read(CHUNK_BYTES):
                    handle.write(chunk)
            yield copy

    # -- writing -------------------------------------------------------------------------------------------

    def mkdir(self) -> None:
        with self.errors_named("create it"):
            self.filesystem.create_dir(self.path, recursive=True)

    def write_bytes(self, data: bytes) -> None:
        """Replace the file with `data`, atomically (see the module docstring)."""
        with self.errors_named("write it"):
            self._parent_dir()
            if self.is_local:
                partial = self.path + PARTIAL_SUFFIX
                with open(partial, "wb") as handle:
                    handle.write(data)
                os.replace(partial, self.path)
                return
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_through(self, write: Callable[[str], None]) -> str:
        """Place the file that `write(local_path)` writes, atomically; returns its hex SHA-256.

        Locally `write` writes NAME.partial, which is hashed and renamed into place; elsewhere it writes a
        temporary local file, which is hashed and uploaded a chunk at a time."""
        if self.is_local:
            with self.errors_named("write it"):
                self._parent_dir()
            partial = self.path + PARTIAL_SUFFIX
            write(partial)
            checksum = Location.of(partial).sha256()
            with self.errors_named("write it"):
                os.replace(partial, self.path)
            return checksum
        with tempfile.TemporaryDirectory(prefix="whence-") as scratch:
            local = Location.of(os.path.join(scratch, self.name))
            write(local.path)
            checksum = local.sha256()
            with self.errors_named("upload it"), open(local.path, "rb") as handle, \
                    self.filesystem.open_output_stream(self.path) as stream:
                while chunk := handle.read(CHUNK_BYTES):
                    stream.write(chunk)
        return checksum

    def remove(self) -> None:
        """Delete the file, or the directory and everything below it (nothing when it does not exist)."""
        info = self.info()
        with self.errors_named("delete it"):
            if info.type == pafs.FileType.Directory:
                self.filesystem.delete_dir(self.path)
            elif info.type == pafs.FileType.File:
                self.filesystem.delete_file(self.path)

    def _parent_dir(self) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # object stores have no directories: a key's prefixes exist once it does
