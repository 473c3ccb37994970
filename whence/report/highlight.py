"""Token highlighting: a sequence's text with every token coloured by its share of the influence.

The block is HTML with its CSS in highlight.css (package data); `highlight_tokens_html(..., standalone=True)`
carries the rules with it (for IPython.display.HTML), the report includes them once in its head.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from importlib import resources

import numpy as np

# Diverging scale for token highlights (ColorBrewer RdBu ends): red raises log p(completion), blue lowers it.
POSITIVE_RGB = (178, 24, 43)
NEGATIVE_RGB = (33, 102, 172)
# Above this intensity the token's text turns white to stay readable on the dark background.
LIGHT_TEXT_FROM = 0.6


def stylesheet(name: str) -> str:
    """A CSS file shipped in this package (whence/report/*.css)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


HIGHLIGHT_CSS = stylesheet("highlight.css")


def format_score(value: float) -> str:
    """A score as shown to a reader: signed, 4 significant digits, scientific outside [1e-3, 1e4)."""
    if not math.isfinite(value):
        return str(value)
    if value == 0.0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:+.4g}"
    return f"{value:+.3e}"


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
        title = html.escape(f"{format_score(float(value))}  {str(token)!r}", quote=True)
        style = _token_style(float(value), scale)
        style_attr = f' style="{style}"' if style else ""
        spans.append(f'<span class="tok"{style_attr} title="{title}">{text}</span>')
    legend = (
        f'<div class="legend"><span class="swatch neg"></span>{html.escape(format_score(-scale))}'
        f'<span class="swatch zero"></span>0<span class="swatch pos"></span>{html.escape(format_score(scale))}'
        f'<span class="sum">token scores sum to {html.escape(format_score(float(finite.sum())))}</span></div>'
    )
    block = f'<div class="highlight"><div class="tokens">{"".join(spans)}</div>{legend}</div>'
    return f"<style>{HIGHLIGHT_CSS}</style>" + block if standalone else block
