"""Content fingerprints of a scoring run's inputs, recorded in its run.json so that a resume notices an edit.

A run directory is resumed when its saved arguments equal this run's (flows.run_state.RunDirectory). Paths alone
do not say whether what they name is still the same: an edited queries file, factors refitted in place with
--overwrite, or a corpus file rewritten would otherwise let a resume mix old parts with new inputs. These
fingerprints go into the arguments beside the paths, so such a change makes the resume refuse, naming the key.

    queries  sha256 of the ids, prompts and completions, in order (the content, not the file's bytes: a
             reformatted file with the same queries resumes)
    factors  whence.factors' own fingerprint when it has one, else sha256 of manifest.json's bytes and every
             file's name, size and modification time in the directory (cheap: the factors are not re-read)
    corpus   sha256 of every corpus file's location, size and modification time, as the file system reports them
             (pyarrow FileInfo: also for object stores), without reading the files

Each is a hex digest: nothing of a path (or credentials in a URI) is readable from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from whence.storage import Location
from whence.text import Query

PARTIAL_SUFFIX = ".partial"


def _digest(body) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def queries_fingerprint(queries: Sequence[Query]) -> str:
    """sha256 of the queries' (id, prompt, completion), in order."""
    return _digest([[query.id, query.prompt, query.completion] for query in queries])


def factors_fingerprint(factors_dir: str | Path | Location) -> str:
    """A fingerprint of the factors directory (any pyarrow filesystem): whence.factors.factors_fingerprint when
    that module provides one, else manifest.json's bytes and the name, size and modification time of every other
    file in it."""
    from whence import factors

    provided = getattr(factors, "factors_fingerprint", None)
    if provided is not None:
        return str(provided(factors_dir))
    directory = Location.of(factors_dir)
    digest = hashlib.sha256()
    manifest = directory / "manifest.json"
    digest.update(manifest.read_bytes() if manifest.is_file() else b"")
    # In the order of the files' path components (as pathlib sorts paths), so the value is unchanged from when
    # this walked a local directory with pathlib.
    for relative, info in sorted(directory.files(), key=lambda item: item[0].split("/")):
        if not relative.endswith(PARTIAL_SUFFIX):
            digest.update(f"{relative}:{info.size}:{info.mtime_ns}\n".encode())
    return digest.hexdigest()


def corpus_fingerprint(locations: Iterable[str]) -> str:
    """sha256 of each corpus file's location, size and modification time (pyarrow's FileInfo; the files are not
    read). `locations`: the corpus files (fragments' paths; repeats are counted once)."""
    from whence.corpus import _resolve

    entries = []
    for location in dict.fromkeys(locations):
        filesystem, path = _resolve(location)
        info = filesystem.get_file_info(path)
        modified = info.mtime_ns if info.mtime is not None else None
        entries.append([location, info.size, modified])
    return _digest(entries)


def input_fingerprints(queries: Sequence[Query], factors_dir: str | Path, corpus_files: Iterable[str]) -> dict:
    """The run.json entries that pin a scoring run's inputs: queries_sha256, factors_fingerprint,
    corpus_fingerprint."""
    return {"queries_sha256": queries_fingerprint(queries), "factors_fingerprint": factors_fingerprint(factors_dir),
            "corpus_fingerprint": corpus_fingerprint(corpus_files)}
