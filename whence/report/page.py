"""The HTML report of a results directory: one self-contained page, per query a section.

The page is one file: plots are embedded as base64 PNG, CSS (page.css and highlight.css, package data) is inline,
and nothing is fetched, so it opens from disk and can be mailed around. Per query: the prompt and completion,
the top sequences as a table, the per-layer and score-distribution plots, and (with per-token scores) every top
sequence's tokens coloured by influence.
"""

from __future__ import annotations

import datetime
import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from whence.redact import redact_text
from whence.report.highlight import HIGHLIGHT_CSS, format_score, stylesheet
from whence.report.plots import WIDE_LAYER_PLOT_FROM, plot_layer_influence, plot_score_distribution
from whence.report.summary import flatten, format_value, summary_rows
from whence.report.tail import DEFAULT_TAIL_FRACTION
from whence.results import REPORT_FILE, Influence, Results, load_results
from whence.text import Query

# Report size: per query, at most this many top sequences get a table row and a highlighted text block.
DEFAULT_MAX_SEQUENCES = 50

PAGE_CSS = stylesheet("page.css")


def write_report(
    results_dir: str | Path,
    out: str | Path | None = None,
    *,
    max_sequences: int = DEFAULT_MAX_SEQUENCES,
    tail_fraction: float = DEFAULT_TAIL_FRACTION,
) -> Path:
    """Write the results directory's report (default RESULTS_DIR/report.html) and return its path."""
    results = load_results(results_dir)
    path = Path(out) if out is not None else results.results_dir / REPORT_FILE
    document = render_report(results, max_sequences=max_sequences, tail_fraction=tail_fraction)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path


def render_report(
    results: Results,
    *,
    max_sequences: int = DEFAULT_MAX_SEQUENCES,
    tail_fraction: float = DEFAULT_TAIL_FRACTION,
) -> str:
    """The whole report as one HTML string."""
    title = f"Whence influence report: {results.results_dir.name}"
    nav = "".join(
        f'<li><a href="#q{i}">{html.escape(query.id)}</a></li>' for i, query in enumerate(results.queries)
    )
    sections = "".join(
        _query_section(results, i, query, max_sequences, tail_fraction)
        for i, query in enumerate(results.queries)
    )
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_CSS}{HIGHLIGHT_CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="lede">Which training sequences raise (red) or lower (blue) the log-probability of each '
        f"query's completion, by influence functions ({html.escape(results.method)}).</p>"
        f"{_summary_section(results)}"
        f'<nav><h2>Queries</h2><ol class="toc">{nav}</ol></nav>'
        f"{sections}"
        f"<footer>Generated {generated} from <code>{html.escape(str(results.results_dir))}</code>.</footer>"
        "</main></body></html>\n"
    )


def _summary_section(results: Results) -> str:
    manifest = results.manifest
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(results)
    )
    details = ""
    for key, heading in (("arguments", "Arguments"), ("versions", "Versions")):
        if manifest.get(key):
            inner = "".join(
                f"<tr><th>{html.escape(k)}</th><td>{html.escape(redact_text(format_value(v)))}</td></tr>"
                for k, v in flatten(manifest[key])  # redact_text: a run written before redaction may hold secrets
            )
            details += f'<details><summary>{heading}</summary><table class="kv">{inner}</table></details>'
    if results.layers:
        layer_list = "".join(f"<li><code>{html.escape(name)}</code></li>" for name in results.layers)
        details += f'<details><summary>Tracked layers</summary><ol class="layers">{layer_list}</ol></details>'
    return f'<section class="summary"><h2>Summary</h2><table class="kv">{table}</table>{details}</section>'


def _query_section(
    results: Results, index: int, query: Query, max_sequences: int, tail_fraction: float
) -> str:
    rows = results.influences.get(query.id, [])
    shown = rows[:max_sequences]
    anchor = f"q{index}"
    parts = [
        f'<section class="query" id="{anchor}"><h2>Query <code>{html.escape(query.id)}</code></h2>',
        '<div class="qa"><div class="label">prompt</div>'
        f'<pre class="prompt">{html.escape(query.prompt)}</pre>'
        '<div class="label">completion</div>'
        f'<pre class="completion">{html.escape(query.completion)}</pre></div>',
    ]
    if not rows:
        parts.append('<p class="note">No top-k rows for this query.</p></section>')
        return "".join(parts)

    note = f"Showing the top {len(shown)} of {len(rows)} sequences." if len(shown) < len(rows) else ""
    parts.append(
        f"<h3>Top {len(shown)} training sequences</h3>{_topk_table(shown, anchor, results.has_tokens)}"
    )
    if note:
        parts.append(f'<p class="note">{note}</p>')

    scores, source = results.score_distribution(query.id)
    distribution, alpha, xmin = plot_score_distribution(scores, source, tail_fraction)
    if math.isfinite(alpha):
        n_tail = int(np.sum(scores >= xmin))
        fit = (
            f"Tail exponent &alpha; = {alpha:.2f}: density ~ x<sup>&minus;&alpha;</sup>, fitted by maximum "
            f"likelihood to the {n_tail:,} largest scores (x &ge; {xmin:.3g})."
        )
    else:
        fit = "Too few positive scores to fit a power-law tail."
    if source != "all scored sequences":
        fit += " Only the top-k scores are available (save every score with --save-all-scores)."
    layer_figure = ""
    if results.layers:
        layer_class = ' class="wide"' if len(results.layers) > WIDE_LAYER_PLOT_FROM else ""
        layer_plot = plot_layer_influence(results.layer_matrix(query.id)[: len(shown)], results.layers)
        layer_figure = (
            f"<figure{layer_class}>{layer_plot}<figcaption>Per-layer scores of the top sequences; each row "
            "sums to its score.</figcaption></figure>"
        )
    parts.append(
        f'<div class="plots">{layer_figure}<figure>{distribution}<figcaption>{fit}</figcaption></figure></div>'
    )

    if results.has_tokens:
        parts.append("<h3>Influence of each token</h3>")
        for row in shown:
            parts.append(_sequence_block(row, anchor))
    parts.append("</section>")
    return "".join(parts)


def _topk_table(rows: Sequence[Influence], anchor: str, linked: bool) -> str:
    """The top-k rows; with a "predicted change" column (nats of log p(completion | prompt) from one more copy
    of the sequence, score / N) when the results record N."""
    limit = max((abs(row.score) for row in rows), default=0.0) or 1.0
    changes = any(row.predicted_change is not None for row in rows)
    body = []
    for row in rows:
        name = html.escape(row.title) if row.title else ""
        doc = f"<code>{html.escape(row.doc_id)}</code>"
        if linked and row.tokens is not None:
            doc = f'<a href="#{anchor}-r{row.rank}">{doc}</a>'
        width = 100.0 * min(abs(row.score) / limit, 1.0)
        sign = "pos" if row.score >= 0 else "neg"
        body.append(
            f'<tr><td class="num">{row.rank}</td><td>{doc}{"<br>" + name if name else ""}</td>'
            f'<td class="num">{row.chunk}</td><td class="num">{html.escape(format_score(row.score))}</td>'
            + (f'<td class="num">{html.escape(_format_change(row.predicted_change))}</td>' if changes else "")
            + f'<td class="barcell"><span class="bar {sign}" style="width:{width:.1f}%"></span></td></tr>'
        )
    return (
        '<table class="topk"><thead><tr><th class="num rank">rank</th><th>document</th>'
        '<th class="num chunk">chunk</th><th class="num score">score</th>'
        + ('<th class="num change" title="predicted change of log p(completion | prompt), in nats, if the '
           'sequence were added once more to the training set (score / N)">&Delta; log p (nats)</th>'
           if changes else "")
        + f'<th class="barcell"></th></tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _format_change(change: float | None) -> str:
    return "" if change is None else f"{change:+.3g}"


def _sequence_block(row: Influence, anchor: str) -> str:
    name = f" {html.escape(row.title)}" if row.title else ""
    header = (
        f'<div class="seqhead"><span class="rank">#{row.rank}</span>{name} '
        f"<code>{html.escape(row.doc_id)}</code> chunk {row.chunk} "
        f'<span class="score">score {html.escape(format_score(row.score))}</span></div>'
    )
    body = (
        row.highlight_html(standalone=False) or '<p class="note">No per-token scores for this sequence.</p>'
    )
    return f'<div class="seq" id="{anchor}-r{row.rank}">{header}{body}</div>'
