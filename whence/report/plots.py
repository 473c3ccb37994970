"""The report's plots, drawn on bare matplotlib Figures (Agg canvas: no pyplot state) and embedded as PNG <img>.

    plot_layer_influence       per-layer scores of a query's top sequences: sums by layer over a rank x layer heatmap
    plot_score_distribution    complementary CDF of the positive scores, log-log, with the fitted power-law tail
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import numpy as np

from whence.report.tail import fit_power_law_tail

PLOT_DPI = 110
# More tracked layers than this and the per-layer chart takes the report's full width.
WIDE_LAYER_PLOT_FROM = 40


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
