"""The corpus as Ray Data: fragments read in parallel, validated, tokenised and cut into training sequences.

Three kinds of pass over the fragments (whence.corpus.Fragment: a file, or a Parquet row group):
  scan        per fragment: bad-row tally, id hashes (for duplicates), sequences per document, and (for
              TF-IDF) the document frequencies of its sequences' terms. Small results, reduced on the driver.
              It reads every row first, so --strict errors (file and line) surface here, before any work.
  candidates  per fragment: BM25 of its sequences against the queries, the per-query top N kept
              (flows.candidates; with the term rows the scan keeps, on the driver without reading the corpus).
  sequences   a stream of sequence rows {fragment, doc_id, chunk, input_ids, marker_total} for the actors.
              After a fragment's last sequence comes one marker row (marker_total = how many sequences the
              fragment produced), so a consumer knows when a fragment is finished, with constant memory.
              `gather_sequences` collects a plan's sequences once, per fragment; a plan with them stored reads
              those instead of the corpus.
Every pass skips the same rows (bad rows, later duplicates) and so sees the same sequences. Each pass tokenises
each document once, through whence.fast_tokens (the tokenizer's own ids and decoded texts, several times faster
for byte-level BPE); the TF-IDF passes hash TERM_BATCH windows' texts per call; a sequences pass with a key
filter tokenises only the documents that hold a wanted sequence. flows.scan_cache keeps a scan's results for
the next run on the same corpus.
What travels to the reading tasks: ReadSettings (how a fragment becomes sequences; ReadSettings.for_corpus from a
whence.corpus.CorpusSource), and FragmentPlan (which of them the sequences pass emits).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from whence.corpus import BadRow, CorpusSource, CorpusTally, Document, Fragment, id_hashes, read_fragment
from whence.text import MIN_SEQUENCE_TOKENS, TrainingSequence

# marker_total of an ordinary sequence row
NOT_A_MARKER = -1
ROWS_PER_BLOCK = 64
# Sequence texts hashed into TF-IDF terms per vectoriser call (the candidates are the same for any batching).
TERM_BATCH = 2048
# With frequencies, the scan keeps every sequence's hashed term rows (5 bytes an entry: a bool and an int32
# index; ~80 entries for a 128-token English sequence) and token ids (4 bytes each) while the corpus holds at most
# this many of each; beyond, both are dropped, and the candidates pass (flows.candidates) and the gathering of the
# candidates' sequences read the corpus again. ~200 MB each at the limits: about half a million such sequences.
MAX_CACHED_TERM_ENTRIES = 40_000_000
MAX_CACHED_TOKENS = 50_000_000
# A plan's sequences are put in Ray's object store from the scan (or gathered once) for the passes that read them
# while they hold at most this many tokens (8 bytes each); beyond, every pass tokenises its documents again.
MAX_STORED_TOKENS = 32_000_000


@dataclass(frozen=True)
class ReadSettings:
    """What every pass needs to turn a fragment into the same sequences."""

    tokenizer_path: str
    seq_len: int
    id_field: str = "id"
    text_field: str = "text"
    strict: bool = False

    @classmethod
    def for_corpus(cls, tokenizer_path: str, seq_len: int, corpus: CorpusSource) -> ReadSettings:
        """The settings that read `corpus`'s fields (and stop at a bad row when it is strict)."""
        return cls(tokenizer_path, seq_len, corpus.id_field, corpus.text_field, corpus.strict)


@dataclass
class FragmentPlan:
    """Per fragment, what the sequences pass emits: rows to skip and, optionally, a quota or a key filter."""

    skip_lines: dict[int, set[int]] = field(default_factory=dict)  # fragment -> lines to skip (duplicates)
    quota: dict[int, int] | None = None  # fragment -> emit at most this many sequences (max_sequences)
    # fragment -> pass over this many of its sequences before emitting (a fit worker's run: whence.fit_plan)
    first: dict[int, int] | None = None
    keys: set[tuple[str, int]] | None = None  # emit only these (doc_id, chunk) keys (TF-IDF candidates, top-k)
    # fragment -> its wanted sequences already tokenised (an ObjectRef of a StoredSequences, from
    # gather_sequences), read instead of the corpus; None: read the corpus
    stored: dict[int, object] | None = None

    def doc_ids(self) -> set[str] | None:
        """The documents `keys` names (None: no key filter)."""
        return None if self.keys is None else {doc_id for doc_id, _ in self.keys}


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """One tokenizer per worker process, reused by every task that lands there."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=4)
def load_document_tokenizer(path: str):
    """The tokenizer wrapped for whole documents (whence.fast_tokens: the same ids and texts, faster)."""
    from whence.fast_tokens import DocumentTokenizer

    return DocumentTokenizer(load_tokenizer(path))


def window_bounds(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, end) of a document's windows: those of whence.text.chunk_tokens (consecutive, non-overlapping,
    at most seq_len tokens, a trailing window shorter than MIN_SEQUENCE_TOKENS dropped)."""
    if seq_len < MIN_SEQUENCE_TOKENS:
        raise ValueError(f"seq_len must be at least {MIN_SEQUENCE_TOKENS}, got {seq_len}")
    bounds = [(start, min(start + seq_len, num_tokens)) for start in range(0, num_tokens, seq_len)]
    return [(start, end) for start, end in bounds if end - start >= MIN_SEQUENCE_TOKENS]


def fragment_documents(fragment: Fragment, settings: ReadSettings, tally: CorpusTally | None = None,
                       skip_lines: set[int] | frozenset = frozenset()) -> Iterator[Document]:
    for row in read_fragment(fragment, settings.id_field, settings.text_field, settings.strict):
        if tally is not None:
            tally.add(row)
        if isinstance(row, BadRow) or row.line in skip_lines:
            continue
        yield row


def fragment_sequences(fragment: Fragment, settings: ReadSettings, skip_lines=frozenset(),
                       doc_ids: set[str] | None = None) -> Iterator[TrainingSequence]:
    """The fragment's training sequences in order; with `doc_ids`, only those documents are tokenised."""
    tokenizer = load_document_tokenizer(settings.tokenizer_path)
    for document in fragment_documents(fragment, settings, skip_lines=skip_lines):
        if doc_ids is not None and document.doc_id not in doc_ids:
            continue
        ids = tokenizer.encode(document.text)
        for chunk, (start, end) in enumerate(window_bounds(len(ids), settings.seq_len)):
            yield TrainingSequence(document.doc_id, chunk, tuple(ids[start:end]))


# ---------------------------------------------------------------------------------------------------------
# scan


class TermBatches:
    """Window texts gathered over documents and hashed TERM_BATCH at a time (one vectoriser call per batch):
    `flush` hands each batch's rows (n, F), with the doc ids and chunks offered alongside, to `consume`."""

    def __init__(self, n_features: int, consume):
        from whence.tfidf import TermHasher

        self.hasher, self.consume = TermHasher(n_features), consume
        self.texts: list[str] = []
        self.doc_ids: list[str] = []
        self.chunks: list[int] = []

    def add(self, doc_id: str, texts: list[str]) -> None:
        self.texts.extend(texts)
        self.doc_ids.extend([doc_id] * len(texts))
        self.chunks.extend(range(len(texts)))
        if len(self.texts) >= TERM_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.texts:
            self.consume(self.hasher.transform(self.texts), self.doc_ids, self.chunks)
            self.texts, self.doc_ids, self.chunks = [], [], []


def scan_fragment(fragment: Fragment, settings: ReadSettings, tfidf_features: int = 0) -> dict:
    """Tally, id hashes and sequence counts per document; document frequencies when tfidf_features > 0.
    Each document is tokenised once; its windows are decoded to text only when frequencies are asked for."""
    from whence.tfidf import DocumentFrequencies

    tokenizer = load_document_tokenizer(settings.tokenizer_path)
    tally = CorpusTally()
    lines, ids, counts, tokens = [], [], [], 0
    frequencies = DocumentFrequencies.zeros(tfidf_features) if tfidf_features else None
    term_rows = []  # (n, F) binary rows of the fragment's sequences, in order: kept for candidates_from_scans
    windows: list[list[int]] = []  # the same sequences' token ids: kept for sequences_from_scans

    def count(rows, *_):
        frequencies.update(rows)
        term_rows.append(rows.astype(bool))

    terms = TermBatches(tfidf_features, count) if tfidf_features else None
    for document in fragment_documents(fragment, settings, tally):
        token_ids = tokenizer.encode(document.text)
        bounds = window_bounds(len(token_ids), settings.seq_len)
        lines.append(document.line)
        ids.append(document.doc_id)
        counts.append(len(bounds))
        tokens += sum(end - start for start, end in bounds)
        if terms is not None and bounds:
            terms.add(document.doc_id, tokenizer.window_texts(document.text, token_ids, bounds))
            windows.extend(token_ids[start:end] for start, end in bounds)
    result = {"fragment": fragment.index, "tally": tally, "lines": np.asarray(lines, dtype=np.int64),
              "hashes": id_hashes(ids), "sequence_counts": np.asarray(counts, dtype=np.int64), "tokens": tokens,
              "frequencies": frequencies, "terms": None, "doc_ids": None, "token_ids": None, "window_lengths": None}
    if terms is not None:
        import scipy.sparse as sp

        terms.flush()
        result["terms"] = (sp.vstack(term_rows, format="csr") if term_rows
                           else sp.csr_matrix((0, tfidf_features), dtype=bool))
        result["doc_ids"] = np.asarray(ids, dtype=object)
        lengths = np.asarray([len(w) for w in windows], dtype=np.int64)  # (sequences,)
        result["window_lengths"] = lengths
        result["token_ids"] = np.fromiter(itertools.chain.from_iterable(windows), dtype=np.int32,
                                          count=int(lengths.sum()))  # (tokens,) in order
    return result


def drop_sequence_contents(scan: dict) -> None:
    """Forget what the scan kept of its sequences (terms, token ids): later passes read the corpus instead."""
    scan["terms"] = scan["doc_ids"] = scan["token_ids"] = scan["window_lengths"] = None


# ---------------------------------------------------------------------------------------------------------
# sequences


@dataclass(frozen=True)
class StoredSequences:
    """One fragment's gathered sequences, in corpus order: what fragment_sequences yields for the wanted keys."""

    doc_ids: list[str]
    chunks: list[int]
    input_ids: list[tuple[int, ...]]

    def __iter__(self) -> Iterator[TrainingSequence]:
        for doc_id, chunk, ids in zip(self.doc_ids, self.chunks, self.input_ids):
            yield TrainingSequence(doc_id, chunk, tuple(ids))


def _plan_sequences(fragment: Fragment, settings: ReadSettings, plan: FragmentPlan) -> Iterator[TrainingSequence]:
    """The fragment's sequences from the store when the plan has them, else from the corpus; with a key filter,
    only documents holding a wanted sequence are tokenised."""
    if plan.stored is not None:
        import ray

        stored = plan.stored.get(fragment.index)
        yield from () if stored is None else ray.get(stored)
        return
    doc_ids = None if plan.keys is None else plan.doc_ids()
    yield from fragment_sequences(fragment, settings, plan.skip_lines.get(fragment.index, frozenset()), doc_ids)


def sequence_rows(fragment: Fragment, settings: ReadSettings, plan: FragmentPlan) -> Iterator[dict]:
    """Blocks of sequence rows for one fragment, then its marker row."""
    quota = None if plan.quota is None else plan.quota.get(fragment.index, 0)
    passed = 0 if plan.first is None else plan.first.get(fragment.index, 0)  # sequences still to pass over
    rows: list[TrainingSequence] = []
    emitted = 0
    if quota != 0:
        for sequence in _plan_sequences(fragment, settings, plan):
            if plan.keys is not None and (sequence.doc_id, sequence.chunk) not in plan.keys:
                continue
            if passed:
                passed -= 1
                continue
            rows.append(sequence)
            emitted += 1
            if len(rows) >= ROWS_PER_BLOCK:
                yield _rows_block(fragment.index, rows, NOT_A_MARKER)
                rows = []
            if quota is not None and emitted >= quota:
                break
    if rows:
        yield _rows_block(fragment.index, rows, NOT_A_MARKER)
    yield _rows_block(fragment.index, [TrainingSequence("", -1, ())], emitted)


def _rows_block(fragment: int, sequences: list[TrainingSequence], marker_total: int) -> dict:
    input_ids = np.empty(len(sequences), dtype=object)
    for i, s in enumerate(sequences):
        input_ids[i] = np.asarray(s.input_ids, dtype=np.int64)
    return {
        "fragment": np.full(len(sequences), fragment, dtype=np.int64),
        "doc_id": np.asarray([s.doc_id for s in sequences], dtype=object),
        "chunk": np.asarray([s.chunk for s in sequences], dtype=np.int64),
        "input_ids": input_ids,
        "marker_total": np.full(len(sequences), marker_total, dtype=np.int64),
    }


# ---------------------------------------------------------------------------------------------------------
# Ray Data assembly


def fragments_dataset(fragments: list[Fragment]):
    import ray.data

    # One block per fragment so fragments are read in parallel.
    items = [fragment_item(f) for f in fragments]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def fragment_item(fragment: Fragment) -> dict:
    """A fragment as a Ray Data row of plain values (None as -1); `fragment_of` reads it back."""
    return {"index": fragment.index, "path": fragment.path, "format": fragment.format,
            "row_group": -1 if fragment.row_group is None else fragment.row_group, "start": fragment.start,
            "end": -1 if fragment.end is None else fragment.end, "first_line": fragment.first_line}


def fragment_of(row) -> Fragment:
    row_group, end = int(row["row_group"]), int(row["end"])
    return Fragment(int(row["index"]), str(row["path"]), str(row["format"]), None if row_group < 0 else row_group,
                    int(row["start"]), None if end < 0 else end, int(row["first_line"]))


def _scan_batch(batch: dict, settings: ReadSettings, tfidf_features: int) -> dict:
    import pickle

    from whence.errors import CorpusError

    results = []
    for i in range(len(batch["index"])):
        fragment = fragment_of({k: v[i] for k, v in batch.items()})
        try:
            result = scan_fragment(fragment, settings, tfidf_features)
        except CorpusError as error:
            # Returned as data: Ray Data's exception wrapping would bury the message (file and line).
            result = {"fragment": fragment.index, "error": str(error)}
        results.append(pickle.dumps(result))
    return {"result": np.asarray(results, dtype=object)}


def _gather_batch(batch: dict, settings: ReadSettings, plan: FragmentPlan) -> dict:
    import pickle

    results = []
    for i in range(len(batch["index"])):
        fragment = fragment_of({k: v[i] for k, v in batch.items()})
        sequences = [s for block in sequence_rows(fragment, settings, plan) for s in block_sequences(block)]
        stored = StoredSequences([s.doc_id for s in sequences], [s.chunk for s in sequences],
                                 [s.input_ids for s in sequences])
        results.append(pickle.dumps((fragment.index, stored)))
    return {"result": np.asarray(results, dtype=object)}


def block_sequences(block: dict) -> Iterator[TrainingSequence]:
    """The sequences of a block of sequence rows (its marker row left out)."""
    for doc_id, chunk, ids, marker in zip(block["doc_id"], block["chunk"], block["input_ids"], block["marker_total"]):
        if marker == NOT_A_MARKER:
            yield TrainingSequence(str(doc_id), int(chunk), tuple(int(t) for t in ids))


def gather_sequences(fragments: list[Fragment], settings: ReadSettings, plan: FragmentPlan
                     ) -> dict[int, StoredSequences]:
    """fragment -> the sequences `plan` lets through, tokenised once (one read task per fragment), for passes
    that need the same sequences again (flows.score: the TF-IDF candidates, scored and then rescored)."""
    import pickle

    from flows.cluster import READ_TASK_CPUS

    dataset = fragments_dataset(fragments).map_batches(
        _gather_batch, batch_size=1, fn_kwargs={"settings": settings, "plan": plan}, num_cpus=READ_TASK_CPUS)
    return dict(pickle.loads(row["result"]) for row in dataset.iter_rows())


def sequences_from_scans(scans: list[dict], skip_lines: dict[int, set[int]], keys: set[tuple[str, int]] | None = None,
                         quota: dict[int, int] | None = None) -> dict[int, StoredSequences] | None:
    """What gather_sequences returns for a plan with `keys` and (or) a `quota` per fragment, from the token ids
    the scans kept (no corpus read), or None when a scan has none. The same sequences in the same order:
    documents in order, duplicates' lines skipped, each fragment's first quota ones."""
    if not scans or any(scan.get("token_ids") is None for scan in scans):
        return None
    gathered = {}
    for scan in scans:
        limit = None if quota is None else quota.get(scan["fragment"], 0)
        rows, doc_ids, chunks = kept_sequences(scan, skip_lines)
        ends = np.cumsum(scan["window_lengths"])
        starts = ends - scan["window_lengths"]
        stored = StoredSequences([], [], [])
        for row, doc_id, chunk in zip(rows.tolist(), doc_ids.tolist(), chunks.tolist()):
            if limit is not None and len(stored.doc_ids) >= limit:
                break
            if keys is None or (doc_id, chunk) in keys:
                stored.doc_ids.append(doc_id)
                stored.chunks.append(chunk)
                stored.input_ids.append(tuple(scan["token_ids"][starts[row]:ends[row]].tolist()))
        gathered[scan["fragment"]] = stored
    return gathered


def kept_sequences(scan: dict, skip_lines: dict[int, set[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, doc_ids, chunks) of a scan's sequences that the passes keep, in corpus order: the positions of those
    sequences among all the scan's sequences (its term rows and windows), with their keys. A document whose line
    is in skip_lines (a later duplicate) drops all its windows."""
    counts = scan["sequence_counts"]  # (documents,): the windows of each document, in order
    kept = np.repeat(~np.isin(scan["lines"], list(skip_lines.get(scan["fragment"], ()))), counts)  # (sequences,)
    doc_ids = np.repeat(scan["doc_ids"], counts)
    chunks = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)  # window in document
    rows = np.flatnonzero(kept)
    return rows, doc_ids[rows], chunks[rows]


def _sequences_batch(batch: dict, settings: ReadSettings, plan: FragmentPlan) -> Iterator[dict]:
    for i in range(len(batch["index"])):
        yield from sequence_rows(fragment_of({k: v[i] for k, v in batch.items()}), settings, plan)


def run_scan(fragments: list[Fragment], settings: ReadSettings, tfidf_features: int = 0) -> list[dict]:
    import pickle

    from flows.cluster import READ_TASK_CPUS

    dataset = fragments_dataset(fragments).map_batches(
        _scan_batch, batch_size=1, fn_kwargs={"settings": settings, "tfidf_features": tfidf_features},
        num_cpus=READ_TASK_CPUS)
    results, entries, tokens = [], 0, 0
    for row in dataset.iter_rows():
        result = pickle.loads(row["result"])
        if result.get("terms") is not None:
            entries, tokens = entries + result["terms"].nnz, tokens + result["token_ids"].size
        results.append(result)
        if entries > MAX_CACHED_TERM_ENTRIES or tokens > MAX_CACHED_TOKENS:  # too large a corpus to keep:
            for kept in results:  # memory stays bounded by the limits
                drop_sequence_contents(kept)
    results.sort(key=lambda r: r["fragment"])
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        from whence.errors import CorpusError

        raise CorpusError(errors[0] + (f" (and {len(errors) - 1} more fragments with errors)" if len(errors) > 1 else ""))
    return results


def sequences_dataset(fragments: list[Fragment], settings: ReadSettings, plan: FragmentPlan):
    from flows.cluster import READ_TASK_CPUS

    return fragments_dataset(fragments).map_batches(
        _sequences_batch, batch_size=1, fn_kwargs={"settings": settings, "plan": plan}, num_cpus=READ_TASK_CPUS)


def reduce_scans(scans: list[dict]):
    """(tally, duplicate lines per fragment, sequences per fragment after dropping duplicates, frequencies)."""
    from whence.corpus import DUPLICATE_ID, find_duplicate_rows

    tally = CorpusTally()
    for scan in scans:
        tally = tally.merge(scan["tally"])
    duplicates = find_duplicate_rows((s["fragment"], s["lines"], s["hashes"]) for s in scans)
    tally.add_bad(DUPLICATE_ID, len(duplicates)) if duplicates else None
    skip: dict[int, set[int]] = {}
    for fragment, line in duplicates:
        skip.setdefault(fragment, set()).add(line)
    counts = {}
    for scan in scans:
        dropped = np.isin(scan["lines"], list(skip.get(scan["fragment"], ())))
        counts[scan["fragment"]] = int(scan["sequence_counts"][~dropped].sum())
    frequencies = None
    for scan in scans:
        if scan["frequencies"] is not None:
            frequencies = scan["frequencies"] if frequencies is None else frequencies.merge(scan["frequencies"])
    return tally, skip, counts, frequencies
