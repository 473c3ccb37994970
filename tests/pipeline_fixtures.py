"""A tiny model directory, a three-fragment corpus with bad rows, and queries, written to disk for the flows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.tiny import TEXTS, make_model, make_tokenizer
from whence.config import FitConfig

# The fit of every module that scores this workspace on Ray (conftest.fitted_workspace): windows of 16 tokens.
FIT_CONFIG = FitConfig(seq_len=16, batch_size=4)

QUERIES = [
    {"id": "whale", "prompt": "The whale swam far", "completion": " beyond the harbour"},
    {"id": "fox", "prompt": "A quick brown", "completion": " fox jumps over the lazy dog"},
    {"id": "union", "prompt": "The state of the union", "completion": " is strong"},
]


def document_text(i: int) -> str:
    return " ".join(TEXTS[(i * 3 + j) % len(TEXTS)] for j in range(1 + i % 3))


def write_workspace(root: Path, family: str = "llama", per_fragment: int = 10) -> dict:
    """The model, a corpus of three fragments (`per_fragment` documents each; a.jsonl also holds the four bad
    rows, its duplicate id repeating doc03, so at least 4) and the queries, under `root`."""
    assert per_fragment >= 4, "a.jsonl's duplicate id is doc03"
    tokenizer = make_tokenizer()
    model = make_model(family, len(tokenizer), context=64)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = root / "corpus"
    corpus.mkdir()
    docs = [(f"doc{i:02d}", document_text(i)) for i in range(3 * per_fragment)]
    with open(corpus / "a.jsonl", "w") as handle:
        for doc_id, text in docs[:per_fragment]:
            handle.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        handle.write("{this is not json\n")  # line per_fragment + 1 (11 by default)
        handle.write(json.dumps({"id": "no-text"}) + "\n")
        handle.write(json.dumps({"id": "blank", "text": "   "}) + "\n")
        handle.write(json.dumps({"id": "doc03", "text": "a duplicate id"}) + "\n")  # line per_fragment + 4
    with open(corpus / "b.jsonl.gz", "wb") as raw, gzip.open(raw, "wt") as handle:
        for doc_id, text in docs[per_fragment : 2 * per_fragment]:
            handle.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    last = docs[2 * per_fragment :]
    pq.write_table(pa.table({"id": [d for d, _ in last], "text": [t for _, t in last]}), corpus / "c.parquet")
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    return {"model": str(model_dir), "corpus": str(corpus), "queries": str(queries), "documents": docs,
            "bad_rows": 4}


def copy_workspace(space: dict, root: Path) -> dict:
    """`space` (write_workspace's, perhaps with fitted "factors") copied under `root`: a module's own files to score,
    damage or resume, at the cost of a copy instead of a fit. Factors name their model by fingerprint, not by path."""
    import shutil

    copy = dict(space, root=root)
    for key in ("model", "corpus", "queries", "factors"):
        if key in space:
            source, target = Path(space[key]), root / Path(space[key]).name
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
            copy[key] = str(target)
    return copy


class OneBatchDataset:
    """A stand-in for the Ray Dataset a FitterActor iterates: `sequences` (whence.text.TrainingSequence) as one
    batch of the rows flows.corpus_pipeline makes."""

    def __init__(self, sequences):
        import numpy as np

        self.rows = {"fragment": np.zeros(len(sequences), dtype=np.int64),
                     "doc_id": np.asarray([s.doc_id for s in sequences], dtype=object),
                     "chunk": np.asarray([s.chunk for s in sequences], dtype=np.int64),
                     "input_ids": np.asarray([np.asarray(s.input_ids) for s in sequences] + [None], dtype=object)[:-1],
                     "marker_total": np.full(len(sequences), -1, dtype=np.int64)}

    def iter_batches(self, batch_size, batch_format):
        yield self.rows
