"""Read a `whence score` results directory and write a self-contained HTML report.

The report is one file: plots are embedded as base64 PNG, CSS is inline, and nothing is fetched, so it opens
from disk and can be mailed around. Everything here is pure (pyarrow, numpy, matplotlib's Agg canvas): no Ray.

Results directory (written by `whence score`; see DESIGN.md):
    manifest.json       command, arguments, tracked layers, queries, model, method, summary, versions
    topk.parquet        query_id, rank, doc_id, chunk, score, layer_scores     (required)
    tokens.parquet      query_id, rank, doc_id, chunk, tokens, token_scores    (optional, --per-token)
    scores.parquet      query_id, doc_id, chunk, score                         (optional, --save-all-scores)
    documents.parquet   doc_id, title                                          (optional)

Notebook use:
    from IPython.display import HTML
    results = load_results("runs/demo/results")
    top = results.top("q1")[0]             # an Influence; it renders itself highlighted in Jupyter
    HTML(highlight_tokens_html(top.tokens, top.token_scores))
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from whence.errors import WhenceError
from whence.text import Query

MANIFEST_FILE = "manifest.json"
TOPK_FILE = "topk.parquet"
TOKENS_FILE = "tokens.parquet"
SCORES_FILE = "scores.parquet"
DOCUMENTS_FILE = "documents.parquet"
REPORT_FILE = "report.html"

TOPK_COLUMNS = ("query_id", "rank", "doc_id", "chunk", "score", "layer_scores")
TOKENS_COLUMNS = ("query_id", "rank", "tokens", "token_scores")
SCORES_COLUMNS = ("query_id", "score")
DOCUMENTS_COLUMNS = ("doc_id", "title")

# Tail fit: the share of the positive scores (largest first) treated as the power-law tail, and the fewest
# points a fit is attempted on (below it the exponent is reported as nan rather than as noise).
DEFAULT_TAIL_FRACTION = 0.1
MIN_TAIL_POINTS = 5

# Report size: per query, at most this many top sequences get a table row and a highlighted text block.
DEFAULT_MAX_SEQUENCES = 50

# Diverging scale for token highlights (ColorBrewer RdBu ends): red raises log p(completion), blue lowers it.
POSITIVE_RGB = (178, 24, 43)
NEGATIVE_RGB = (33, 102, 172)
# Above this intensity the token's text turns white to stay readable on the dark background.
LIGHT_TEXT_FROM = 0.6
PLOT_DPI = 110
# More tracked layers than this and the per-layer chart takes the report's full width.
WIDE_LAYER_PLOT_FROM = 40


# ----------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Influence:
    """One row of topk.parquet, joined with its per-token scores (tokens.parquet) and title when present."""

    query_id: str
    rank: int
    doc_id: str
    chunk: int
    score: float
    layer_scores: np.ndarray  # (L,) in manifest layer order; sums to `score`
    title: str | None = None
    tokens: list[str] | None = None
    token_scores: np.ndarray | None = None  # (T,) sums to `score`

    def highlight_html(self, *, standalone: bool = True) -> str:
        """The sequence's text with tokens coloured by influence; '' when there are no per-token scores."""
        if self.tokens is None or self.token_scores is None:
            return ""
        return highlight_tokens_html(self.tokens, self.token_scores, standalone=standalone)

    def _repr_html_(self) -> str:  # Jupyter renders an Influence as its header and highlighted text
        name = html.escape(self.title or self.doc_id)
        header = (
            f"<div><b>#{self.rank}</b> {name} <code>{html.escape(self.doc_id)}</code> "
            f"chunk {self.chunk}, score {_fmt_score(self.score)}</div>"
        )
        return header + (self.highlight_html() or "<div><i>no per-token scores</i></div>")


@dataclass
class Results:
    """A loaded results directory. `top(query_id)` gives that query's influences, best first."""

    results_dir: Path
    manifest: dict[str, Any]
    layers: list[str]
    queries: list[Query]
    influences: dict[str, list[Influence]]  # query id -> rows sorted by rank
    all_scores: dict[str, np.ndarray] | None = None  # query id -> every saved score (scores.parquet)
    has_tokens: bool = False
    titles: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.manifest.get("method", "unknown"))

    def query(self, query_id: str) -> Query:
        for query in self.queries:
            if query.id == query_id:
                return query
        raise KeyError(f"no query {query_id!r} in {self.results_dir}")

    def top(self, query_id: str) -> list[Influence]:
        """The query's top-k influences, rank 1 (largest score) first."""
        if query_id not in self.influences:
            raise KeyError(f"no top-k rows for query {query_id!r} in {self.results_dir / TOPK_FILE}")
        return self.influences[query_id]

    def layer_matrix(self, query_id: str) -> np.ndarray:
        """(k, L) per-layer scores of the query's top-k sequences, rank-major."""
        rows = self.top(query_id)
        if not rows:
            return np.zeros((0, len(self.layers)))
        return np.stack([row.layer_scores for row in rows])

    def score_distribution(self, query_id: str) -> tuple[np.ndarray, str]:
        """The query's scores to study the distribution of, and where they come from.

        Every scored sequence when scores.parquet was saved, else only the top-k scores (a biased sample).
        """
        if self.all_scores is not None and query_id in self.all_scores:
            return self.all_scores[query_id], "all scored sequences"
        return np.array([row.score for row in self.influences.get(query_id, [])]), "top-k only"

    def highlight(self, query_id: str, rank: int) -> str:
        """HTML of the rank-th sequence's tokens coloured by influence, with its CSS (for IPython.display.HTML)."""
        for row in self.top(query_id):
            if row.rank == rank:
                if row.tokens is None:
                    raise WhenceError(
                        f"no per-token scores for query {query_id!r} rank {rank}: "
                        f"{self.results_dir / TOKENS_FILE} is missing (score with --per-token)"
                    )
                return row.highlight_html()
        raise KeyError(f"query {query_id!r} has no rank {rank}")


def load_results(results_dir: str | Path) -> Results:
    """Load manifest.json, topk.parquet and, when present, tokens/scores/documents.parquet.

    Raises WhenceError naming the file when a required file or column is missing.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise WhenceError(f"results directory {results_dir} does not exist (write it with `whence score`)")
    manifest = _read_manifest(results_dir / MANIFEST_FILE)
    layers = [str(name) for name in manifest.get("layers", [])]

    topk_path = results_dir / TOPK_FILE
    topk = _read_table(topk_path, TOPK_COLUMNS, required=True)
    titles = _read_titles(results_dir / DOCUMENTS_FILE)
    tokens = _read_tokens(results_dir / TOKENS_FILE)

    influences: dict[str, list[Influence]] = {}
    columns = {name: topk.column(name).to_pylist() for name in TOPK_COLUMNS}
    for i in range(topk.num_rows):
        query_id, rank = str(columns["query_id"][i]), int(columns["rank"][i])
        layer_scores = np.asarray(columns["layer_scores"][i] or [], dtype=np.float64)
        if layers and layer_scores.shape[0] != len(layers):
            raise WhenceError(
                f"{topk_path}: query {query_id!r} rank {rank} has {layer_scores.shape[0]} layer scores "
                f"but {MANIFEST_FILE} lists {len(layers)} layers"
            )
        doc_id = str(columns["doc_id"][i])
        token_row = tokens.get((query_id, rank)) if tokens is not None else None
        influences.setdefault(query_id, []).append(
            Influence(
                query_id=query_id,
                rank=rank,
                doc_id=doc_id,
                chunk=int(columns["chunk"][i]),
                score=float(columns["score"][i]),
                layer_scores=layer_scores,
                title=titles.get(doc_id),
                tokens=token_row[0] if token_row else None,
                token_scores=token_row[1] if token_row else None,
            )
        )
    for rows in influences.values():
        rows.sort(key=lambda row: row.rank)
    if not layers and influences:  # an older manifest without layer names: number them
        width = next(iter(influences.values()))[0].layer_scores.shape[0]
        layers = [f"layer {i}" for i in range(width)]

    queries = [
        Query(id=str(q.get("id")), prompt=str(q.get("prompt", "")), completion=str(q.get("completion", "")))
        for q in manifest.get("queries", [])
    ]
    known = {query.id for query in queries}
    queries += [
        Query(id=query_id, prompt="", completion="") for query_id in influences if query_id not in known
    ]

    return Results(
        results_dir=results_dir,
        manifest=manifest,
        layers=layers,
        queries=queries,
        influences=influences,
        all_scores=_read_all_scores(results_dir / SCORES_FILE),
        has_tokens=tokens is not None,
        titles=titles,
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WhenceError(f"{path} is missing: not a `whence score` results directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise WhenceError(f"{path} is not valid JSON: line {error.lineno}: {error.msg}") from error
    if not isinstance(manifest, dict):
        raise WhenceError(f"{path} must hold a JSON object")
    return manifest


def _read_table(path: Path, columns: Sequence[str], *, required: bool) -> pa.Table | None:
    if not path.is_file():
        if required:
            raise WhenceError(f"{path} is missing: `whence score` writes it; was the run finished?")
        return None
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise WhenceError(f"{path} is not a readable Parquet file: {error}") from error
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise WhenceError(f"{path} lacks column(s) {', '.join(missing)}")
    return pq.read_table(path, columns=list(columns))


def _read_titles(path: Path) -> dict[str, str]:
    table = _read_table(path, DOCUMENTS_COLUMNS, required=False)
    if table is None:
        return {}
    ids, titles = table.column("doc_id").to_pylist(), table.column("title").to_pylist()
    return {str(doc_id): str(title) for doc_id, title in zip(ids, titles) if title is not None}


def _read_tokens(path: Path) -> dict[tuple[str, int], tuple[list[str], np.ndarray]] | None:
    table = _read_table(path, TOKENS_COLUMNS, required=False)
    if table is None:
        return None
    rows: dict[tuple[str, int], tuple[list[str], np.ndarray]] = {}
    columns = {name: table.column(name).to_pylist() for name in TOKENS_COLUMNS}
    for i in range(table.num_rows):
        key = (str(columns["query_id"][i]), int(columns["rank"][i]))
        tokens = [str(token) for token in columns["tokens"][i] or []]
        scores = np.asarray(columns["token_scores"][i] or [], dtype=np.float64)
        if len(tokens) != scores.shape[0]:
            raise WhenceError(
                f"{path}: query {key[0]!r} rank {key[1]} has {len(tokens)} tokens but {scores.shape[0]} scores"
            )
        rows[key] = (tokens, scores)
    return rows


def _read_all_scores(path: Path) -> dict[str, np.ndarray] | None:
    """Group scores.parquet by query without a Python loop over its (possibly many million) rows."""
    table = _read_table(path, SCORES_COLUMNS, required=False)
    if table is None:
        return None
    encoded = table.column("query_id").combine_chunks().cast(pa.string()).dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = [str(name) for name in encoded.dictionary.to_pylist()]
    scores = table.column("score").to_numpy().astype(np.float64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    return {name: scores[order[bounds[j] : bounds[j + 1]]] for j, name in enumerate(names)}


# --------------------------------------------------------------------------------------- the tail fit


def fit_power_law_tail(
    values: Sequence[float] | np.ndarray, tail_fraction: float = DEFAULT_TAIL_FRACTION
) -> tuple[float, float]:
    """Fit a power law p(x) ~ x^-alpha to the largest positive values; return (alpha, xmin).

    xmin is the smallest value of the tail, the top `tail_fraction` of the positive values (at least
    MIN_TAIL_POINTS of them). alpha is the continuous maximum-likelihood estimate of Clauset, Shalizi & Newman
    2009 (Eq. 3.1): alpha = 1 + n / sum_i log(x_i / xmin) over the n tail values x_i >= xmin. The complementary
    CDF of the tail then falls as x^-(alpha - 1). Returns (nan, nan) when fewer than MIN_TAIL_POINTS values are
    positive or the tail is degenerate (all equal).
    """
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = np.sort(x[np.isfinite(x) & (x > 0)])[::-1]  # positive values, largest first
    if x.shape[0] < MIN_TAIL_POINTS:
        return math.nan, math.nan
    n = min(x.shape[0], max(MIN_TAIL_POINTS, math.ceil(tail_fraction * x.shape[0])))
    tail = x[:n]
    xmin = float(tail[-1])
    log_ratio_sum = float(np.sum(np.log(tail / xmin)))
    if log_ratio_sum <= 0.0:
        return math.nan, xmin
    return 1.0 + n / log_ratio_sum, xmin


# ----------------------------------------------------------------------------------- token highlights


def _token_style(value: float, scale: float) -> str:
    """Background blending white into red (positive) or blue (negative) by |value| / scale."""
    if not math.isfinite(value) or scale <= 0.0:
        return ""
    t = min(abs(value) / scale, 1.0)
    if t == 0.0:
        return ""
    base = POSITIVE_RGB if value > 0 else NEGATIVE_RGB
    r, g, b = (round(255 + (c - 255) * t) for c in base)
    style = f"background:rgb({r},{g},{b})"
    return style + (";color:#fff" if t >= LIGHT_TEXT_FROM else "")


def highlight_tokens_html(
    tokens: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    *,
    scale: float | None = None,
    standalone: bool = True,
) -> str:
    """A <div> with one <span> per token, coloured by its influence; hovering shows the value.

    Colours are diverging (red raises the query's log-probability, blue lowers it) and scaled per sequence
    (`scale` defaults to the largest |score|). Whitespace is kept (`white-space: pre-wrap`); a newline token is
    drawn as a visible return mark before the line break so that its colour shows. All text is escaped.
    `standalone` prefixes the <style> rules the block needs, for IPython.display.HTML; the report, which
    carries them once in its head, passes False.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    if len(tokens) != values.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {values.shape[0]} scores")
    finite = values[np.isfinite(values)]
    if scale is None:
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    spans = []
    for token, value in zip(tokens, values):
        text = html.escape(str(token))
        if "\n" in text:
            text = text.replace("\n", '<span class="nl">\u21b5</span>\n')
        title = html.escape(f"{_fmt_score(float(value))}  {str(token)!r}", quote=True)
        style = _token_style(float(value), scale)
        style_attr = f' style="{style}"' if style else ""
        spans.append(f'<span class="tok"{style_attr} title="{title}">{text}</span>')
    legend = (
        f'<div class="legend"><span class="swatch neg"></span>{html.escape(_fmt_score(-scale))}'
        f'<span class="swatch zero"></span>0<span class="swatch pos"></span>{html.escape(_fmt_score(scale))}'
        f'<span class="sum">token scores sum to {html.escape(_fmt_score(float(finite.sum())))}</span></div>'
    )
    block = f'<div class="highlight"><div class="tokens">{"".join(spans)}</div>{legend}</div>'
    return _HIGHLIGHT_CSS + block if standalone else block


# ------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    # A bare Figure on an Agg canvas: no pyplot state, no GUI backend, nothing global to switch; safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_img(fig, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{data}">'


def _short_layer_names(layers: Sequence[str]) -> list[str]:
    """Drop the dotted prefix all layer names share ("model.layers.0.mlp.up_proj" -> "0.mlp.up_proj")."""
    if len(layers) < 2:
        return [name.replace("$", r"\$") for name in layers]
    parts = [name.split(".") for name in layers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]).replace("$", r"\$") for p in parts]  # "$" would start matplotlib mathtext


def plot_layer_influence(layer_scores: np.ndarray, layers: Sequence[str]) -> str:
    """Bar chart of each layer's score summed over the top-k, above a rank x layer heatmap; an <img>."""
    import matplotlib.colors as mcolors

    k, n_layers = layer_scores.shape
    names = _short_layer_names(layers)
    wide = n_layers > WIDE_LAYER_PLOT_FROM
    fig = _figure(12.0 if wide else 6.0, 4.2)
    bars, heat = fig.subplots(2, 1, sharex=True, height_ratios=[1.0, 1.3])

    summed = layer_scores.sum(axis=0)
    positions = np.arange(n_layers)
    colours = ["#b2182b" if value >= 0 else "#2166ac" for value in summed]
    bars.bar(positions, summed, color=colours, width=0.8)
    bars.axhline(0.0, color="#444", linewidth=0.8)
    bars.set_ylabel(f"sum, top {k}", fontsize=8)
    bars.set_title("Influence by layer", loc="left", fontsize=10)
    bars.tick_params(labelsize=7)
    bars.grid(axis="y", alpha=0.3)

    limit = float(np.max(np.abs(layer_scores))) if layer_scores.size else 1.0
    norm = mcolors.TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit) if limit > 0 else None
    image = heat.imshow(
        layer_scores,
        aspect="auto",
        cmap="RdBu_r",
        norm=norm,
        interpolation="nearest",
        extent=(-0.5, n_layers - 0.5, k + 0.5, 0.5),
    )
    heat.set_ylabel("rank", fontsize=8)
    heat.set_yticks(_ticks(k, 6, start=1))
    step = max(1, math.ceil(n_layers / (60 if wide else 32)))
    heat.set_xticks(positions[::step])
    heat.set_xticklabels(names[::step], rotation=60, ha="right", rotation_mode="anchor", fontsize=6)
    heat.tick_params(axis="y", labelsize=7)
    colorbar = fig.colorbar(image, ax=[bars, heat], shrink=0.6, pad=0.01, aspect=25)
    colorbar.set_label("score", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    return _png_img(fig, "per-layer influence of the top sequences")


def _ticks(count: int, most: int, start: int = 0) -> list[int]:
    step = max(1, math.ceil(count / most))
    return list(range(start, start + count, step))


def plot_score_distribution(
    scores: np.ndarray, source: str, tail_fraction: float
) -> tuple[str, float, float]:
    """Complementary CDF of the positive scores on log-log axes with the fitted tail; (<img>, alpha, xmin)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.sort(scores[np.isfinite(scores) & (scores > 0)])
    alpha, xmin = fit_power_law_tail(positive, tail_fraction)
    fig = _figure(6.0, 4.2)
    ax = fig.subplots()
    n = positive.shape[0]
    if n:
        ccdf = 1.0 - np.arange(n) / n  # P(X >= x_i) for the sorted values
        ax.loglog(
            positive,
            ccdf,
            marker="." if n < 200 else None,
            linestyle="-" if n >= 200 else "none",
            color="#333",
            markersize=4,
            label=f"positive scores ({n:,} of {scores.shape[0]:,}, {source})",
        )
        if math.isfinite(alpha):
            tail_share = float(np.mean(positive >= xmin))
            xs = np.geomspace(xmin, positive[-1], 50)
            ax.loglog(
                xs,
                tail_share * (xs / xmin) ** (1.0 - alpha),
                color="#b2182b",
                linewidth=2,
                label=f"power-law tail fit: \u03b1 = {alpha:.2f} (x \u2265 {xmin:.3g})",
            )
        ax.legend(fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no positive scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("influence score")
    ax.set_ylabel("P(score >= x)")
    ax.set_title("Distribution of scores", loc="left", fontsize=10)
    ax.grid(which="both", alpha=0.25)
    return _png_img(fig, "complementary CDF of the positive scores, log-log"), alpha, xmin


# -------------------------------------------------------------------------------------------- the report


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
        f"<style>{_PAGE_CSS}{_HIGHLIGHT_CSS_RULES}</style></head><body><main>"
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
    if results.all_scores is not None:
        total = sum(scores.shape[0] for scores in results.all_scores.values())
        rows.append(("Saved scores (query, sequence)", f"{total:,}"))
    rows += [(key, _fmt_value(key, value)) for key, value in _flatten(manifest.get("summary") or {})]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    details = ""
    for key, heading in (("arguments", "Arguments"), ("versions", "Versions")):
        if manifest.get(key):
            inner = "".join(
                f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt_value(k, v))}</td></tr>"
                for k, v in _flatten(manifest[key])
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
    limit = max((abs(row.score) for row in rows), default=0.0) or 1.0
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
            f'<td class="num">{row.chunk}</td><td class="num">{html.escape(_fmt_score(row.score))}</td>'
            f'<td class="barcell"><span class="bar {sign}" style="width:{width:.1f}%"></span></td></tr>'
        )
    return (
        '<table class="topk"><thead><tr><th class="num rank">rank</th><th>document</th>'
        '<th class="num chunk">chunk</th><th class="num score">score</th>'
        f'<th class="barcell"></th></tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _sequence_block(row: Influence, anchor: str) -> str:
    name = f" {html.escape(row.title)}" if row.title else ""
    header = (
        f'<div class="seqhead"><span class="rank">#{row.rank}</span>{name} '
        f"<code>{html.escape(row.doc_id)}</code> chunk {row.chunk} "
        f'<span class="score">score {html.escape(_fmt_score(row.score))}</span></div>'
    )
    body = (
        row.highlight_html(standalone=False) or '<p class="note">No per-token scores for this sequence.</p>'
    )
    return f'<div class="seq" id="{anchor}-r{row.rank}">{header}{body}</div>'


# ------------------------------------------------------------------------------------------- formatting


def _fmt_score(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == 0.0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:+.4g}"
    return f"{value:+.3e}"


def _fmt_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        lowered = key.lower()
        if lowered.endswith(("_s", "seconds", "_sec")) or "time" in lowered:
            return f"{value:,.1f} s" if value >= 1 else f"{value * 1000:.0f} ms"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items += _flatten(value, prefix=f"{name}.")
        else:
            items.append((name, value))
    return items


# ------------------------------------------------------------------------------------------------- style

_HIGHLIGHT_CSS_RULES = """
.highlight{margin:.25rem 0 1rem}
.highlight .tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
  line-height:1.75;white-space:pre-wrap;overflow-wrap:anywhere;background:#fff;border:1px solid #ddd;
  border-radius:6px;padding:.6rem .8rem;max-height:22rem;overflow-y:auto;color:#111}
.highlight .tok{border-radius:2px}
.highlight .tok:hover{outline:1px solid #111}
.highlight .nl{opacity:.45}
.highlight .legend{font-size:12px;color:#555;margin-top:.3rem;display:flex;align-items:center;gap:.35rem}
.highlight .swatch{display:inline-block;width:1.1rem;height:.8rem;border:1px solid #ccc;border-radius:2px}
.highlight .swatch.neg{background:rgb(33,102,172)}.highlight .swatch.zero{background:#fff}
.highlight .swatch.pos{background:rgb(178,24,43)}
.highlight .sum{margin-left:1rem}
"""
_HIGHLIGHT_CSS = f"<style>{_HIGHLIGHT_CSS_RULES}</style>"

_PAGE_CSS = """
:root{--ink:#1d1f23;--muted:#5f6670;--line:#e2e4e8;--bg:#f6f7f9;--pos:#b2182b;--neg:#2166ac}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
  font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:1.5rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.2rem 0 .3rem}
h2{font-size:1.25rem;margin:0 0 .7rem}
h3{font-size:1.02rem;margin:1.2rem 0 .5rem;color:#333}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;overflow-wrap:anywhere}
.lede{color:var(--muted);margin:0 0 1.2rem}
section,nav{background:#fff;border:1px solid var(--line);border-radius:10px;padding:1.1rem 1.3rem;
  margin:0 0 1.2rem}
table{border-collapse:collapse}
table.kv th{text-align:left;font-weight:600;padding:.2rem 1.2rem .2rem 0;color:#333;vertical-align:top}
table.kv td{padding:.2rem 0;overflow-wrap:anywhere}
details{margin-top:.6rem}
summary{cursor:pointer;color:var(--muted)}
ol.layers{columns:3;font-size:12px}
ol.toc{columns:3;margin:0;padding-left:1.4rem}
.qa{display:grid;grid-template-columns:max-content 1fr;gap:.3rem .8rem;align-items:start}
.qa .label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);padding-top:.45rem}
.qa pre{margin:0;padding:.45rem .7rem;border-radius:6px;white-space:pre-wrap;overflow-wrap:anywhere;
  font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
.qa .prompt{background:#f1f3f5}
.qa .completion{background:#fdf1ee;border-left:3px solid var(--pos)}
table.topk{width:100%;font-size:14px}
table.topk th{text-align:left;border-bottom:2px solid var(--line);padding:.3rem .5rem;color:#333}
table.topk td{border-bottom:1px solid var(--line);padding:.3rem .5rem;vertical-align:top}
table.topk td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.topk th.barcell,table.topk td.barcell{width:25%}
table.topk .rank,table.topk .chunk{width:4.5rem}
table.topk .score{width:7rem}
table.topk th.num{text-align:right}
.bar{display:inline-block;height:.7rem;border-radius:2px}
.bar.pos{background:var(--pos)}.bar.neg{background:var(--neg)}
.plots{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start;margin-top:1rem}
figure{margin:0;flex:1 1 420px;min-width:0}
figure.wide{flex-basis:100%}
figcaption{font-size:13px;color:var(--muted);margin-top:.3rem}
img.plot{max-width:100%;height:auto;display:block}
.seq{margin-top:.8rem}
.seqhead{font-size:14px;margin-bottom:.2rem}
.seqhead .rank{font-weight:700;margin-right:.3rem}
.seqhead .score{color:var(--muted);margin-left:.4rem}
.note{color:var(--muted);font-size:13px}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:1.5rem}
"""
