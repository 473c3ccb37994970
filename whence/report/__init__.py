"""The report of a `whence score` results directory, and the pieces notebooks use on their own.

    page.py        write_report / render_report: the self-contained HTML page (page.css, package data)
    summary.py     the summary table's labelled fields
    plots.py       per-layer influence and score-distribution plots (matplotlib, embedded PNG)
    highlight.py   tokens coloured by influence (highlight.css, package data)
    tail.py        the power-law fit of the score tail

Reading the results directory belongs to whence.results (load_results, Results, Influence). Pure: pyarrow,
numpy and matplotlib's Agg canvas, no Ray.

Notebook use:
    from IPython.display import HTML
    from whence.results import load_results
    results = load_results("runs/demo/results")
    top = results.top("q1")[0]             # an Influence; it renders itself highlighted in Jupyter
    HTML(highlight_tokens_html(top.tokens, top.token_scores))
"""

from whence.report.highlight import highlight_tokens_html
from whence.report.page import DEFAULT_MAX_SEQUENCES, render_report, write_report
from whence.report.plots import plot_layer_influence, plot_score_distribution
from whence.report.tail import DEFAULT_TAIL_FRACTION, fit_power_law_tail

__all__ = [
    "DEFAULT_MAX_SEQUENCES",
    "DEFAULT_TAIL_FRACTION",
    "fit_power_law_tail",
    "highlight_tokens_html",
    "plot_layer_influence",
    "plot_score_distribution",
    "render_report",
    "write_report",
]
