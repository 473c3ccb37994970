"""The corpus scan's speed per sequence, before and after whence.fast_tokens, in process (no Ray):

    python -m flows.bench.scan [--model DIR] [--docs N] [--repeats R] [--seq-len L]

On one fragment (the demo corpus's first N documents written as one JSON-lines file) it times, interleaved and
best of R, CPU seconds per 1,000 sequences of:
    per_document  the scan as it was: tokenizer(text) per document, batch_decode of each document's windows,
                  TermHasher on each document's windows (whence.text.document_sequences)
    scan          flows.corpus_pipeline.scan_fragment, as `whence score` runs it (document frequencies on)
and the same two without document frequencies (what `whence fit` scans). Both give the same frequencies (checked).
CPU seconds (time.process_time) rather than wall seconds: on a shared machine they measure the work, not the wait.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from flows.bench.fixtures import iter_documents

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "demo_assets" / "model"


def per_document_scan(path: Path, tokenizer, seq_len: int, tfidf_features: int):
    """(sequences, frequencies): the scan's facts computed one document at a time, the way it used to be."""
    from whence.corpus import list_fragments, read_fragment
    from whence.text import document_sequences
    from whence.tfidf import DocumentFrequencies, TermHasher

    frequencies = DocumentFrequencies.zeros(tfidf_features) if tfidf_features else None
    hasher = TermHasher(tfidf_features) if tfidf_features else None
    sequences = 0
    for fragment in list_fragments([str(path)]):
        for row in read_fragment(fragment):
            windows = document_sequences(tokenizer, row.doc_id, row.text, seq_len)
            sequences += len(windows)
            if frequencies is not None and windows:
                texts = tokenizer.batch_decode([list(w.input_ids) for w in windows], skip_special_tokens=True)
                frequencies.update(hasher.transform(texts))
    return sequences, frequencies


def scan(path: Path, model: str, seq_len: int, tfidf_features: int):
    from flows.corpus_pipeline import ReadSettings, scan_fragment
    from whence.corpus import list_fragments

    settings = ReadSettings(model, seq_len)
    sequences, frequencies = 0, None
    for fragment in list_fragments([str(path)]):
        result = scan_fragment(fragment, settings, tfidf_features)
        sequences += int(result["sequence_counts"].sum())
        part = result["frequencies"]
        frequencies = part if frequencies is None or part is None else frequencies + part
    return sequences, frequencies


def measure(model: str, docs: int, repeats: int, seq_len: int) -> dict:
    import numpy as np

    from flows.bench.fixtures import demo_corpus
    from flows.corpus_pipeline import load_tokenizer
    from whence.tfidf import DEFAULT_FEATURES

    tokenizer = load_tokenizer(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fragment.jsonl"
        with path.open("w", encoding="utf-8") as sink:
            for doc_id, text in iter_documents(demo_corpus(), limit=docs):
                sink.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        runs = {"per_document": lambda f: per_document_scan(path, tokenizer, seq_len, f),
                "scan": lambda f: scan(path, model, seq_len, f)}
        best: dict[str, float] = {}
        sequences = None
        for _ in range(repeats):
            for features, suffix in ((DEFAULT_FEATURES, ""), (0, "_no_tfidf")):
                facts = {}
                for name, run in runs.items():
                    tick = time.process_time()
                    facts[name] = run(features)
                    key = name + suffix
                    best[key] = min(best.get(key, float("inf")), time.process_time() - tick)
                (n_old, f_old), (n_new, f_new) = facts["per_document"], facts["scan"]
                if n_old != n_new or (features and not np.array_equal(f_old.counts, f_new.counts)):
                    raise AssertionError("the scan's facts differ from the per-document scan's")
                sequences = n_new
    per_1000 = {k: 1000 * v / sequences for k, v in best.items()}
    return {"documents": docs, "sequences": sequences, "repeats": repeats, "cpu_s_per_1000_sequences": per_1000,
            "speedup": per_1000["per_document"] / per_1000["scan"],
            "speedup_no_tfidf": per_1000["per_document_no_tfidf"] / per_1000["scan_no_tfidf"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.bench.scan", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="tokenizer directory (default: the demo's)")
    parser.add_argument("--docs", type=int, default=100, help="demo corpus documents in the fragment")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best of each is kept")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (the demo's)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.docs, args.repeats, args.seq_len), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
