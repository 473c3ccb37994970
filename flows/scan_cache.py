"""The corpus scan, cached: `whence fit` and `whence score` runs on the same corpus read it once.

A scan (flows.corpus_pipeline.run_scan) yields, per fragment, the bad-row tally, id hashes, sequence counts and
(for TF-IDF) document frequencies: facts of the corpus files, the tokenizer and seq_len only, not of the queries
or the factors. They are written once to

    $WHENCE_CACHE/scans/<key>.pkl          (WHENCE_CACHE defaults to ~/.cache/whence; "off" disables the cache)

under a key hashing: every corpus file's location, size and modification time (a changed file is a new key),
the fragments, the tokenizer (a hash of its files, or of its serialised form when it is not a local directory),
seq_len, the id and text fields and --strict. A scan without document frequencies (what fit needs) is upgraded
in place by the first run that needs them. The fragments' document frequencies are stored merged (F int64
counters once, not once per fragment): a reused scan carries them on its first fragment, which gives the same
flows.corpus_pipeline.reduce_scans result. With frequencies, a scan also keeps its sequences' hashed term rows
(up to flows.corpus_pipeline.MAX_CACHED_TERM_ENTRIES for the corpus), so a later run with new queries selects
its TF-IDF candidates from the cache without reading the corpus. Entries are written atomically (a temporary file renamed), so
concurrent runs at worst both compute the same scan. Nothing is ever read from an entry of another key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

from flows.corpus_pipeline import ReadSettings, run_scan
from whence.corpus import Fragment

log = logging.getLogger("whence.scan_cache")

CACHE_ENV = "WHENCE_CACHE"
DISABLED = "off"
SCANS_DIR = "scans"
FORMAT_VERSION = 1  # bump when a scan's contents change meaning
# Files of a local tokenizer directory that define its behaviour (the weights are not part of the key).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")


def cache_dir() -> Path | None:
    """Where scans are kept, or None when the cache is off (WHENCE_CACHE=off)."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "whence")
    return None if root == DISABLED else Path(root) / SCANS_DIR


def tokenizer_digest(path: str) -> str:
    """sha256 of the tokenizer's files (a local directory), else of the loaded tokenizer's serialised form."""
    digest = hashlib.sha256()
    directory = Path(path)
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if files:
        for file in files:
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
        return digest.hexdigest()
    from flows.corpus_pipeline import load_tokenizer

    tokenizer = load_tokenizer(path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(type(tokenizer).__name__.encode())
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    return digest.hexdigest()


def _file_stamps(fragments: list[Fragment]) -> list[list]:
    """[location, size, modification time in ns] of every file the fragments read, in corpus order."""
    from whence.corpus import file_stamp

    paths = list(dict.fromkeys(fragment.path for fragment in fragments))  # each file once, in order
    return [[path, *file_stamp(path)] for path in paths]


def scan_key(fragments: list[Fragment], settings: ReadSettings) -> str:
    """The cache key of scanning `fragments` with `settings` (module docstring)."""
    body = {"version": FORMAT_VERSION, "files": _file_stamps(fragments),
            "fragments": [[f.path, f.format, f.row_group, f.start, f.end, f.first_line] for f in fragments],
            "tokenizer": tokenizer_digest(settings.tokenizer_path), "seq_len": settings.seq_len,
            "id_field": settings.id_field, "text_field": settings.text_field, "strict": settings.strict}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _entry(scans: list[dict]) -> dict:
    """What is stored: the scans without their frequencies, and those frequencies merged (None if any lacks them)."""
    parts = [s["frequencies"] for s in scans]
    merged = None
    if parts and all(p is not None for p in parts):
        merged = parts[0]
        for part in parts[1:]:
            merged = merged + part
    return {"scans": [{**s, "frequencies": None} for s in scans], "frequencies": merged}


def _scans(entry: dict, fragments: list[Fragment], tfidf_features: int) -> list[dict] | None:
    """The stored scans, the merged frequencies on the first fragment; None when they do not answer the call."""
    scans, frequencies = entry["scans"], entry["frequencies"]
    if [s["fragment"] for s in scans] != [f.index for f in fragments] or not scans:
        return None
    if tfidf_features and (frequencies is None or frequencies.n_features != tfidf_features):
        return None
    return [{**scans[0], "frequencies": frequencies}] + scans[1:]


def cached_scan(fragments: list[Fragment], settings: ReadSettings, tfidf_features: int = 0
                ) -> tuple[list[dict], bool]:
    """(run_scan's per-fragment results, whether they came from the cache): read from the cache when an entry of
    this corpus, tokenizer and seq_len holds what is asked for, else scanned with Ray and written there."""
    directory = cache_dir()
    if directory is None:
        return run_scan(fragments, settings, tfidf_features), False
    path = directory / f"{scan_key(fragments, settings)}.pkl"
    if path.is_file():
        try:
            scans = _scans(pickle.loads(path.read_bytes()), fragments, tfidf_features)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError) as error:
            log.warning("ignoring an unreadable cached scan %s (%s)", path, error)
        else:
            if scans is not None:
                log.info("corpus scan: reusing the cached scan %s", path)
                return scans, True
    scans = run_scan(fragments, settings, tfidf_features)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(pickle.dumps(_entry(scans), protocol=pickle.HIGHEST_PROTOCOL))
        partial.replace(path)
    except OSError as error:  # a read-only or full cache costs the next run a scan, never this run's results
        log.warning("could not cache the corpus scan in %s (%s)", directory, error)
    return scans, False
