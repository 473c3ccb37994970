"""ekfac-cg's fitting sequences for `whence score`: the first --refine-sequences sequences of the corpus the
factors were fitted on (their manifest's corpus, fields, seq_len and seed), or of the scored corpus when the
factors do not name theirs (factors fitted in process) or it cannot be listed from the preparation task (a
relative path from another directory): then with a warning, and `describe` says which. Bad rows and later
duplicates are skipped as fitting skips them. Their token ids are kept (M x seq_len integers); the preparation
task streams them through the model once per conjugate-gradient step (whence.refine)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from itertools import islice
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.score import ScoringRun
    from whence.factors import Factors

log = logging.getLogger("whence.score")


def refinement(tokenizer, run: ScoringRun, factors: Factors) -> tuple[Callable[[], Iterator[dict]] | None, object, dict]:
    """What whence.queries.prepare_queries takes for run.config.method: (fitting batches, RefineSettings, notes for
    RESULTS_DIR/refine.json); (None, RefineSettings, {}) for a method other than ekfac-cg."""
    from whence.refine import RefineSettings

    config = run.config
    settings = RefineSettings(config.refine_steps, config.refine_tolerance)
    if config.method != "ekfac-cg":
        return None, settings, {}
    batches, where, count = refine_batches(tokenizer, run, factors)
    return batches, settings, {"sequences": count, "fisher_corpus": where, "tolerance": config.refine_tolerance}


def refine_batches(tokenizer, run: ScoringRun, factors: Factors) -> tuple[Callable[[], Iterator[dict]], str, int]:
    """(a fresh iterator of collated batches per call: run.config.batch_size sequences with the fit's label seeds,
    which corpus they come from, how many sequences)."""
    from flows.corpus_pipeline import ReadSettings, fragment_sequences, reduce_scans
    from flows.scan_cache import cached_scan
    from whence.api import sequence_batches
    from whence.corpus import CorpusSource, list_fragments
    from whence.errors import CorpusError
    from whence.refine import fitted_fisher

    arguments = factors.metadata.get("arguments") or {}
    fragments, settings, where = run.fragments, run.settings, "the scored corpus"
    if arguments.get("corpus"):
        corpus = CorpusSource(arguments["corpus"], arguments.get("id_field", "id"), arguments.get("text_field", "text"))
        try:
            fragments, where = list_fragments(list(corpus.paths)), f"the factors' corpus {', '.join(corpus.paths)}"
            settings = ReadSettings.for_corpus(run.settings.tokenizer_path, int(arguments.get("seq_len", 512)), corpus)
        except CorpusError as error:
            log.warning("ekfac-cg: the factors' corpus cannot be read here (%s); using the scored corpus", error)

    # The rows fitting skipped are skipped here too (bad rows are, by fragment_documents; later duplicates by the
    # scan's skip lines), so G is the Fisher of the sequences the factors were fitted on. The fit cached the scan.
    scans, _ = cached_scan(fragments, settings)
    skip = reduce_scans(scans)[1]

    def sequences():
        for fragment in fragments:
            yield from fragment_sequences(fragment, settings, skip.get(fragment.index, frozenset()))

    kept = list(islice(sequences(), run.config.refine_sequences))
    if not kept:
        raise CorpusError(f"ekfac-cg: no fitting sequences in {where}")
    seed, batch_size = fitted_fisher(factors)[1], run.config.batch_size
    return lambda: (batch for _, batch in sequence_batches(tokenizer, kept, batch_size, seed)), where, len(kept)
