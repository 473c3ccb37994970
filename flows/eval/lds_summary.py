"""`whence eval lds`'s summary: OUT/lds.png (LDS per method with standard-error bars; one query's predicted
against measured changes) and OUT/lds.html (the table, the noise figures and the figure)."""

from __future__ import annotations

import html
from pathlib import Path

PNG_FILE = "lds.png"
HTML_FILE = "lds.html"


def plot_lds(body: dict, axes=None):
    """Draw lds.json's `body` on two matplotlib axes (made when not given): the LDS bars with +-1 standard error,
    and the example query's predicted change (nats) against its measured change per subset. Returns the figure."""
    if axes is None:
        import matplotlib.pyplot as plt  # the caller's backend (inline in a notebook; write_summary picks Agg)

        figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bars, scatter = axes
    names = list(body["methods"])
    values = [body["methods"][n]["lds"] or 0.0 for n in names]
    errors = [body["methods"][n]["stderr"] or 0.0 for n in names]
    bars.bar(names, values, yerr=errors, capsize=4, color="#4c72b0")
    bars.axhline(0.0, color="black", linewidth=0.8)
    bars.set_ylabel("LDS (mean Spearman over queries)")
    bars.set_title(f"{body['subsets']} subsets x {body['seeds']} seeds, fraction {body['fraction']}")
    bars.tick_params(axis="x", rotation=30)
    example = body.get("example")
    if example:
        scatter.scatter(example["predicted_change"], example["measured_change"], s=14, color="#dd8452")
        scatter.set_xlabel(f"predicted change of log p, nats ({example['method']})")
        scatter.set_ylabel("measured change f_m - f_full, nats")
        scatter.set_title(f"query {example['query_id']} (Spearman {example['lds']:.2f})")
    else:
        scatter.set_axis_off()
    figure = bars.figure
    figure.tight_layout()
    return figure


def write_summary(out: Path, body: dict) -> None:
    """OUT/lds.png and OUT/lds.html from lds.json's body."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure = plot_lds(body)
    figure.savefig(out / PNG_FILE, dpi=110)
    plt.close(figure)
    figure_cell = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{figure_cell(row['lds'])}</td>"
                   f"<td>{figure_cell(row['stderr'])}</td><td>{row['undefined']}</td></tr>"
                   for name, row in body["methods"].items())
    noise = body["noise"]
    (out / HTML_FILE).write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>whence eval lds</title></head><body>"
        f"<h1>Linear datamodeling score</h1><p>{body['subsets']} subsets x {body['seeds']} seeds, fraction "
        f"{body['fraction']}; {body['queries']} queries, {body['sequences']} training sequences.</p>"
        "<table border='1' cellpadding='4'><tr><th>method</th><th>LDS</th><th>stderr</th>"
        f"<th>undefined queries</th></tr>{rows}</table>"
        f"<p>Retraining noise: across subsets {figure_cell(noise['across_subsets_std'])} nats, across seeds "
        f"{figure_cell(noise['across_seeds_std'])} nats (the first should clearly exceed the second).</p>"
        f"<img src='{PNG_FILE}' alt='LDS per method, and predicted against measured changes'></body></html>\n")
