"""Corpus reading: formats, fragment listing, bad rows (counted or strict), duplicate ids, tallies."""

import gzip
import hashlib
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from whence.corpus import (
    DUPLICATE_ID,
    BadRow,
    CorpusTally,
    Document,
    Fragment,
    find_duplicate_rows,
    id_hash,
    id_hashes,
    list_fragments,
    read_fragment,
)
from whence.errors import CorpusError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, records, row_group_size):
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def read_all(paths, **kwargs):
    return [row for f in list_fragments([str(p) for p in paths]) for row in read_fragment(f, **kwargs)]


def docs(n, prefix="d"):
    return [{"id": f"{prefix}{i}", "text": f"text number {i}"} for i in range(n)]


# One line per bad-row kind, after a good line 1 and a blank line 2 (blank lines are skipped, not bad).
BAD_LINES = [
    (b"\xff\xfe not utf-8", "invalid UTF-8"),
    (b'{"id": "a", "text": ', "invalid JSON: Expecting value"),
    (b"[1, 2]", "JSON is not an object"),
    (b'{"text": "no id"}', "missing field 'id'"),
    (b'{"id": "b"}', "missing field 'text'"),
    (b'{"id": "c", "text": 7}', "field 'text' is not a string"),
    (b'{"id": "c2", "text": null}', "field 'text' is not a string"),
    (b'{"id": "d", "text": "   \\n\\t "}', "field 'text' is empty"),
    (b'{"id": "e", "text": ""}', "field 'text' is empty"),
    (b'{"id": null, "text": "x"}', "field 'id' is null"),
    (b'{"id": 1.5, "text": "x"}', "field 'id' is not a string or integer"),
    (b'{"id": true, "text": "x"}', "field 'id' is not a string or integer"),
    (b'{"id": ["f"], "text": "x"}', "field 'id' is not a string or integer"),
]


@pytest.fixture
def messy_jsonl(tmp_path):
    lines = (
        [b'{"id": "good", "text": "hello"}', b"   "]
        + [raw for raw, _ in BAD_LINES]
        + [b'{"id": 42, "text": "int id"}']
    )
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline at the end: the last line still counts
    return path


def test_every_bad_row_kind_is_reported_and_counted(messy_jsonl):
    rows = read_all([messy_jsonl])
    bad = [r for r in rows if isinstance(r, BadRow)]
    assert [(r.line, r.reason) for r in bad] == [(i + 3, reason) for i, (_, reason) in enumerate(BAD_LINES)]
    good = [r for r in rows if isinstance(r, Document)]
    last_line = len(BAD_LINES) + 3
    assert good == [
        Document("good", "hello", str(messy_jsonl), 1),
        Document("42", "int id", str(messy_jsonl), last_line),  # integer ids become strings
    ]
    tally = CorpusTally()
    for row in rows:
        tally.add(row)
    assert tally.documents == 2
    assert tally.total_bad == len(BAD_LINES)
    assert tally.bad["field 'id' is not a string or integer"] == 3
    assert tally.bad["field 'text' is empty"] == 2


def test_strict_raises_at_first_bad_row_naming_file_and_line(messy_jsonl):
    rows = read_fragment(list_fragments([str(messy_jsonl)])[0], strict=True)
    assert next(rows).doc_id == "good"
    with pytest.raises(CorpusError, match=rf"^{messy_jsonl}:3: invalid UTF-8$"):
        next(rows)


def test_strict_parquet_error_names_row(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", docs(5) + [{"id": "x", "text": " "}], row_group_size=2)
    fragments = list_fragments([str(path)])
    with pytest.raises(CorpusError, match=rf"^{path}:6: field 'text' is empty$"):
        for fragment in fragments:
            list(read_fragment(fragment, strict=True))


def test_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"key": 1, "body": "one"}, {"id": "2", "text": "two"}])
    rows = read_all([path], id_field="key", text_field="body")
    assert rows[0] == Document("1", "one", str(path), 1)
    assert rows[1] == BadRow(str(path), 2, "missing field 'key'")


def test_gzip_matches_plain(tmp_path):
    records = docs(50)
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    packed = tmp_path / "a.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    from_plain, from_gzip = read_all([plain]), read_all([packed])
    assert [(d.doc_id, d.text, d.line) for d in from_gzip] == [(d.doc_id, d.text, d.line) for d in from_plain]
    assert len(from_gzip) == 50


def test_long_lines_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("whence.corpus._READ_CHUNK_BYTES", 7)  # lines span many chunks
    records = [{"id": str(i), "text": "é" * (i * 13 + 1)} for i in range(20)]
    path = tmp_path / "a.jsonl"
    path.write_text(
        "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n", encoding="utf-8"
    )
    rows = read_all([path])
    assert [(d.doc_id, d.text, d.line) for d in rows] == [
        (r["id"], r["text"], i + 1) for i, r in enumerate(records)
    ]


def test_parquet_row_groups_are_fragments_with_file_row_numbers(tmp_path):
    records = docs(10)
    records[7] = {"id": None, "text": "null id"}
    path = write_parquet(tmp_path / "p.parquet", records, row_group_size=3)
    fragments = list_fragments([str(path)])
    assert fragments == [Fragment(i, str(path), "parquet", i) for i in range(4)]
    rows = [row for f in fragments for row in read_fragment(f)]
    assert [r.line for r in rows] == list(range(1, 11))
    assert rows[7] == BadRow(str(path), 8, "field 'id' is null")
    assert rows[9] == Document("d9", "text number 9", str(path), 10)


def test_parquet_missing_columns(tmp_path):
    no_text = write_parquet(tmp_path / "a.parquet", [{"id": "a", "body": "x"}], row_group_size=10)
    neither = write_parquet(tmp_path / "b.parquet", [{"x": 1}, {"x": 2}], row_group_size=10)
    assert read_all([no_text]) == [BadRow(str(no_text), 1, "missing field 'text'")]
    assert read_all([neither]) == [BadRow(str(neither), i, "missing field 'id'") for i in (1, 2)]


def test_directory_is_walked_recursively_sorted_ignoring_other_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deeper").mkdir(parents=True)
    write_jsonl(root / "b" / "deeper" / "z.jsonl", docs(1, "z"))
    write_jsonl(root / "a.jsonl", docs(2, "a"))
    (root / "b" / "c.jsonl.gz").write_bytes(gzip.compress(b'{"id": "c0", "text": "c"}\n'))
    write_parquet(root / "b" / "p.parquet", docs(4, "p"), row_group_size=2)
    (root / "README.md").write_text("not a corpus file")
    (root / "b" / "data.json").write_text("{}")
    fragments = list_fragments([str(root)])
    assert [(f.index, f.path, f.row_group) for f in fragments] == [
        (0, str(root / "a.jsonl"), None),
        (1, str(root / "b" / "c.jsonl.gz"), None),
        (2, str(root / "b" / "deeper" / "z.jsonl"), None),
        (3, str(root / "b" / "p.parquet"), 0),
        (4, str(root / "b" / "p.parquet"), 1),
    ]
    ids = [d.doc_id for f in fragments for d in read_fragment(f)]
    assert ids == ["a0", "a1", "c0", "z0", "p0", "p1", "p2", "p3"]


def test_paths_keep_given_order_and_file_uris_work(tmp_path):
    first = write_jsonl(tmp_path / "z.jsonl", docs(1, "z"))
    second = write_jsonl(tmp_path / "a.jsonl", docs(1, "a"))
    fragments = list_fragments([str(first), f"file://{tmp_path}"])
    assert [f.path for f in fragments] == [str(first), f"file://{second}", f"file://{first}"]
    assert [d.doc_id for f in fragments for d in read_fragment(f)] == ["z0", "a0", "z0"]


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", docs(1))
    monkeypatch.chdir(tmp_path)
    assert list_fragments(["a.jsonl"])[0].path == str(tmp_path / "a.jsonl")


def test_listing_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(CorpusError, match=f"not found: {missing}"):
        list_fragments([str(missing)])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(CorpusError, match=f"no corpus files.*{empty}"):
        list_fragments([str(empty)])
    odd = tmp_path / "data.csv"
    odd.write_text("id,text\n")
    with pytest.raises(CorpusError, match=f"unsupported corpus file {odd}"):
        list_fragments([str(odd)])


def test_id_hash_is_stable_64_bit():
    assert id_hash("doc-1") == id_hash("doc-1") != id_hash("doc-2")
    assert 0 <= id_hash("x") < 2**64
    assert id_hashes(["a", "b"]).dtype == np.uint64
    # Fixed by the spec (blake2b, 8 bytes): never Python's per-process salted hash().
    expected = int.from_bytes(hashlib.blake2b(b"doc-1", digest_size=8).digest(), "little")
    assert id_hash("doc-1") == expected


def test_duplicates_across_fragments_keep_first_occurrence(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl", [{"id": "x", "text": "1"}, {"id": "y", "text": "2"}, {"id": "x", "text": "3"}]
    )
    write_jsonl(tmp_path / "b.jsonl", [{"id": "y", "text": "4"}, {"id": "z", "text": "5"}])
    write_parquet(tmp_path / "c.parquet", [{"id": 7, "text": "6"}, {"id": 7, "text": "7"}], row_group_size=1)
    write_jsonl(
        tmp_path / "d.jsonl", [{"id": "7", "text": "8"}, {"id": "z", "text": "9"}]
    )  # "7" is the int 7
    fragments = list_fragments([str(tmp_path)])
    reports = []
    for fragment in fragments:
        rows = [d for d in read_fragment(fragment) if isinstance(d, Document)]
        lines = np.array([d.line for d in rows], dtype=np.int64)
        reports.append((fragment.index, lines, id_hashes(d.doc_id for d in rows)))
    # c.parquet rows 1 and 2 are fragments 2 and 3; the line of a Parquet row counts within its file.
    expected = {(0, 3), (1, 1), (3, 2), (4, 1), (4, 2)}
    assert find_duplicate_rows(reports) == expected
    for seed in range(5):  # fragments finish in any order on parallel workers
        shuffled = list(reports)
        random.Random(seed).shuffle(shuffled)
        assert find_duplicate_rows(iter(shuffled)) == expected


def test_find_duplicate_rows_matches_brute_force():
    rng = np.random.default_rng(0)
    reports, corpus = [], []
    for fragment in range(6):
        lines = np.sort(rng.choice(1000, size=rng.integers(0, 40), replace=False)).astype(np.int64) + 1
        ids = [f"id{k}" for k in rng.integers(0, 60, size=lines.size)]
        reports.append((fragment, lines, id_hashes(ids)))
        corpus += [(fragment, int(line), i) for line, i in zip(lines, ids)]
    seen, expected = set(), set()
    for fragment, line, doc_id in sorted(corpus):
        if doc_id in seen:
            expected.add((fragment, line))
        seen.add(doc_id)
    assert find_duplicate_rows(reversed(reports)) == expected
    assert find_duplicate_rows([]) == set()


def test_find_duplicate_rows_rejects_mismatched_arrays():
    with pytest.raises(ValueError):
        find_duplicate_rows([(0, np.array([1, 2]), np.array([1], dtype=np.uint64))])


def test_tallies_merge_to_the_sum():
    a, b = CorpusTally(), CorpusTally()
    a.documents, b.documents = 3, 4
    a.add_bad("invalid UTF-8")
    a.add_bad("missing field 'id'", 2)
    b.add_bad("missing field 'id'")
    b.add_bad(DUPLICATE_ID)
    merged = a.merge(b)
    assert merged.as_dict() == {
        "documents": 7,
        "bad_rows": 5,
        "bad_by_reason": {"duplicate id": 1, "invalid UTF-8": 1, "missing field 'id'": 3},
    }
    assert merged.total_bad == 5
    assert (a.documents, a.total_bad) == (3, 3)  # inputs unchanged
    assert (a + b).as_dict() == (b + a).as_dict() == merged.as_dict()
    assert CorpusTally.from_dict(json.loads(json.dumps(merged.as_dict()))) == merged


def test_unreadable_file_raises_corpus_error(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": "a", "text": "b"}\n' * 100)[:40])  # truncated
    with pytest.raises(CorpusError, match=f"{path}: cannot read"):
        read_all([path])


# ---------------------------------------------------------------------------------------------------------------
# Byte-range fragments of one JSON-lines file


def rows_of(fragments, **kwargs):
    return [(type(r).__name__, r.path, r.line, getattr(r, "doc_id", None), getattr(r, "text", None),
             getattr(r, "reason", None)) for f in fragments for r in read_fragment(f, **kwargs)]


@pytest.fixture
def long_messy_jsonl(tmp_path):
    """Good rows of varied lengths, every bad-row kind, blank lines and CRLF, no newline at the end."""
    rng = random.Random(3)
    lines = []
    for i in range(120):
        lines.append(json.dumps({"id": f"d{i}", "text": "word " * rng.randint(1, 40)}).encode())
        if i % 9 == 0:
            lines.append(BAD_LINES[i % len(BAD_LINES)][0])
        if i % 13 == 0:
            lines.append(b"")
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"\r\n".join(lines[:60]) + b"\r\n" + b"\n".join(lines[60:]))
    return path


@pytest.mark.parametrize("fragment_bytes", [1, 64, 500, 3000])
def test_byte_range_fragments_give_exactly_the_whole_file(long_messy_jsonl, fragment_bytes):
    whole = [Fragment(0, str(long_messy_jsonl), "jsonl")]
    fragments = list_fragments([str(long_messy_jsonl)], fragment_bytes=fragment_bytes)
    size = long_messy_jsonl.stat().st_size
    assert len(fragments) > 1 and [f.index for f in fragments] == list(range(len(fragments)))
    data = long_messy_jsonl.read_bytes()
    for before, after in zip(fragments, fragments[1:]):
        assert before.end == after.start and data[after.start - 1 : after.start] == b"\n"  # cut at line starts
        assert after.first_line == data[: after.start].count(b"\n") + 1
    assert fragments[0].start == 0 and fragments[-1].end is None and fragments[-1].start < size
    assert rows_of(fragments) == rows_of(whole)


def test_small_files_and_gzip_stay_one_fragment(tmp_path, long_messy_jsonl):
    packed = tmp_path / "long.jsonl.gz"
    packed.write_bytes(gzip.compress(long_messy_jsonl.read_bytes()))
    assert list_fragments([str(packed)], fragment_bytes=64) == [Fragment(0, str(packed), "jsonl")]
    assert len(list_fragments([str(long_messy_jsonl)])) == 1  # far below FRAGMENT_BYTES


def test_strict_error_in_a_later_fragment_names_file_and_line(long_messy_jsonl):
    fragments = list_fragments([str(long_messy_jsonl)], fragment_bytes=200)
    expected = next(r for r in rows_of([Fragment(0, str(long_messy_jsonl), "jsonl")]) if r[0] == "BadRow"
                    and r[2] > fragments[3].first_line)
    late = [f for f in fragments if f.first_line <= expected[2]][-1]  # the fragment holding that line
    assert late.index > 0
    with pytest.raises(CorpusError, match=rf"{long_messy_jsonl}:{expected[2]}: {expected[5][:12]}"):
        list(read_fragment(late, strict=True))


def test_fragments_travel_to_reading_tasks_unchanged(long_messy_jsonl, tmp_path):
    from flows.corpus_pipeline import fragment_item, fragment_of

    parquet = write_parquet(tmp_path / "p.parquet", docs(10), row_group_size=4)
    fragments = list_fragments([str(long_messy_jsonl), str(parquet)], fragment_bytes=300)
    assert {f.format for f in fragments} == {"jsonl", "parquet"}
    assert [fragment_of(fragment_item(f)) for f in fragments] == fragments
