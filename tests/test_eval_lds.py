"""`whence eval lds` as a user runs it: bad input, the retraining's pieces in process, and one end-to-end run on
Ray (a full model trained by `whence pretrain`'s pieces, subset models as Ray tasks) that a rerun resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main
from tests.tiny import TEXTS, make_model, make_tokenizer

RECIPE = ["--vocab-size", "300", "--hidden-size", "16", "--layers", "1", "--heads", "2", "--seq-len", "32",
          "--steps", "8", "--batch-size", "4", "--log-every", "4", "--val-fraction", "0.25"]
QUERIES = [
    {"id": "whale", "prompt": "The whale swam far", "completion": " beyond the harbour"},
    {"id": "truth", "prompt": "It is a truth universally", "completion": " acknowledged"},
    {"id": "union", "prompt": "The state of the union", "completion": " is strong"},
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-lds")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for i, text in enumerate(TEXTS):
            handle.write(json.dumps({"id": f"doc-{i}", "text": " ".join([text] * 3)}) + "\n")
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    return root


def lds_args(root, out, *extra):
    return ["eval", "lds", "--corpus", str(root / "corpus.jsonl"), "--queries", str(root / "queries.jsonl"),
            "--out", str(out), *extra]


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.2"])
def test_fraction_outside_the_unit_interval_exits_2(inputs, capsys, fraction):
    out = inputs / f"bad-fraction-{fraction}"
    assert main(lds_args(inputs, out, "--fraction", fraction, *RECIPE)) == 2
    assert "--fraction must lie strictly between 0 and 1" in capsys.readouterr().err
    assert not out.exists()


def test_a_model_not_written_by_pretrain_exits_2(inputs, capsys):
    tokenizer = make_tokenizer()
    make_model("llama", len(tokenizer)).save_pretrained(inputs / "hub-model")
    tokenizer.save_pretrained(inputs / "hub-model")
    out = inputs / "bad-model"
    assert main(lds_args(inputs, out, "--model", str(inputs / "hub-model"))) == 2
    err = capsys.readouterr().err
    assert "not a directory written by `whence pretrain`" in err and "hub-model" in err
    assert not out.exists()


def test_unknown_method_exits_2(inputs, capsys):
    assert main(lds_args(inputs, inputs / "bad-method", "--methods", "ekfac,bogus", *RECIPE)) == 2
    assert "bogus" in capsys.readouterr().err


def tiny_loop_config(data_seed=None):
    from transformers import LlamaConfig

    from flows.pretrain.data import Windows
    from flows.pretrain.settings import PretrainConfig
    from flows.pretrain.training import loop_config_for

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, size=(12, 8)).astype(np.int32)
    train = Windows(tokens, np.full(12, 8, dtype=np.int32), 0)
    val = Windows(tokens[:2], np.full(2, 8, dtype=np.int32), 0)
    model_config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8)
    config = PretrainConfig(vocab_size=300, hidden_size=16, heads=2, layers=1, seq_len=8, steps=4, batch_size=4,
                            log_every=2)
    return {**loop_config_for(model_config, config, train, val, 1), **({} if data_seed is None
                                                                      else {"data_seed": data_seed})}


def test_train_single_is_deterministic_and_its_data_seed_changes_the_order_only():
    from flows.pretrain.training import train_single

    first, again = train_single(tiny_loop_config()), train_single(tiny_loop_config())
    same_order = train_single(tiny_loop_config(data_seed=0))  # the recipe's seed: the default order
    other_order = train_single(tiny_loop_config(data_seed=5))
    assert first["steps"] == 4 and len(first["history"]) == 2
    for name, weights in first["state_dict"].items():
        np.testing.assert_array_equal(weights, again["state_dict"][name], err_msg=name)
        np.testing.assert_array_equal(weights, same_order["state_dict"][name], err_msg=name)
    assert any(not np.array_equal(w, other_order["state_dict"][n]) for n, w in first["state_dict"].items())


def test_example_scatter_predicts_the_change_from_the_left_out_scores():
    from flows.eval.lds import LDSSettings, lds_body

    rng = np.random.default_rng(1)
    masks = rng.random((6, 10)) < 0.5  # (M, N)
    scores = {"ekfac": rng.normal(size=(2, 10)), "random": rng.normal(size=(2, 10))}  # (Q, N)
    measured = rng.normal(size=(6, 2, 2))  # (M, S, Q)
    full = np.array([-3.0, -4.0])
    body = lds_body(scores, masks, measured, full, ["a", "b"], LDSSettings(subsets=6))
    example = body["example"]
    q = ["a", "b"].index(example["query_id"])
    expected = -(~masks).astype(float) @ scores["ekfac"][q] / 10  # -(sum of left-out scores) / N
    np.testing.assert_allclose(example["predicted_change"], expected, rtol=1e-12)
    np.testing.assert_allclose(example["measured_change"], measured.mean(axis=1)[:, q] - full[q], rtol=1e-12)
    assert example["method"] == "ekfac" and set(body["methods"]) == {"ekfac", "random"}
    assert body["subsets"] == 6 and body["seeds"] == 2 and body["sequences"] == 10


@pytest.fixture(scope="module")
def finished(inputs, ray_cluster):
    """One uninterrupted run: a full model trained here, 3 subsets x 2 seeds."""
    out = inputs / "lds"
    args = lds_args(inputs, out, "--subsets", "3", "--seeds", "2", "--methods", "ekfac,identity,tfidf,random",
                    *RECIPE)
    assert main(args) == 0
    return out, args


def test_lds_writes_every_method_noise_and_summary(finished, inputs):
    out, _ = finished
    body = json.loads((out / "lds.json").read_text())
    assert list(body["methods"]) == ["ekfac", "identity", "tfidf", "random"]
    assert body["subsets"] == 3 and body["seeds"] == 2 and body["fraction"] == 0.5 and body["queries"] == 3
    for row in body["methods"].values():
        assert len(row["per_query"]) == 3
        assert row["lds"] is None or -1 <= row["lds"] <= 1
    assert body["noise"]["across_subsets_std"] >= 0 and body["noise"]["across_seeds_std"] >= 0
    assert sorted(p.name for p in (out / "subsets").iterdir()) == [f"m{m}-s{s}.json" for m in range(3)
                                                                  for s in range(2)]
    assert (out / "lds.png").stat().st_size > 0 and "lds.png" in (out / "lds.html").read_text()
    assert (out / "model" / "training_report.json").is_file() and (out / "factors" / "manifest.json").is_file()
    arrays = np.load(out / "lds_arrays.npz")
    assert arrays["masks"].shape == (3, body["sequences"]) and arrays["measured"].shape == (3, 2, 3)


def test_a_resumed_run_equals_the_uninterrupted_one(finished, capsys):
    out, args = finished
    before = json.loads((out / "lds.json").read_text())
    (out / "subsets" / "m1-s1.json").unlink()  # as if interrupted before that subset model finished
    kept = (out / "subsets" / "m0-s0.json").stat().st_mtime_ns
    assert main(args) == 0
    after = json.loads((out / "lds.json").read_text())
    assert (out / "subsets" / "m0-s0.json").stat().st_mtime_ns == kept  # kept, not retrained
    assert (out / "subsets" / "m1-s1.json").is_file()
    for key in ("methods", "noise", "example", "full_model"):
        assert after[key] == before[key], key
    assert "ekfac" in capsys.readouterr().out


def test_the_run_s_model_serves_as_model_and_refuses_another_corpus(finished, inputs, capsys):
    from flows.eval.lds_recipe import recipe_from_model
    from flows.pretrain.settings import PretrainConfig
    from whence.corpus import CorpusSource
    from whence.evaluation.errors import EvaluationError

    out, _ = finished
    full = recipe_from_model(out / "model", CorpusSource([str(inputs / "corpus.jsonl")]))
    assert full.config == PretrainConfig(vocab_size=300, hidden_size=16, layers=1, heads=2, seq_len=32, steps=8,
                                         batch_size=4, log_every=4, val_fraction=0.25)
    arrays = np.load(out / "lds_arrays.npz")
    assert len(full.train) == arrays["masks"].shape[1]
    other = inputs / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    with pytest.raises(EvaluationError, match="not trained on this corpus"):
        recipe_from_model(out / "model", CorpusSource([str(other)]))


def test_the_bundled_queries_quote_training_documents_of_the_slice(tmp_path):
    """Every fact query's prompt and completion appear, as one text, in its source document of the slice, and
    no source is one of the documents the recipe holds out."""
    from flows.eval.bundled import ASSETS, QUERIES_FILE, load_setup, write_slice
    from flows.pretrain.data import split_documents

    setup = load_setup()
    path = write_slice(setup, tmp_path / "corpus.jsonl")
    documents = [(row["id"], row["text"]) for row in map(json.loads, path.read_text().splitlines())]
    assert [doc_id for doc_id, _ in documents] == setup["documents"]
    assert all(len(text) <= setup["max_chars"] for _, text in documents)
    _, held_out = split_documents(documents, setup["recipe"]["val_fraction"], setup["recipe"]["seed"])
    texts = {doc_id: " ".join(text.split()) for doc_id, text in documents}
    queries = [json.loads(line) for line in (ASSETS / QUERIES_FILE).read_text().splitlines()]
    assert len(queries) == 24 and len({q["source"] for q in queries}) == 24
    for query in queries:
        assert query["source"] not in {doc_id for doc_id, _ in held_out}, query["id"]
        assert " ".join((query["prompt"] + query["completion"]).split()) in texts[query["source"]], query["id"]
