"""Bad input gets a clear error that names the problem."""

import json

import pytest

from tests.tiny import TEXTS, make_model
from whence import FitConfig, ScoreConfig, fit, prepare
from whence.errors import FactorsMismatchError, ModelError, QueryError
from whence.model import find_tracked_layers, load_causal_lm
from whence.text import Query, load_queries


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="no config.json"):
        load_causal_lm(str(tmp_path))


def test_directory_that_is_not_a_causal_lm(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2, hidden_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model"):
        load_causal_lm(str(tmp_path))


def test_saved_tiny_model_loads(tmp_path, tokenizer):
    model = make_model("llama", len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_causal_lm(str(tmp_path), device="cpu", dtype="float64")
    assert len(find_tracked_layers(loaded, "mlp")) == 6
    assert loaded_tokenizer("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_regex_that_matches_nothing_lists_the_layers(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    with pytest.raises(ModelError, match=r"matches no linear layer.*transformer\.h\.0\.mlp\.c_fc"):
        find_tracked_layers(model, r"does_not_exist")


def test_unrecognised_model_lists_its_modules():
    import torch

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(3, 3)

    with pytest.raises(ModelError, match="cannot find the transformer blocks.*body"):
        find_tracked_layers(Odd(), "mlp")


def test_factors_from_another_model_are_refused(tokenizer):
    model = make_model("gpt2", len(tokenizer))
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, enumerate(TEXTS[:3]), FitConfig(seq_len=12))
    other = make_model("gpt2", len(tokenizer), seed=7)
    with pytest.raises(FactorsMismatchError, match="another model"):
        prepare(other, tokenizer, find_tracked_layers(other, "mlp"), factors, [Query("q", "The", " whale")])


def test_query_longer_than_the_context_and_empty_completion(tokenizer):
    model = make_model("llama", len(tokenizer), context=16)
    layers = find_tracked_layers(model, "mlp")
    factors = fit(model, tokenizer, layers, enumerate(TEXTS[:3]), FitConfig(seq_len=12))
    with pytest.raises(QueryError, match=r"query 'long'.*exceed the model's context window of 16"):
        prepare(model, tokenizer, layers, factors, [Query("long", TEXTS[1], " and more")], ScoreConfig())
    with pytest.raises(QueryError, match="query 'empty': empty completion"):
        prepare(model, tokenizer, layers, factors, [Query("empty", "The whale", "  ")])


def test_queries_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p", "completion": "c"}) + "\n{not json\n")
    with pytest.raises(QueryError, match=r"queries.jsonl:2: invalid JSON"):
        load_queries(path)
    path.write_text(json.dumps({"id": "a", "prompt": "p"}) + "\n")
    with pytest.raises(QueryError, match=r"queries.jsonl:1: missing field 'completion'"):
        load_queries(path)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="strategy"):
        FitConfig(strategy="magic")
    with pytest.raises(ValueError, match="query rank"):
        ScoreConfig(query_rank=0)
