"""`whence eval bundled`: the bundled evaluation setup, `whence eval lds` then `whence eval trace` on a slice of the
demo corpus with a small model, sized for a 2-core machine (about half an hour).

    setup     flows/eval_assets/bundled.json: the slice's document ids and length, the pretraining recipe, the
              LDS and trace settings; flows/eval_assets/queries.jsonl: fact queries, each quoting a fact stated
              in one document of the slice ("source": its id)
    slice     the listed documents of the demo corpus (read with whence.corpus from flows/demo_assets/, however
              it is sharded), each cut to its first `max_chars` characters at a space    -> OUT/corpus.jsonl
    lds       `whence eval lds` with the recipe (the full model into OUT/lds/model)      -> OUT/lds/lds.json
    trace     `whence eval trace` with that model and the EK-FAC factors the LDS run fitted on its
              training windows                                                           -> OUT/trace/trace.json
Both steps resume: a rerun keeps the trained subset models.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from flows.options import positive_int

log = logging.getLogger("whence.eval.bundled")

ASSETS = Path(__file__).resolve().parent.parent / "eval_assets"
DEMO_ASSETS = Path(__file__).resolve().parent.parent / "demo_assets"
SETUP_FILE, QUERIES_FILE, SLICE_FILE = "bundled.json", "queries.jsonl", "corpus.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (resumed if unfinished)")
    parser.add_argument("--subsets", type=positive_int, default=None, help="M (default: the setup's)")
    parser.add_argument("--seeds", type=positive_int, default=None, help="S (default: the setup's)")
    parser.add_argument("--address", default=None, metavar="RAY_ADDRESS", help="Ray cluster to run on")


def run(args: argparse.Namespace) -> int:
    from flows.eval.lds import print_table
    from flows.eval.trace import print_trace_table

    lds, trace = run_bundled(Path(args.out), args.subsets, args.seeds, args.address)
    print_table(lds, Path(args.out) / "lds")
    print_trace_table(trace, Path(args.out) / "trace")
    return 0


def load_setup() -> dict:
    return json.loads((ASSETS / SETUP_FILE).read_text())


def write_slice(setup: dict, path: Path) -> Path:
    """The setup's documents of the demo corpus, cut to max_chars at a space, in the setup's order."""
    from whence.corpus import Document, list_fragments, read_fragment
    from whence.errors import CorpusError

    wanted, found = set(setup["documents"]), {}
    for fragment in list_fragments([str(DEMO_ASSETS)]):  # every corpus file there (queries rows lack text)
        for row in read_fragment(fragment, "id", "text"):
            if isinstance(row, Document) and row.doc_id in wanted and row.doc_id not in found:
                found[row.doc_id] = cut_text(row.text, setup["max_chars"])
    missing = sorted(wanted - set(found))
    if missing:
        raise CorpusError(f"the demo corpus in {DEMO_ASSETS} lacks the bundled setup's documents {missing[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": doc_id, "text": found[doc_id]}, ensure_ascii=False) + "\n"
                            for doc_id in setup["documents"]), encoding="utf-8")
    return path


def cut_text(text: str, max_chars: int) -> str:
    """The first max_chars characters, shortened to the last space so no word is cut."""
    if len(text) <= max_chars:
        return text
    space = text.rfind(" ", 0, max_chars)
    return text[: space if space > 0 else max_chars]


def run_bundled(out: Path, subsets: int | None = None, seeds: int | None = None, address: str | None = None):
    """(lds.json body, trace.json body) of the bundled setup, under out/."""
    from flows.cluster import ClusterSettings
    from flows.eval.lds import FACTORS_SUBDIR, LDSSettings, lds_corpus
    from flows.eval.lds_recipe import MODEL_SUBDIR
    from flows.eval.trace import TraceSettings, trace_corpus
    from flows.pretrain.settings import PretrainConfig
    from whence.corpus import CorpusSource

    setup = load_setup()
    corpus = CorpusSource([str(write_slice(setup, out / SLICE_FILE))])
    queries = str(ASSETS / QUERIES_FILE)
    lds_setup = setup["lds"]
    settings = LDSSettings(subsets=subsets or lds_setup["subsets"], seeds=seeds or lds_setup["seeds"],
                           fraction=lds_setup["fraction"], methods=tuple(lds_setup["methods"]))
    lds = lds_corpus(corpus, queries, str(out / "lds"), settings, recipe=PretrainConfig(**setup["recipe"]),
                     cluster=ClusterSettings(address=address))
    trace = trace_corpus(str(out / "lds" / MODEL_SUBDIR), str(out / "lds" / FACTORS_SUBDIR), corpus, queries,
                         str(out / "trace"), TraceSettings(methods=tuple(setup["trace"]["methods"]),
                                                           query_rank="full"))
    return lds, trace
