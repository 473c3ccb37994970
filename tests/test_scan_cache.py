"""flows.scan_cache: a scan is computed once per corpus, tokenizer and seq_len, and recomputed when a file changes."""

import json
import os
import pickle

import numpy as np
import pytest

import flows.scan_cache as scan_cache
from flows.corpus_pipeline import ReadSettings, reduce_scans, scan_fragment
from tests.tiny import make_tokenizer
from whence.corpus import list_fragments

FEATURES = 1024


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tokenizer directory, a two-file corpus, the cache in tmp_path, and run_scan computed in process (counted)."""
    make_tokenizer(300).save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, first in (("a.jsonl", 0), ("b.jsonl", 50)):
        (corpus / name).write_text("".join(json.dumps({"id": f"d{i}", "text": f"the whale number {i} " * (i % 7 + 1)})
                                           + "\n" for i in range(first, first + 50)), encoding="utf-8")
    monkeypatch.setenv(scan_cache.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def run_scan(fragments, settings, tfidf_features=0):
        calls.append(tfidf_features)
        return [scan_fragment(f, settings, tfidf_features) for f in fragments]

    monkeypatch.setattr(scan_cache, "run_scan", run_scan)
    return corpus, ReadSettings(str(tmp_path / "tok"), 8), calls


def same(scans, others):
    """The same per-fragment facts and the same reduction (tally, duplicates, counts, merged frequencies)."""
    assert len(scans) == len(others)
    for a, b in zip(scans, others):
        assert a["fragment"] == b["fragment"] and a["tally"] == b["tally"] and a["tokens"] == b["tokens"]
        for key in ("lines", "hashes", "sequence_counts"):
            np.testing.assert_array_equal(a[key], b[key])
    (tally, skip, counts, frequencies), (tally2, skip2, counts2, frequencies2) = reduce_scans(scans), \
        reduce_scans(others)
    assert (tally, skip, counts) == (tally2, skip2, counts2)
    assert (frequencies is None) == (frequencies2 is None)
    if frequencies is not None:
        assert frequencies.num_documents == frequencies2.num_documents
        np.testing.assert_array_equal(frequencies.counts, frequencies2.counts)


def test_a_scan_is_reused_then_upgraded_with_frequencies(setup):
    corpus, settings, calls = setup
    fragments = list_fragments([str(corpus)])
    first, cached = scan_cache.cached_scan(fragments, settings)
    assert not cached and calls == [0]
    again, cached = scan_cache.cached_scan(fragments, settings)
    assert cached and calls == [0]
    same(again, first)
    # A run that needs document frequencies scans once more and leaves them in the cache for the next one.
    full, cached = scan_cache.cached_scan(fragments, settings, FEATURES)
    assert not cached and calls == [0, FEATURES]
    for tfidf in (FEATURES, 0):
        reused, cached = scan_cache.cached_scan(fragments, settings, tfidf)
        assert cached and calls == [0, FEATURES]
        same(reused, full)
    same(full, [scan_fragment(f, settings, FEATURES) for f in fragments])


def test_a_changed_file_seq_len_or_tokenizer_is_scanned_again(setup, tmp_path):
    corpus, settings, calls = setup
    fragments = list_fragments([str(corpus)])
    before, _ = scan_cache.cached_scan(fragments, settings)
    path = corpus / "b.jsonl"
    path.write_text(path.read_text() + json.dumps({"id": "new", "text": "one more whale"}) + "\n")
    after, cached = scan_cache.cached_scan(list_fragments([str(corpus)]), settings)
    assert not cached and after[1]["tally"].documents == before[1]["tally"].documents + 1
    # Same size, new modification time: still a new key.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not scan_cache.cached_scan(list_fragments([str(corpus)]), settings)[1]
    assert not scan_cache.cached_scan(fragments, ReadSettings(settings.tokenizer_path, 9))[1]
    make_tokenizer(250).save_pretrained(tmp_path / "tok")  # another tokenizer in the same directory
    assert not scan_cache.cached_scan(list_fragments([str(corpus)]), settings)[1]
    assert len(calls) == 5


def test_off_and_unreadable_entries_fall_back_to_scanning(setup, monkeypatch, tmp_path):
    corpus, settings, calls = setup
    fragments = list_fragments([str(corpus)])
    scan_cache.cached_scan(fragments, settings)
    entry = next((tmp_path / "cache" / scan_cache.SCANS_DIR).glob("*.pkl"))
    entry.write_bytes(b"not a pickle")
    scans, cached = scan_cache.cached_scan(fragments, settings)
    assert not cached and pickle.loads(entry.read_bytes())["scans"][0]["fragment"] == 0  # rewritten
    monkeypatch.setenv(scan_cache.CACHE_ENV, scan_cache.DISABLED)
    assert scan_cache.cache_dir() is None
    assert not scan_cache.cached_scan(fragments, settings)[1] and len(calls) == 3
