"""A scoring run's TF-IDF candidates: selected once per run, and their sequences tokenised once.

    selection    per query, the N sequences most similar by BM25 (whence.tfidf): from the term rows the corpus
                 scan kept (`candidates_from_scans`, no corpus read) or by a pass over the fragments
                 (`run_candidates`, one read task each), into RESULTS_DIR/candidates.parquet
    gathering    the pooled candidates' token ids, read once (flows.corpus_pipeline.gather_sequences) into
                 RESULTS_DIR/candidate_sequences.parquet and put in Ray's object store: the scoring pass, the
                 per-token pass and a baseline run given candidates_from read them instead of the corpus
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flows.corpus_pipeline import (
    TERM_BATCH,
    ReadSettings,
    TermBatches,
    fragment_documents,
    fragment_of,
    fragments_dataset,
    kept_sequences,
    load_document_tokenizer,
    window_bounds,
)
from whence.corpus import Fragment

if TYPE_CHECKING:
    from flows.score import ScoringRun

log = logging.getLogger("whence.score")


@dataclass(frozen=True)
class CandidateSelection:
    """What the candidates pass compares each sequence with: the queries' hashed terms and ids, the corpus's BM25
    idf weights, and how many sequences to keep per query."""

    query_ids: list[str]
    query_terms: object  # (Q, F) binary term matrix (scipy sparse), from TermHasher(n_features)
    idf: object  # (F,) float64, or its ObjectRef once shared through Ray's object store
    num_candidates: int
    n_features: int


def select_fragment_candidates(fragment: Fragment, settings: ReadSettings, skip_lines,
                               selection: CandidateSelection):
    """This fragment's per-query top-N sequences by BM25 (a mergeable CandidateSelector)."""
    from whence.tfidf import CandidateSelector, bm25_scores

    tokenizer = load_document_tokenizer(settings.tokenizer_path)
    selector = CandidateSelector(selection.query_ids, selection.num_candidates)

    def offer(rows, doc_ids, chunks):
        selector.update(bm25_scores(selection.query_terms, rows, selection.idf), doc_ids, chunks)

    terms = TermBatches(selection.n_features, offer)
    for document in fragment_documents(fragment, settings, skip_lines=skip_lines):
        token_ids = tokenizer.encode(document.text)
        bounds = window_bounds(len(token_ids), settings.seq_len)
        if bounds:
            terms.add(document.doc_id, tokenizer.window_texts(document.text, token_ids, bounds))
    terms.flush()
    return selector


def _candidates_batch(batch: dict, settings: ReadSettings, skip_lines, selection: CandidateSelection) -> dict:
    import dataclasses
    import pickle

    import ray

    if isinstance(selection.idf, ray.ObjectRef):  # shared via the object store (F floats)
        selection = dataclasses.replace(selection, idf=ray.get(selection.idf))
    results = []
    for i in range(len(batch["index"])):
        fragment = fragment_of({k: v[i] for k, v in batch.items()})
        selector = select_fragment_candidates(fragment, settings, skip_lines.get(fragment.index, frozenset()),
                                              selection)
        results.append(pickle.dumps(selector))
    return {"result": np.asarray(results, dtype=object)}


def run_candidates(fragments: list[Fragment], settings: ReadSettings, skip_lines: dict[int, set[int]],
                   selection: CandidateSelection):
    """Every fragment's candidates (select_fragment_candidates), merged: a CandidateSelector over the corpus."""
    import dataclasses
    import pickle

    import ray

    from flows.cluster import READ_TASK_CPUS

    # idf (F floats) goes to the object store once, not into every task's arguments.
    shared = dataclasses.replace(selection, idf=ray.put(selection.idf))
    dataset = fragments_dataset(fragments).map_batches(
        _candidates_batch, batch_size=1, num_cpus=READ_TASK_CPUS,
        fn_kwargs={"settings": settings, "skip_lines": skip_lines, "selection": shared})
    merged = None
    for row in dataset.iter_rows():
        selector = pickle.loads(row["result"])
        merged = selector if merged is None else merged.merge(selector)
    return merged


def candidates_from_scans(scans: list[dict], skip_lines: dict[int, set[int]], selection: CandidateSelection):
    """The candidates run_candidates would select, from the term rows the scans kept (no corpus pass), or None
    when a scan has none (a corpus over MAX_CACHED_TERM_ENTRIES, or a scan without frequencies). The same
    sequences are offered (duplicate rows dropped by their document's line), so the selection is the same."""
    from whence.tfidf import CandidateSelector, bm25_scores

    if not scans or any(scan.get("terms") is None for scan in scans):
        return None
    selector = CandidateSelector(selection.query_ids, selection.num_candidates)
    for scan in scans:
        kept, doc_ids, chunks = kept_sequences(scan, skip_lines)
        rows = scan["terms"][kept]  # (n, F)
        for start in range(0, rows.shape[0], TERM_BATCH):  # (Q, TERM_BATCH) score temporaries
            end = start + TERM_BATCH
            selector.update(bm25_scores(selection.query_terms, rows[start:end], selection.idf), doc_ids[start:end],
                            chunks[start:end])
    return selector


# ---------------------------------------------------------------------------------------------------------
# a scoring run's candidates


def candidate_keys(run: ScoringRun, scans: list[dict], skip: dict[int, set[int]], frequencies
                    ) -> set[tuple[str, int]]:
    """The (doc_id, chunk) keys to score: the pooled TF-IDF candidates, selected once into candidates.parquet,
    from the term rows the (cached) scan kept when it has them, else by a candidates pass over the corpus."""
    from whence.results import CANDIDATES_FILE, candidates_table, read_candidate_keys, write_table_atomically
    from whence.tfidf import DEFAULT_FEATURES, TermHasher

    path = run.state.path / CANDIDATES_FILE
    if path.exists():
        return read_candidate_keys(path)
    queries, num_candidates = run.queries, run.config.tfidf_candidates
    query_terms = TermHasher(DEFAULT_FEATURES).transform([f"{q.prompt} {q.completion}" for q in queries])
    selection = CandidateSelection(run.query_ids, query_terms, frequencies.idf(), num_candidates, DEFAULT_FEATURES)
    selector = candidates_from_scans(scans, skip, selection)
    if selector is None:
        selector = run_candidates(run.fragments, run.settings, skip, selection)
    rows = {"query_id": [], "rank": [], "doc_id": [], "chunk": [], "bm25": []}
    for q, query in enumerate(queries):
        for rank, (doc_id, chunk, score) in enumerate(selector.candidates(q), start=1):
            for name, value in zip(rows, (query.id, rank, doc_id, chunk, score)):
                rows[name].append(value)
    write_table_atomically(candidates_table(rows), path)
    keys = selector.all_keys()
    log.info("TF-IDF: %d candidate sequences for %d queries (up to %d each)", len(keys), len(queries), num_candidates)
    return keys


def stored_candidates(run: ScoringRun, scans: list[dict], skip: dict[int, set[int]], keys: set[tuple[str, int]]
                      ) -> dict[int, object] | None:
    """fragment -> an ObjectRef of its candidate sequences (flows.corpus_pipeline.StoredSequences), tokenised
    once into candidate_sequences.parquet and read from there by this run's later passes, a resumed run and a
    run given this one as candidates_from; None when too many to keep
    (flows.corpus_pipeline.MAX_STORED_TOKENS). The token ids come
    from the (cached) scan when it kept them, else from one read of the candidates' documents."""
    import ray

    from flows import corpus_pipeline
    from flows.corpus_pipeline import FragmentPlan, gather_sequences, sequences_from_scans
    from whence.results import CANDIDATE_SEQUENCES_FILE

    if len(keys) * run.settings.seq_len > corpus_pipeline.MAX_STORED_TOKENS:
        return None
    path = run.state.path / CANDIDATE_SEQUENCES_FILE
    gathered = _read_candidate_sequences(path, keys)
    if gathered is None:
        gathered = sequences_from_scans(scans, skip, keys)
        if gathered is None:
            gathered = gather_sequences(run.fragments, run.settings, FragmentPlan(skip_lines=skip, keys=keys))
        _write_candidate_sequences(path, gathered)
    return {fragment: ray.put(sequences) for fragment, sequences in gathered.items()}


def _write_candidate_sequences(path: Path, gathered: dict) -> None:
    from whence.results import candidate_sequences_table, write_table_atomically

    columns = {"fragment": [], "doc_id": [], "chunk": [], "input_ids": []}
    for fragment, sequences in sorted(gathered.items()):
        columns["fragment"] += [fragment] * len(sequences.doc_ids)
        columns["doc_id"] += sequences.doc_ids
        columns["chunk"] += sequences.chunks
        columns["input_ids"] += [list(ids) for ids in sequences.input_ids]
    write_table_atomically(candidate_sequences_table(columns), path)


def _read_candidate_sequences(path: Path, keys: set[tuple[str, int]]) -> dict | None:
    """fragment -> StoredSequences from the file, or None when it is absent, unreadable or of other candidates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.corpus_pipeline import StoredSequences

    if not path.exists():
        return None
    try:
        table = pq.read_table(path).to_pydict()
    except (OSError, pa.ArrowException) as error:
        log.warning("gathering the candidates again: %s is unreadable (%s)", path, error)
        return None
    if set(zip(table["doc_id"], table["chunk"])) != keys:
        return None
    gathered: dict[int, StoredSequences] = {}
    for fragment, doc_id, chunk, ids in zip(table["fragment"], table["doc_id"], table["chunk"], table["input_ids"]):
        sequences = gathered.setdefault(fragment, StoredSequences([], [], []))
        sequences.doc_ids.append(doc_id)
        sequences.chunks.append(chunk)
        sequences.input_ids.append(tuple(ids))
    return gathered
