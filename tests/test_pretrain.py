"""`whence pretrain` end to end on a few documents: a Hugging Face directory that loads, and a training report."""

from __future__ import annotations

import json

import pytest

from tests.tiny import TEXTS

TINY = ["--vocab-size", "300", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--seq-len", "32",
        "--steps", "6", "--batch-size", "4", "--log-every", "3", "--val-fraction", "0.25", "--workers", "1"]


@pytest.fixture
def corpus(tmp_path):
    """Eight short documents, each a few sentences, as JSON lines."""
    path = tmp_path / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(TEXTS):
            handle.write(json.dumps({"id": f"doc-{i}", "text": " ".join([text] * 6)}) + "\n")
    return path


def test_pretrain_writes_a_loadable_model_and_report(ray_cluster, corpus, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.cli import main

    out = tmp_path / "model"
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(out), *TINY]) == 0

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("The whale swam")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert tokenizer("whale", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The whale swam"
    assert model.config.vocab_size == len(tokenizer) and model.config.max_position_embeddings == 32
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()

    report = json.loads((out / "training_report.json").read_text())
    for key in ("val_loss", "unigram_val_loss"):
        assert isinstance(report[key], float) and 0 < report[key] < 20
    assert report["steps"] == 6 and report["val"]["documents"] == 2 and report["train"]["documents"] == 6
    assert len(report["history"]) == 2

    # The same arguments again: the finished run is kept. Other arguments: refused without --overwrite.
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(out), *TINY]) == 0
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(out), *TINY, "--seed", "1"]) == 2


def test_a_model_directory_is_judged_by_the_arguments_in_its_report(tmp_path):
    """The demo's model (trained before run directories knew pretrain) is a finished run of its recorded
    arguments; other arguments, or a directory of other files, are refused without --overwrite."""
    from pathlib import Path

    from flows.pretrain.output import REPORT_FILE, already_trained
    from whence.errors import RunStateError

    demo = Path(__file__).resolve().parents[1] / "flows" / "demo_assets" / "model"
    arguments = json.loads((demo / REPORT_FILE).read_text())["arguments"]
    assert already_trained(demo, arguments, overwrite=False)
    assert not already_trained(demo, arguments, overwrite=True)
    with pytest.raises(RunStateError, match="seed"):
        already_trained(demo, {**arguments, "seed": 1}, overwrite=False)
    assert not already_trained(tmp_path / "new", arguments, overwrite=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a model")
    with pytest.raises(RunStateError, match="not a whence pretrain run"):
        already_trained(tmp_path / "other", arguments, overwrite=False)


def test_the_recorded_arguments_are_those_of_the_demo_model():
    """`whence eval lds`'s data seed is no PretrainConfig field: a rerun of the demo's recipe still finds the demo
    model's recorded arguments, key for key."""
    import argparse
    from pathlib import Path

    from flows.pretrain.settings import add_arguments, config_from_args, run_arguments

    report = Path(__file__).resolve().parent.parent / "flows" / "demo_assets" / "model" / "training_report.json"
    recorded = json.loads(report.read_text())["arguments"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--corpus", *recorded["corpus"], "--out", "unused", "--time-limit", "20"])
    assert run_arguments(args, config_from_args(args)) == recorded
