"""sha256 sidecars beside the files a resumed run trusts (prepared queries, finished result parts).

A run that is interrupted, or a disk that loses a write, can leave a file that exists but is truncated or
altered. Each such file FILE gets FILE.sha256 (the hex digest of its bytes) written once FILE is complete; a
resume checks the file against it before reusing it. A file without its sidecar counts as unverified: the
sidecar is written after the file is in place, so a crash between the two only costs redoing that file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIX = ".sha256"
CHUNK_BYTES = 1 << 20


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path: str | Path) -> Path:
    """Write PATH.sha256 (atomically) for the complete file at `path`."""
    target = sidecar(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(file_sha256(path) + "\n")
    partial.replace(target)
    return target


def checksum_problem(path: str | Path) -> str | None:
    """None when `path` matches its sidecar; otherwise what is wrong (missing file, missing sidecar, mismatch)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    recorded = sidecar(path)
    if not recorded.is_file():
        return f"no checksum ({recorded.name})"
    expected = recorded.read_text().strip()
    actual = file_sha256(path)
    if actual != expected:
        return f"checksum mismatch (sha256 {actual[:12]}..., {recorded.name} says {expected[:12]}...)"
    return None


def remove_with_checksum(path: str | Path) -> None:
    """Delete a file and its sidecar (either may be missing)."""
    for target in (Path(path), sidecar(path)):
        target.unlink(missing_ok=True)
