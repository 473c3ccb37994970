"""The notebooks run headless, end to end, on a tiny model and a slice of the bundled corpus.

Each notebook starts its own Ray inside its kernel (flows.cluster.connect) and shuts it down at the end. Both
share one work directory, so the second reuses the factors and scores of the first (as they do for a user).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import make_model, make_tokenizer

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CORPUS = ROOT / "flows" / "demo_assets" / "corpus"
QUERIES = ROOT / "flows" / "demo_assets" / "queries.jsonl"
# Plus the documents the queries quote: 9 in all, ~1,300 sequences of 64 tokens, which the scan and the index
# read whole (30 made ~5,700); the fit takes its first 128 and TF-IDF 24 candidates per query either way.
FIRST_DOCS = 5
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    if not CORPUS.exists() or not QUERIES.exists():
        pytest.skip("the bundled demo corpus or queries are missing")
    root = tmp_path_factory.mktemp("notebooks")
    tokenizer = make_tokenizer(300)
    model = make_model("llama", len(tokenizer), context=512, dtype=torch.float32)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {
        "WHENCE_MODEL": str(root / "model"),
        "WHENCE_CORPUS": str(CORPUS),
        "WHENCE_QUERIES": str(QUERIES),
        "WHENCE_DOCS": str(FIRST_DOCS),
        "WHENCE_WORKDIR": str(root / "work"),
        "WHENCE_NOTEBOOK_QUICK": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }


def execute(name: str, environment: dict, monkeypatch) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel of this interpreter; an error in any cell fails the test."""
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the notebook starts its own local Ray
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return notebook


def outputs(notebook, mime: str) -> list[str]:
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if mime in data:
                found.append(data[mime])
            elif mime == "text/plain" and output.get("output_type") == "stream":
                found.append(output.get("text", ""))
    return found


def test_the_kernel_runs_this_interpreter():
    """The "python3" kernelspec's `python` becomes sys.executable, so the kernel sees this environment's packages."""
    from jupyter_client.manager import KernelManager

    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert command[0] == sys.executable and "ipykernel_launcher" in command


def test_notebooks_run_headless(environment, monkeypatch):
    quickstart = execute("quickstart", environment, monkeypatch)
    runs = list(Path(environment["WHENCE_WORKDIR"]).glob("run-*"))
    assert len(runs) == 1, runs
    results = runs[0] / "results"
    for name in ("topk.parquet", "tokens.parquet", "scores.parquet", "manifest.json", "report.html"):
        assert (results / name).is_file(), name
    html = "".join(outputs(quickstart, "text/html"))
    assert 'class="tok"' in html and "background:rgb(" in html  # an inline, highlighted top sequence
    assert outputs(quickstart, "image/png"), "no plots"
    text = "".join(outputs(quickstart, "text/plain"))
    assert "pairs in both; largest difference" in text

    analysis = execute("analysis", environment, monkeypatch)
    assert len(list(Path(environment["WHENCE_WORKDIR"]).glob("run-*"))) == 1  # the quickstart's run, reused
    text = "".join(outputs(analysis, "text/plain"))
    for expected in ("median tail exponent", "block shares", "word order:"):
        assert expected in text, expected
    assert len(outputs(analysis, "image/png")) >= 3
    assert 'class="tok"' in "".join(outputs(analysis, "text/html"))
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["arguments"]["per_token"] is True and manifest["arguments"]["save_all_scores"] is True


def test_evaluation_notebook_shows_the_lds_table_and_scatter(monkeypatch):
    """notebooks/evaluation.ipynb on the shipped results of the bundled setup (no Ray, no training: seconds)."""
    notebook = execute("evaluation", {"HF_HUB_OFFLINE": "1"}, monkeypatch)
    text = "".join(outputs(notebook, "text/plain"))
    body = json.loads((ROOT / "flows" / "eval_assets" / "results" / "lds.json").read_text())
    for name in body["methods"]:
        assert name in text, name
    assert "retraining noise" in text and "Spearman over subsets" in text
    example = body["example"]
    assert f"(lds.json says {example['lds']:.3f})" in text and f"Spearman over subsets {example['lds']:.3f}" in text
    assert outputs(notebook, "image/png"), "no LDS figure"
