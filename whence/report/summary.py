"""The report's summary table: labelled fields of a results directory, each shown once, times in readable units.

The fields of manifest.json's "summary" (what `whence score` measured) are shown with the labels in
SUMMARY_FIELDS; HIDDEN_SUMMARY names those left out (shown elsewhere, copies of other fields, or internal
measurements that `whence bench` reads). A field not listed (a newer or older writer) gets a label made from
its key, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from whence.results import Results

# Labels of the manifest summary's fields (dotted keys for nested ones), in display order. Keys ending in "_s"
# and "seconds" are durations; a mapping is shown as "key: count, ...".
SUMMARY_FIELDS = {
    "sequences_scored": "Sequences scored", "documents": "Documents read", "fragments": "Corpus fragments",
    "bad_rows": "Bad rows skipped", "corpus.bad_by_reason": "Bad rows by reason", "workers": "Workers",
    "shards": "Pipeline stages per worker", "seconds": "Total time",
    "timings.prepare_queries_s": "Query preparation time", "timings.scan_s": "Corpus scan time",
    "timings.tfidf_s": "TF-IDF filtering time", "timings.score_s": "Scoring time",
    "timings.per_token_s": "Per-token scoring time",
}
HIDDEN_SUMMARY = (
    "queries",  # the table's "Queries" row counts them from the manifest's queries
    "corpus.documents",  # = documents
    "corpus.bad_rows",  # = bad_rows
    "timings.score_steady_",  # throughput after start-up, for `whence bench`
)


def summary_rows(results: Results) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table: the run, then what the manifest's summary holds."""
    manifest = results.manifest
    model = manifest.get("model") or {}
    n_rows = sum(len(rows) for rows in results.influences.values())
    rows: list[tuple[str, str]] = [
        ("Queries", f"{len(results.queries):,}"),
        ("Method", results.method),
        ("Model", str(model.get("path", "unknown"))),
        ("Model fingerprint", str(model.get("fingerprint", "unknown"))),
        ("Tracked layers", f"{len(results.layers):,}"),
        ("Top-k rows", f"{n_rows:,}"),
        ("Per-token scores", "yes" if results.has_tokens else "no (score with --per-token)"),
    ]
    if results.fisher_sequences:
        rows.append(("Fisher averaged over (N)", f"{results.fisher_sequences:,} sequences; predicted change = "
                     "score / N nats of log p(completion | prompt) from one more copy of a sequence"))
    if results.all_scores is not None:
        total = sum(scores.shape[0] for scores in results.all_scores.values())
        rows.append(("Saved scores (query, sequence)", f"{total:,}"))
    return rows + measured_rows(manifest.get("summary") or {})


def measured_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The labelled rows of a manifest's summary: known fields in SUMMARY_FIELDS order, then any others."""
    values = dict(flatten(summary, keep=("corpus.bad_by_reason",)))
    rows = []
    for key, label in SUMMARY_FIELDS.items():
        value = values.pop(key, None)
        if value is not None and value != {}:
            rows.append((label, _show(key, value)))
    for key, value in values.items():
        if not key.startswith(HIDDEN_SUMMARY):
            rows.append((_label_of(key, value), _show(key, value)))
    return rows


def flatten(mapping: Mapping[str, Any], prefix: str = "", keep: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, value) pairs; mappings at a key in `keep` stay whole."""
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name not in keep:
            items += flatten(value, prefix=f"{name}.", keep=keep)
        else:
            items.append((name, value))
    return items


def _label_of(key: str, value: Any) -> str:
    """A label for a field SUMMARY_FIELDS does not know: its last key in words ("skipped_rows" -> "Skipped
    rows"; a duration "filter_s" -> "Filter time")."""
    name = key.rsplit(".", 1)[-1]
    if _is_duration(key, value):
        return f"{name.removesuffix('_s').replace('_', ' ').capitalize()} time"
    return name.replace("_", " ").capitalize()


def _is_duration(key: str, value: Any) -> bool:
    return (key.endswith("_s") or key == "seconds") and isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(key: str, value: Any) -> str:
    if _is_duration(key, value):
        return format_duration(float(value))
    if isinstance(value, Mapping):
        return ", ".join(f"{name}: {format_value(count)}" for name, count in value.items())
    return format_value(value)


def format_duration(seconds: float) -> str:
    """412 ms, 12.5 s, 2 min 05 s, 1 h 02 min."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_value(value: Any) -> str:
    """A manifest value for a reader: counts with thousands separators, floats to 4 digits, lists joined."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)
