"""Checks a resumed `whence score` makes of what an earlier attempt left, and what the factors say about N.

    discard_damaged_queries   queries.safetensors is reused only when it matches its checksum and holds the
                              run's queries; otherwise prepared again, with a warning naming it
    fisher_sequences          N for the predicted_change column (whence.evaluation.interpret)

Damaged parts are judged by whence.fragment_parts.verified_parts, and the scores pieces an earlier attempt left
of a fragment it did not finish are removed before the fragment is scored again (flows.score); changed inputs
are judged by the fingerprints in the run's arguments (whence.fingerprints).
"""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace
from typing import TYPE_CHECKING

from flows.run_state import PARTS
from whence.checksums import remove_with_checksum
from whence.results import CANDIDATES_FILE
from whence.scoring import prepared_queries_problem

if TYPE_CHECKING:
    from flows.score import ScoringRun

log = logging.getLogger("whence.score")


def discard_damaged_queries(run: ScoringRun) -> None:
    """A queries.safetensors left by an earlier attempt (the run's or a baseline's) is reused only if it matches
    its checksum and holds these queries; otherwise it is removed (to be prepared again) with a warning, and with
    it the parts scored against other queries."""
    for path in run.queries_files:
        if not path.exists():
            continue
        problem, stale = prepared_queries_problem(path, run.query_ids)
        if problem is None:
            continue
        log.warning("%s: %s; preparing the queries again", path, problem)
        remove_with_checksum(path)
        if stale:
            shutil.rmtree(run.state.path / PARTS, ignore_errors=True)
            (run.state.path / CANDIDATES_FILE).unlink(missing_ok=True)


def fisher_sequences(factors_manifest: dict) -> int | None:
    """N, the sequences the factors averaged the Fisher over (whence.evaluation.interpret); None if unrecorded."""
    from whence.evaluation.interpret import fitting_sequence_count

    try:
        return fitting_sequence_count(SimpleNamespace(metadata=factors_manifest))
    except ValueError:
        return None
