"""What the `whence eval` subcommands share: options, the corpus read in process, and result files."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from flows.options import positive_int


def add_corpus_options(parser: argparse.ArgumentParser) -> None:
    """--corpus, --queries, --out and the corpus's fields and strictness (as `whence fit` names them)."""
    parser.add_argument("--corpus", required=True, nargs="+", metavar="PATH",
                        help=".jsonl, .jsonl.gz, .parquet files or directories of them")
    parser.add_argument("--queries", required=True, metavar="QUERIES.jsonl",
                        help='JSON lines {"id", "prompt", "completion"} (trace: and "source")')
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--id-field", default="id", help="corpus field holding the document id")
    parser.add_argument("--text-field", default="text", help="corpus field holding the document text")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first malformed corpus row or repeated id (default: skip them)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward/backward pass")


def parse_damping(text: str) -> float | str:
    if text == "heuristic":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'heuristic' or a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"damping must be >= 0, got {text}")
    return value


def read_documents(source) -> list[tuple[str, str]]:
    """(doc_id, text) of every good row of a whence.corpus.CorpusSource, in corpus order. As `whence fit` reads
    a corpus: malformed rows and later repeats of an id are skipped (CorpusError at the first with --strict)."""
    from whence.corpus import Document, list_fragments, read_fragment
    from whence.errors import CorpusError

    seen: set[str] = set()
    documents = []
    for fragment in list_fragments(list(source.paths)):
        for row in read_fragment(fragment, source.id_field, source.text_field, source.strict):
            if not isinstance(row, Document):
                continue
            if row.doc_id in seen:
                if source.strict:
                    raise CorpusError(f"{row.path}:{row.line}: duplicate id {row.doc_id!r}")
                continue
            seen.add(row.doc_id)
            documents.append((row.doc_id, row.text))
    if not documents:
        raise CorpusError(f"no documents in {', '.join(source.paths)}")
    return documents


def finite_or_none(value):
    """JSON has no NaN: undefined figures are written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_result(out: str | Path, name: str, body: dict) -> Path:
    """Write out/name (JSON) atomically, with the versions that produced it; returns its path."""
    from flows.provenance import versions
    from whence.factors import write_json

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    json.dumps(body, allow_nan=False)  # ValueError here, not a file a JSON reader rejects
    write_json(directory / name, {**body, "versions": versions()})
    return directory / name
