"""`whence eval trace` and `whence eval exact` as a user runs them, on a tiny model (in process, no Ray)."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from tests.tiny import TEXTS, make_model, make_tokenizer
from whence.api import fit
from whence.config import FitConfig
from whence.model import find_tracked_layers, load_causal_lm

QUERIES = [
    {"id": "whale", "prompt": "The whale swam far", "completion": " beyond the harbour", "source": "d0"},
    {"id": "fox", "prompt": "A quick brown", "completion": " fox jumps over the lazy dog", "source": ["d7", "d3"]},
    {"id": "union", "prompt": "The state of the union", "completion": " is strong", "source": "d2"},
]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = make_tokenizer()
    make_model("llama", len(tokenizer), context=64).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    documents = [(f"d{i}", text) for i, text in enumerate(TEXTS)]
    with open(root / "corpus.jsonl", "w") as handle:
        for doc_id, text in documents:
            handle.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        handle.write("{not json\n")  # skipped and not counted as a document
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    model, tokenizer = load_causal_lm(str(root / "model"))  # as `whence eval trace` loads it (float32 on CPU)
    factors = fit(model, tokenizer, find_tracked_layers(model, "mlp"), documents, FitConfig(seq_len=SEQ_LEN))
    factors.save(root / "factors", {"command": "fit"})
    return {"root": root, "model": str(root / "model"), "corpus": str(root / "corpus.jsonl"),
            "queries": str(root / "queries.jsonl"), "factors": str(root / "factors")}


def test_eval_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "trace" in out and "exact" in out and "lds" in out and "bundled" in out


def trace_args(space, out, queries=None):
    return ["eval", "trace", "--model", space["model"], "--factors", space["factors"], "--corpus", space["corpus"],
            "--queries", queries or space["queries"], "--out", str(out)]


def test_trace_writes_recall_and_mrr_per_method(workspace, capsys):
    out = workspace["root"] / "trace"
    code = main(trace_args(workspace, out) + ["--methods", "ekfac,identity,tfidf,random", "--tfidf-candidates", "5"])
    assert code == 0
    body = json.loads((out / "trace.json").read_text())
    assert body["queries"] == 3 and body["tfidf_candidates"] == 5 and body["missing_sources"] == []
    assert list(body["methods"]) == ["ekfac", "identity", "tfidf", "random"]
    for name, row in body["methods"].items():
        assert 0 <= row["recall@1"] <= row["recall@10"] <= row["recall@100"] <= 1, name
        assert 0 <= row["mrr"] <= 1 and set(row["ranks"]) == {"whale", "fox", "union"}
    assert body["methods"]["tfidf"]["recall@10"] == 1.0  # each query shares words with its source
    for rank in body["methods"]["ekfac"]["ranks"].values():
        assert rank is None or rank <= 5  # only the 5 TF-IDF candidates are ranked
    assert "recall@100" in capsys.readouterr().out


def test_trace_default_methods(workspace):
    out = workspace["root"] / "trace-default"
    assert main(trace_args(workspace, out)) == 0
    assert list(json.loads((out / "trace.json").read_text())["methods"]) == ["ekfac", "identity", "tfidf", "random"]


def test_trace_bad_input_exits_2(workspace, capsys):
    no_source = workspace["root"] / "no-source.jsonl"
    no_source.write_text(json.dumps(QUERIES[0]) + "\n" + json.dumps({"id": "q", "prompt": "A", "completion": " b"})
                         + "\n")
    assert main(trace_args(workspace, workspace["root"] / "t2", str(no_source))) == 2
    err = capsys.readouterr().err
    assert "whence eval: error:" in err and "no-source.jsonl:2: query 'q' has no 'source'" in err
    assert main(trace_args(workspace, workspace["root"] / "t3") + ["--methods", "ekfac,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def exact_args(space, out):
    return ["eval", "exact", "--model", space["model"], "--corpus", space["corpus"], "--queries", space["queries"],
            "--out", str(out), "--seq-len", str(SEQ_LEN)]


def test_exact_compares_every_method_with_exact_influence(workspace, capsys):
    out = workspace["root"] / "exact"
    assert main(exact_args(workspace, out)) == 0
    body = json.loads((out / "exact.json").read_text())
    assert body["parameters"] == 3 * 2 * 16 * 32 and body["bound"] == 20_000 and body["queries"] == 3
    assert body["fitting_sequences"] == body["sequences"] > 0
    assert list(body["methods"]) == ["ekfac", "kfac", "diagonal", "identity", "lissa"]
    for row in body["methods"].values():
        assert -1 <= row["pearson"] <= 1 and -1 <= row["spearman"] <= 1 and len(row["per_query_pearson"]) == 3
    # LiSSA iterates towards the same damped inverse from its own code: an independent check of the exact one.
    assert body["methods"]["lissa"]["pearson"] > 0.99
    assert "spearman" in capsys.readouterr().out


def test_exact_refuses_a_model_above_the_bound(workspace, capsys):
    code = main(exact_args(workspace, workspace["root"] / "too-large") + ["--max-parameters", "1000"])
    assert code == 2
    err = capsys.readouterr().err
    assert "3,072 parameters, above the bound of 1,000" in err and workspace["model"] in err
    assert not (workspace["root"] / "too-large").exists()
