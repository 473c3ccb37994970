"""TF-IDF filter: BM25 against a brute-force loop, mergeable frequencies and candidate selection."""

import math
import random

import numpy as np
import pytest
import scipy.sparse as sp

from whence.tfidf import CandidateSelector, DocumentFrequencies, TermHasher, bm25_scores

SCORE_TOL = 1e-12

WORDS = "the cat sat on a mat dog ran far away model data token loss gradient influence query".split()


def random_texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_hasher_is_binary_and_lowercased():
    hasher = TermHasher(n_features=2**12)
    rows = hasher.transform(["Cat cat CAT dog", "dog", ""])
    assert isinstance(rows, sp.csr_matrix) and rows.shape == (3, 2**12)
    assert set(rows.data.tolist()) == {1.0}
    assert rows[0].nnz == 2 and rows[2].nnz == 0
    assert (rows[0].multiply(rows[1])).nnz == 1  # "dog" shared, "cat" and "CAT" one term


def test_document_frequencies_count_and_idf():
    hasher = TermHasher(n_features=2**12)
    texts = ["cat dog", "cat", "mat cat", "dog dog dog"]
    df = DocumentFrequencies.zeros(2**12)
    df.update(hasher.transform(texts))
    assert df.num_documents == 4
    column = {w: hasher.transform([w]).indices[0] for w in ("cat", "dog", "mat", "unseen")}
    assert [df.counts[column[w]] for w in ("cat", "dog", "mat", "unseen")] == [3, 2, 1, 0]
    idf = df.idf()
    for word, count in (("cat", 3), ("dog", 2), ("mat", 1), ("unseen", 0)):
        assert idf[column[word]] == pytest.approx(
            math.log((4 - count + 0.5) / (count + 0.5) + 1), abs=SCORE_TOL
        )
    assert (idf > 0).all()


def test_document_frequencies_merge_equals_one_pass():
    hasher = TermHasher(n_features=2**10)
    texts = random_texts(60, seed=1)
    whole = DocumentFrequencies.zeros(2**10)
    whole.update(hasher.transform(texts))
    parts = []
    for start, stop in ((0, 7), (7, 30), (30, 31), (31, 60)):
        part = DocumentFrequencies.zeros(2**10)
        part.update(hasher.transform(texts[start:stop]))
        parts.append(part)
    merged = parts[3] + parts[0] + parts[2].merge(parts[1])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.num_documents == whole.num_documents == 60
    np.testing.assert_array_equal(merged.idf(), whole.idf())
    with pytest.raises(ValueError):
        whole.merge(DocumentFrequencies.zeros(2**11))


def brute_force_bm25(query_texts, sequence_texts, hasher, idf, k1):
    """The paper's formula term by term: sum over shared terms of idf * f(k1+1)/(f+k1), f = 1 (presence)."""
    scores = np.zeros((len(query_texts), len(sequence_texts)))
    for q, query in enumerate(query_texts):
        query_terms = set(hasher.transform([query]).indices.tolist())
        for m, sequence in enumerate(sequence_texts):
            for term in set(hasher.transform([sequence]).indices.tolist()):
                if term in query_terms:
                    f = 1.0
                    scores[q, m] += idf[term] * f * (k1 + 1) / (f + k1)
    return scores


@pytest.mark.parametrize("k1", [1.5, 0.3])
def test_bm25_matches_brute_force(k1):
    hasher = TermHasher(n_features=2**8)  # small: hash collisions are part of what is checked
    queries, sequences = random_texts(5, seed=2) + ["nothing shared here"], random_texts(40, seed=3)
    df = DocumentFrequencies.zeros(2**8)
    df.update(hasher.transform(sequences))
    idf = df.idf()
    scores = bm25_scores(hasher.transform(queries), hasher.transform(sequences), idf, k1=k1)
    assert scores.shape == (6, 40) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, brute_force_bm25(queries, sequences, hasher, idf, k1), atol=SCORE_TOL)
    assert (scores >= 0).all() and (scores[:5] > 0).any()


def test_bm25_non_binary_counts_are_saturated():
    idf = np.array([2.0, 3.0])
    queries = sp.csr_matrix(np.array([[1.0, 1.0]]))
    sequences = sp.csr_matrix(np.array([[3.0, 0.0], [1.0, 1.0]]))
    scores = bm25_scores(queries, sequences, idf, k1=1.5)
    np.testing.assert_allclose(scores, [[2.0 * 3 * 2.5 / 4.5, 5.0]], atol=SCORE_TOL)
    np.testing.assert_array_equal(sequences.toarray(), [[3.0, 0.0], [1.0, 1.0]])  # input untouched
    with pytest.raises(ValueError):
        bm25_scores(queries, sequences, np.ones(3))


def random_batch(rng, q, n, doc_pool=30, levels=4):
    """Scores drawn from few values (many ties, zeros included) over keys drawn without repeats."""
    keys = rng.choice(doc_pool * 3, size=n, replace=False)
    doc_ids = [f"doc{k // 3:03d}" for k in keys]
    chunks = [int(k % 3) for k in keys]
    scores = rng.integers(0, levels, size=(q, n)).astype(np.float64)
    return scores, doc_ids, chunks


def brute_force_selection(scores, doc_ids, chunks, n):
    """Sort everything by (-score, doc_id, chunk) and keep the first n per query."""
    out = []
    for row in scores:
        entries = sorted(zip(row.tolist(), doc_ids, chunks), key=lambda e: (-e[0], e[1], e[2]))
        out.append([(d, c, s) for s, d, c in entries[:n]])
    return out


@pytest.mark.parametrize("num, batch", [(10, 7), (40, 1), (40, 3), (60, 4), (5, 90), (200, 11)])
def test_selector_one_pass_matches_brute_force_with_ties(num, batch):
    # Small batches against many kept entries take the insertion path, large ones the full sort.
    rng = np.random.default_rng(num * 1000 + batch)
    scores, doc_ids, chunks = random_batch(rng, q=3, n=90)
    selector = CandidateSelector(["q0", "q1", "q2"], num_candidates=num)
    for start in range(0, 90, batch):
        stop = start + batch
        selector.update(scores[:, start:stop], doc_ids[start:stop], chunks[start:stop])
        assert selector.stored_size <= 3 * num
    expected = brute_force_selection(scores, doc_ids, chunks, num)
    assert [selector.candidates(q) for q in range(3)] == expected
    assert selector.all_keys() == {(d, c) for rows in expected for d, c, _ in rows}


def test_selector_merge_of_random_splits_and_orders_equals_one_pass():
    rng = np.random.default_rng(1)
    q, n, num = 4, 90, 12
    scores, doc_ids, chunks = random_batch(rng, q=q, n=n)
    one_pass = CandidateSelector([f"q{i}" for i in range(q)], num)
    one_pass.update(scores, doc_ids, chunks)
    for trial in range(20):
        order = rng.permutation(n)
        cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, 8), replace=False))
        parts = []
        for idx in np.split(order, cuts):  # one worker's share, fed in several small batches
            part = CandidateSelector(one_pass.query_ids, num)
            for batch in np.array_split(idx, rng.integers(1, 4)):
                part.update(scores[:, batch], [doc_ids[i] for i in batch], [chunks[i] for i in batch])
            parts.append(part)
        random.Random(trial).shuffle(parts)
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merge(part) if trial % 2 else part.merge(merged)
        for i in range(q):
            assert merged.candidates(i) == one_pass.candidates(i)


def test_selector_ties_break_by_doc_id_then_chunk():
    selector = CandidateSelector(["q"], num_candidates=3)
    selector.update(np.array([[1.0, 1.0, 1.0, 1.0]]), ["b", "a", "a", "c"], [0, 2, 1, 0])
    assert selector.candidates(0) == [("a", 1, 1.0), ("a", 2, 1.0), ("b", 0, 1.0)]
    selector.update(np.array([[1.0, 2.0]]), ["0", "z"], [5, 0])  # "0" < "a" wins a tie; "z" wins on score
    assert selector.candidates(0) == [("z", 0, 2.0), ("0", 5, 1.0), ("a", 1, 1.0)]


def test_selector_zero_scores_are_eligible_but_rank_last():
    selector = CandidateSelector(["q"], num_candidates=3)
    selector.update(np.array([[0.0, 0.0]]), ["a", "b"], [0, 0])
    assert selector.candidates(0) == [("a", 0, 0.0), ("b", 0, 0.0)]
    selector.update(np.array([[0.5]]), ["z"], [0])
    assert selector.candidates(0) == [("z", 0, 0.5), ("a", 0, 0.0), ("b", 0, 0.0)]


def test_selector_retried_batch_is_kept_once():
    selector = CandidateSelector(["q"], num_candidates=30)
    batch = (np.array([[1.0, 2.0]]), ["a", "b"], [0, 0])
    selector.update(*batch)
    selector.update(*batch)
    assert selector.candidates(0) == [("b", 0, 2.0), ("a", 0, 1.0)]
    selector.update(np.arange(20.0)[None, :], [f"k{i:02d}" for i in range(20)], [0] * 20)
    before = selector.candidates(0)
    for i in (0, 5, 19):  # a single entry offered again, by insertion into many kept ones
        selector.update(np.array([[float(i)]]), [f"k{i:02d}"], [0])
    selector.update(*batch)
    assert selector.candidates(0) == before
    assert selector.merge(selector).candidates(0) == before


def test_selector_memory_stays_bounded():
    rng = np.random.default_rng(2)
    q, num = 5, 20
    selector = CandidateSelector([f"q{i}" for i in range(q)], num)
    for step in range(200):
        scores = rng.random((q, 64))
        selector.update(scores, [f"d{step}-{i}" for i in range(64)], list(range(64)))
        assert selector.stored_size <= q * num
    assert selector.stored_size == q * num
    for i in range(q):
        got = [s for _, _, s in selector.candidates(i)]
        assert got == sorted(got, reverse=True)


def test_selector_rejects_bad_input():
    with pytest.raises(ValueError):
        CandidateSelector(["q"], num_candidates=0)
    selector = CandidateSelector(["q0", "q1"], num_candidates=2)
    with pytest.raises(ValueError):
        selector.update(np.zeros((1, 2)), ["a", "b"], [0, 0])
    with pytest.raises(ValueError):
        selector.merge(CandidateSelector(["q0", "q1"], num_candidates=3))


def test_end_to_end_filter_finds_the_relevant_sequence():
    hasher = TermHasher()
    sequences = ["the cat sat on the mat", "gradient descent on a loss", "influence functions trace data"]
    df = DocumentFrequencies.zeros(hasher.n_features)
    df.update(hasher.transform(sequences))
    scores = bm25_scores(
        hasher.transform(["which data did influence this?"]), hasher.transform(sequences), df.idf()
    )
    selector = CandidateSelector(["q"], num_candidates=1)
    selector.update(scores, ["s0", "s1", "s2"], [0, 0, 0])
    assert selector.all_keys() == {("s2", 0)}


# ---------------------------------------------------------------------------------------------------------------
# The corpus passes' TF-IDF facts are those of decoding every sequence one document at a time (as it used to be)


DEMO = __import__("pathlib").Path(__file__).resolve().parent.parent / "flows" / "demo_assets"
DEMO_DOCS, DEMO_CHARS, DEMO_SEQ_LEN, DEMO_CANDIDATES = 40, 4000, 64, 7


@pytest.fixture(scope="module")
def demo_slice(tmp_path_factory):
    """The demo corpus's first documents (cut short) as two byte-range fragments, and the demo's queries."""
    import gzip
    import json

    from whence.corpus import list_fragments

    rows = []
    for shard in sorted((DEMO / "corpus").glob("*.jsonl.gz")):
        rows += [json.loads(line) for line in gzip.open(shard, "rt", encoding="utf-8")]
        if len(rows) >= DEMO_DOCS:
            break
    path = tmp_path_factory.mktemp("demo") / "slice.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:DEMO_CHARS]}) + "\n"
                            for r in rows[:DEMO_DOCS]), encoding="utf-8")
    fragments = list_fragments([str(path)], fragment_bytes=path.stat().st_size // 2)
    queries = [json.loads(line) for line in open(DEMO / "queries.jsonl", encoding="utf-8") if line.strip()]
    return path, fragments, queries


def per_document_terms(path, tokenizer):
    """(doc_ids, chunks, term rows) the old way: tokenizer(text), chunk_tokens, batch_decode per document."""
    from whence.corpus import list_fragments, read_fragment
    from whence.text import document_sequences

    hasher, ids, chunks, rows = TermHasher(), [], [], []
    for fragment in list_fragments([str(path)]):
        for doc in read_fragment(fragment):
            sequences = document_sequences(tokenizer, doc.doc_id, doc.text, DEMO_SEQ_LEN)
            texts = tokenizer.batch_decode([list(s.input_ids) for s in sequences], skip_special_tokens=True)
            rows.append(hasher.transform(texts))
            ids += [s.doc_id for s in sequences]
            chunks += [s.chunk for s in sequences]
    return ids, chunks, sp.vstack(rows).tocsr()


def test_scan_and_candidates_equal_decoding_each_document(demo_slice):
    from flows.candidates import CandidateSelection, select_fragment_candidates
    from flows.corpus_pipeline import ReadSettings, load_tokenizer, scan_fragment
    from whence.tfidf import DEFAULT_FEATURES

    path, fragments, queries = demo_slice
    assert len(fragments) == 2
    settings = ReadSettings(str(DEMO / "model"), DEMO_SEQ_LEN)
    ids, chunks, rows = per_document_terms(path, load_tokenizer(settings.tokenizer_path))
    expected = DocumentFrequencies.zeros(DEFAULT_FEATURES)
    expected.update(rows)

    scans = [scan_fragment(f, settings, DEFAULT_FEATURES) for f in fragments]
    frequencies = scans[0]["frequencies"] + scans[1]["frequencies"]
    assert frequencies.num_documents == expected.num_documents == len(ids)
    np.testing.assert_array_equal(frequencies.counts, expected.counts)
    assert sum(int(s["sequence_counts"].sum()) for s in scans) == len(ids)

    query_ids = [q["id"] for q in queries]
    query_terms = TermHasher().transform([f"{q['prompt']} {q['completion']}" for q in queries])
    reference = CandidateSelector(query_ids, DEMO_CANDIDATES)
    reference.update(bm25_scores(query_terms, rows, expected.idf()), ids, chunks)
    selection = CandidateSelection(query_ids, query_terms, expected.idf(), DEMO_CANDIDATES, DEFAULT_FEATURES)
    parts = [select_fragment_candidates(f, settings, frozenset(), selection) for f in fragments]
    merged = parts[0].merge(parts[1])
    for q in range(len(query_ids)):
        assert merged.candidates(q) == reference.candidates(q)  # same keys, same order, same float scores


def test_candidates_from_the_scans_term_rows_equal_a_candidates_pass(demo_slice):
    """The scan keeps each sequence's term rows; selecting from them (duplicates' lines skipped) gives exactly
    the candidates pass's selection, with no second read of the corpus."""
    from flows.candidates import CandidateSelection, candidates_from_scans, select_fragment_candidates
    from flows.corpus_pipeline import ReadSettings, reduce_scans, scan_fragment
    from whence.tfidf import DEFAULT_FEATURES

    path, fragments, queries = demo_slice
    settings = ReadSettings(str(DEMO / "model"), DEMO_SEQ_LEN)
    scans = [scan_fragment(f, settings, DEFAULT_FEATURES) for f in fragments]
    _, _, _, frequencies = reduce_scans(scans)
    query_ids = [q["id"] for q in queries]
    query_terms = TermHasher().transform([f"{q['prompt']} {q['completion']}" for q in queries])
    selection = CandidateSelection(query_ids, query_terms, frequencies.idf(), DEMO_CANDIDATES, DEFAULT_FEATURES)
    # Skip the documents holding query 0's two best candidates, as duplicates would be: the selection must move.
    first = candidates_from_scans(scans, {}, selection)
    skipped = {doc_id for doc_id, _, _ in first.candidates(0)[:2]}
    skip = {}
    for scan in scans:
        lines = {int(line) for line, doc_id in zip(scan["lines"], scan["doc_ids"]) if doc_id in skipped}
        if lines:
            skip[scan["fragment"]] = lines
    assert skip
    for skip_lines in ({}, skip):
        parts = [select_fragment_candidates(f, settings, skip_lines.get(f.index, frozenset()), selection)
                 for f in fragments]
        expected = parts[0].merge(parts[1])
        cached = candidates_from_scans(scans, skip_lines, selection)
        for q in range(len(query_ids)):
            assert cached.candidates(q) == expected.candidates(q)
    assert not {d for d, _, _ in candidates_from_scans(scans, skip, selection).candidates(0)} & skipped
    assert candidates_from_scans([{**scans[0], "terms": None}, scans[1]], {}, selection) is None


def test_sequences_from_the_scans_token_ids_equal_reading_the_corpus(demo_slice):
    """The candidates' token ids, taken from what the scan kept, are the sequences a read of the corpus emits
    for the same keys (duplicates' lines skipped), fragment by fragment and in the same order."""
    from flows.corpus_pipeline import (
        FragmentPlan,
        ReadSettings,
        block_sequences,
        drop_sequence_contents,
        scan_fragment,
        sequence_rows,
        sequences_from_scans,
    )
    from whence.tfidf import DEFAULT_FEATURES

    path, fragments, _ = demo_slice
    settings = ReadSettings(str(DEMO / "model"), DEMO_SEQ_LEN)
    scans = [scan_fragment(f, settings, DEFAULT_FEATURES) for f in fragments]
    every = [(s.doc_id, s.chunk) for f in fragments for block in sequence_rows(f, settings, FragmentPlan())
             for s in block_sequences(block)]
    keys = set(every[::3])  # a third of the sequences, from both fragments
    skip = {fragments[1].index: {int(scans[1]["lines"][0])}}  # the second fragment's first document, a duplicate
    gathered = sequences_from_scans(scans, skip, keys)
    for fragment in fragments:
        plan = FragmentPlan(skip_lines=skip, keys=keys)
        expected = [s for block in sequence_rows(fragment, settings, plan) for s in block_sequences(block)]
        assert list(gathered[fragment.index]) == expected and expected
    assert scans[1]["doc_ids"][0] not in {s.doc_id for s in gathered[fragments[1].index]}
    drop_sequence_contents(scans[0])
    assert sequences_from_scans(scans, skip, keys) is None

