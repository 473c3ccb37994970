"""The HTML report: built from synthetic results directories in the `whence score` format (DESIGN.md)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from whence.errors import WhenceError
from whence.report import fit_power_law_tail, highlight_tokens_html, write_report
from whence.results import load_results

LAYERS = [f"model.layers.{i}.mlp.{name}" for i in range(3) for name in ("gate_proj", "up_proj", "down_proj")]
QUERIES = [
    {"id": "q-capital", "prompt": "The capital of France is", "completion": " Paris."},
    {"id": "q<evil>&", "prompt": "Say <b>bold</b> & stop", "completion": " </pre><script>alert(1)</script>"},
]
TOP_K = 4
N_SEQUENCES = 300
EVIL_TEXT = "<script>alert('x')</script>"
SUM_TOLERANCE = 1e-9


def _split(values: np.ndarray, total: float, rng: np.random.Generator) -> np.ndarray:
    """Random parts that sum to `total` (like layer or token scores summing to the score)."""
    parts = values * rng.uniform(-1.0, 1.0, size=values.shape)
    return parts - (parts.sum() - total) / parts.shape[0]


def make_results_dir(
    root: Path, *, tokens: bool = True, all_scores: bool = True, documents: bool = True
) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "command": "score",
        "arguments": {"top_k": TOP_K, "per_token": tokens, "damping": "heuristic"},
        "layers": LAYERS,
        "queries": QUERIES,
        "model": {"path": "runs/tiny-llama", "fingerprint": "sha256:abc123"},
        "method": "ekfac",
        "summary": {
            "sequences_scored": N_SEQUENCES,
            "skipped_rows": 2,
            "timings": {"score_s": 12.5, "filter_s": 0.4},
        },
        "versions": {"whence": "0.1.0", "torch": "2.13.0"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))

    docs = [f"doc-{i}" for i in range(N_SEQUENCES)]
    docs[7] = "doc-<script>"
    topk, token_rows, score_rows = [], [], []
    for query in QUERIES:
        # Pareto-tailed scores with some negatives, like real influence distributions.
        scores = rng.pareto(1.5, size=N_SEQUENCES) * rng.choice([1.0, -0.3], size=N_SEQUENCES, p=[0.8, 0.2])
        scores[7] = scores.max() * 2.0  # the evil document ranks first
        for i, score in enumerate(scores):
            score_rows.append(
                {"query_id": query["id"], "doc_id": docs[i], "chunk": i % 3, "score": float(score)}
            )
        for rank, i in enumerate(np.argsort(-scores)[:TOP_K], start=1):
            score = float(scores[i])
            topk.append(
                {
                    "query_id": query["id"],
                    "rank": rank,
                    "doc_id": docs[i],
                    "chunk": int(i % 3),
                    "score": score,
                    "layer_scores": _split(np.ones(len(LAYERS)), score, rng).tolist(),
                }
            )
            words = (EVIL_TEXT if i == 7 else f"Document {i} says").split(" ") + [
                "\n",
                "  indented",
                " line",
                ".",
            ]
            pieces = [words[0]] + [w if w.startswith(("\n", " ")) else " " + w for w in words[1:]]
            token_rows.append(
                {
                    "query_id": query["id"],
                    "rank": rank,
                    "doc_id": docs[i],
                    "chunk": int(i % 3),
                    "tokens": pieces,
                    "token_scores": _split(np.ones(len(pieces)), score, rng).tolist(),
                }
            )
    pq.write_table(pa.Table.from_pylist(topk), root / "topk.parquet")
    if tokens:
        pq.write_table(pa.Table.from_pylist(token_rows), root / "tokens.parquet")
    if all_scores:
        pq.write_table(pa.Table.from_pylist(score_rows), root / "scores.parquet")
    if documents:
        titles = [{"doc_id": d, "title": f"Title of {d}" if d != "doc-<script>" else EVIL_TEXT} for d in docs]
        pq.write_table(pa.Table.from_pylist(titles), root / "documents.parquet")
    return root


@pytest.mark.parametrize("with_optional", [True, False], ids=["tokens+scores", "topk-only"])
def test_report_is_self_contained_and_complete(tmp_path: Path, with_optional: bool) -> None:
    results_dir = make_results_dir(
        tmp_path / "results", tokens=with_optional, all_scores=with_optional, documents=with_optional
    )
    path = write_report(results_dir)
    assert path == results_dir / "report.html"
    page = path.read_text(encoding="utf-8")

    for query in QUERIES:
        assert _escaped(query["id"]) in page
        assert _escaped(query["completion"]) in page
    n_blocks = page.count('class="highlight"')
    assert n_blocks == (len(QUERIES) * TOP_K if with_optional else 0)
    # Two plots per query, embedded; nothing fetched from elsewhere.
    assert page.count('src="data:image/png;base64,') == 2 * len(QUERIES)
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    # Text from the data is escaped everywhere: the page has no script element at all.
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    assert "Title of doc-1" in page or not with_optional


def test_loaded_results_sum_rules_and_order(tmp_path: Path) -> None:
    results = load_results(make_results_dir(tmp_path / "results"))
    assert [q.id for q in results.queries] == [q["id"] for q in QUERIES]
    assert results.layers == LAYERS and results.method == "ekfac"
    for query in QUERIES:
        rows = results.top(query["id"])
        assert [row.rank for row in rows] == list(range(1, TOP_K + 1))
        assert all(a.score >= b.score for a, b in zip(rows, rows[1:]))
        for row in rows:
            assert math.isclose(
                row.layer_scores.sum(), row.score, rel_tol=SUM_TOLERANCE, abs_tol=SUM_TOLERANCE
            )
            assert math.isclose(
                row.token_scores.sum(), row.score, rel_tol=SUM_TOLERANCE, abs_tol=SUM_TOLERANCE
            )
        scores, source = results.score_distribution(query["id"])
        assert scores.shape == (N_SEQUENCES,) and source == "all scored sequences"
    assert results.top("q-capital")[0].title == EVIL_TEXT
    assert 'class="highlight"' in results.highlight("q-capital", 1)
    assert 'class="highlight"' in results.top("q-capital")[0]._repr_html_()


def test_highlight_colours_escapes_and_keeps_whitespace() -> None:
    tokens = ["<b>", " up", "\n", "  down"]
    block = highlight_tokens_html(tokens, [0.0, 2.0, 1.0, -2.0], standalone=False)
    spans = re.findall(r'<span class="tok"([^>]*)>', block)
    assert len(spans) == len(tokens)
    assert "background" not in spans[0]  # a zero score stays white
    assert "rgb(178,24,43)" in spans[1] and "rgb(33,102,172)" in spans[3]  # full red / full blue at +-max
    assert 'title="+2' in spans[1] and 'title="-2' in spans[3]
    assert "&lt;b&gt;" in block and "<b>" not in block
    assert "\u21b5</span>\n" in block  # the newline token is visible and still breaks the line
    assert ">  down<" in block  # leading spaces kept (pre-wrap)
    assert highlight_tokens_html(tokens, [0.0, 2.0, 1.0, -2.0]).startswith("<style>")
    with pytest.raises(ValueError):
        highlight_tokens_html(tokens, [1.0])


def test_power_law_fit_recovers_pareto_exponent() -> None:
    alpha, xmin = 2.5, 3.0
    rng = np.random.default_rng(1234)
    # Inverse-CDF sampling of p(x) = (alpha - 1) / xmin * (x / xmin)^-alpha for x >= xmin.
    samples = xmin * (1.0 - rng.uniform(size=20_000)) ** (-1.0 / (alpha - 1.0))
    fitted, fitted_xmin = fit_power_law_tail(samples)
    assert abs(fitted - alpha) < 0.1
    assert fitted_xmin > xmin
    fitted_all, xmin_all = fit_power_law_tail(samples, tail_fraction=1.0)
    assert abs(fitted_all - alpha) < 0.1 and xmin_all == pytest.approx(samples.min())
    # Negative values are ignored; too few positive ones give nan rather than noise.
    fitted_mixed, _ = fit_power_law_tail(np.concatenate([samples, -samples]))
    assert fitted_mixed == pytest.approx(fitted)
    assert all(math.isnan(v) for v in fit_power_law_tail([1.0, 2.0, -3.0]))


def test_missing_topk_is_a_clear_error(tmp_path: Path) -> None:
    results_dir = make_results_dir(tmp_path / "results")
    (results_dir / "topk.parquet").unlink()
    with pytest.raises(WhenceError, match="topk.parquet"):
        write_report(results_dir)

    with pytest.raises(WhenceError, match="topk.parquet"):
        _run_command([str(results_dir)])
    with pytest.raises(WhenceError, match="does not exist"):
        load_results(tmp_path / "nowhere")


def test_cli_writes_report_where_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results_dir = make_results_dir(tmp_path / "results", all_scores=False)
    out = tmp_path / "elsewhere" / "r.html"
    assert _run_command([str(results_dir), "--out", str(out), "--max-sequences", "2"]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert page.count('class="highlight"') == 2 * len(QUERIES)
    assert "Showing the top 2 of 4 sequences" in page
    # Without scores.parquet the distribution says what it is drawn from.
    assert "Only the top-k scores are available" in page


# The summary `whence score` writes (flows/score.py), as the report reads it from manifest.json.
SCORE_SUMMARY = {
    "queries": 2,
    "sequences_scored": 1234,
    "documents": 120,
    "bad_rows": 4,
    "corpus": {"documents": 120, "bad_rows": 4, "bad_by_reason": {"duplicate id": 1, "invalid JSON": 3}},
    "fragments": 3,
    "workers": 2,
    "shards": 1,
    "seconds": 3725.0,
    "timings": {"prepare_queries_s": 0.25, "scan_s": 1.5, "tfidf_s": 2.0, "score_s": 125.0,
                "score_steady_sequences": 0, "score_steady_s": 0.0, "per_token_s": 3.25},
}
SUMMARY_LABELS = {
    "Queries": "2",
    "Sequences scored": "1,234",
    "Documents read": "120",
    "Corpus fragments": "3",
    "Bad rows skipped": "4",
    "Bad rows by reason": "duplicate id: 1, invalid JSON: 3",
    "Workers": "2",
    "Pipeline stages per worker": "1",
    "Total time": "1 h 02 min",
    "Query preparation time": "250 ms",
    "Corpus scan time": "1.5 s",
    "TF-IDF filtering time": "2.0 s",
    "Scoring time": "2 min 05 s",
    "Per-token scoring time": "3.2 s",
}


def _summary_table(page: str) -> list[tuple[str, str]]:
    section = re.search(r'<section class="summary"><h2>Summary</h2><table class="kv">(.*?)</table>', page)
    assert section, "no summary table"
    return re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", section.group(1))


def test_summary_shows_labelled_fields_once(tmp_path: Path) -> None:
    results_dir = make_results_dir(tmp_path / "results")
    manifest = json.loads((results_dir / "manifest.json").read_text())
    (results_dir / "manifest.json").write_text(json.dumps({**manifest, "summary": SCORE_SUMMARY}))
    rows = _summary_table(write_report(results_dir).read_text(encoding="utf-8"))
    labels = [label for label, _ in rows]
    assert len(labels) == len(set(labels)), f"a field shown twice: {labels}"
    shown = dict(rows)
    for label, value in SUMMARY_LABELS.items():
        assert shown.get(label) == value, (label, shown.get(label))
    # Labels are words, not manifest keys; internal measurements stay out.
    assert not [label for label in labels if "_" in label or "." in label], labels
    assert not any("steady" in label.lower() for label in labels)


def test_summary_labels_fields_it_does_not_know(tmp_path: Path) -> None:
    rows = dict(_summary_table(write_report(make_results_dir(tmp_path / "results")).read_text(encoding="utf-8")))
    assert rows["Sequences scored"] == f"{N_SEQUENCES:,}"
    assert rows["Skipped rows"] == "2"
    assert rows["Scoring time"] == "12.5 s" and rows["Filter time"] == "400 ms"


def _run_command(argv: list[str]) -> int:
    """`whence report ARGV` through the command module (flows/cli.py dispatches to exactly this)."""
    import argparse

    from flows import report as command

    parser = argparse.ArgumentParser(prog="whence report")
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


def _escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_report_shows_the_predicted_change_when_n_is_known(tmp_path: Path) -> None:
    results_dir = make_results_dir(tmp_path / "results")
    page = write_report(results_dir).read_text(encoding="utf-8")
    assert "&Delta; log p (nats)" not in page, "an older directory without N: no column"
    manifest = json.loads((results_dir / "manifest.json").read_text())
    (results_dir / "manifest.json").write_text(json.dumps({**manifest, "fisher_sequences": 1000}))
    page = write_report(results_dir).read_text(encoding="utf-8")
    assert page.count("&Delta; log p (nats)") == len(QUERIES)
    first = load_results(results_dir).top(QUERIES[0]["id"])[0]
    assert first.predicted_change == first.score / 1000
    assert f'<td class="num">{first.score / 1000:+.3g}</td>' in page
    assert "Fisher averaged over (N)" in page and "1,000 sequences" in page
