"""sha256 sidecars beside the files a resumed run trusts (prepared queries, finished result parts, index shards).

A run that is interrupted, or a disk that loses a write, can leave a file that exists but is truncated or
altered. Each such file FILE gets FILE.sha256 (the hex digest of its bytes) written once FILE is complete; a
resume checks the file against it before reusing it. A file without its sidecar counts as unverified: the
sidecar is written after the file is in place, so a crash between the two only costs redoing that file.
Files are local paths or whence.storage Locations (any pyarrow filesystem).
"""

from __future__ import annotations

from pathlib import Path

from whence.storage import Location

SUFFIX = ".sha256"


def sidecar(path: str | Path | Location) -> Path | Location:
    """FILE.sha256 beside `path` (a Path for a path, a Location for a Location)."""
    if isinstance(path, Location):
        return path.with_name(path.name + SUFFIX)
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def write_checksum(path: str | Path | Location, checksum: str | None = None) -> Path | Location:
    """Write PATH.sha256 (atomically) for the complete file at `path` (`checksum`: its digest, when known)."""
    target = sidecar(path)
    Location.of(target).write_text((checksum or Location.of(path).sha256()) + "\n")
    return target


def checksum_problem(path: str | Path | Location) -> str | None:
    """None when `path` matches its sidecar; otherwise what is wrong (missing file, missing sidecar, mismatch)."""
    file = Location.of(path)
    if not file.is_file():
        return "missing"
    recorded = Location.of(sidecar(file))
    if not recorded.is_file():
        return f"no checksum ({recorded.name})"
    expected = recorded.read_text().strip()
    actual = file.sha256()
    if actual != expected:
        return f"checksum mismatch (sha256 {actual[:12]}..., {recorded.name} says {expected[:12]}...)"
    return None


def remove_with_checksum(path: str | Path | Location) -> None:
    """Delete a file and its sidecar (either may be missing)."""
    for target in (path, sidecar(path)):
        Location.of(target).remove()
