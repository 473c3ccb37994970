"""`whence eval lds`'s full model and its recipe: the model every subset model is compared with.

    --model DIR   a `whence pretrain` directory trained on this corpus: the recipe is its training_report.json's
                  "arguments" (EvaluationError, exit 2, for a directory without one, or one whose held-out
                  documents are not this corpus's); the tokenizer is the model's
    otherwise     `whence pretrain`'s pieces train it into OUT/model (flows.pretrain: prepare_data, llama_config,
                  train_on_ray, write_model_dir) with the recipe of the command line; a rerun finds it there

Either way the training windows are the recipe's: the corpus's documents less the held-out ones (the split of
`val_fraction` and `seed`), cut with the tokenizer into `seq_len` windows (flows.pretrain.data.Windows), in corpus
order. They are the sequences the subsets are drawn from and the sequences every method scores.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

from flows.pretrain.settings import PretrainConfig
from whence.evaluation.errors import EvaluationError

log = logging.getLogger("whence.eval.lds")

MODEL_SUBDIR = "model"


@dataclass
class FullModel:
    """The full model's directory, its recipe, and the windows it was trained on."""

    model_dir: Path
    config: PretrainConfig
    model_config: object  # transformers.LlamaConfig
    tokenizer: object
    train_docs: list[tuple[str, str]]  # (doc_id, text) of the training documents, in corpus order
    train: object  # flows.pretrain.data.Windows (N, seq_len): the training windows, in corpus order
    val: object  # flows.pretrain.data.Windows: the held-out windows


def recipe_from_model(model_dir: str | Path, corpus) -> FullModel:
    """The recipe and windows of a `whence pretrain` model directory trained on `corpus`."""
    from transformers import AutoTokenizer, LlamaConfig

    from flows.pretrain.data import Windows, read_documents, split_documents
    from flows.pretrain.output import REPORT_FILE

    model_dir = Path(model_dir)
    report_path = model_dir / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    arguments = report.get("arguments") if isinstance(report, dict) else None
    names = [f.name for f in fields(PretrainConfig)]
    if not isinstance(arguments, dict) or "seq_len" not in arguments or "val_document_ids" not in report:
        raise EvaluationError(f"--model {model_dir}: not a directory written by `whence pretrain` (no {REPORT_FILE} "
                              "with the training recipe under 'arguments'); give one, or leave out --model to "
                              "train the full model here")
    config = PretrainConfig(**{name: arguments[name] for name in names if name in arguments})
    documents, _ = read_documents(corpus)
    train_docs, val_docs = split_documents(documents, config.val_fraction, config.seed)
    if [doc_id for doc_id, _ in val_docs] != report["val_document_ids"]:
        raise EvaluationError(f"--model {model_dir} was not trained on this corpus ({', '.join(corpus.paths)}): the "
                              f"documents its recipe holds out are not the ones {REPORT_FILE} names")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train = Windows.from_documents(tokenizer, train_docs, config.seq_len)
    expected = (report.get("train") or {}).get("windows")
    if expected is not None and expected != len(train):
        raise EvaluationError(f"--model {model_dir}: this corpus gives {len(train)} training windows, its "
                              f"{REPORT_FILE} says {expected}; was it trained on another version of the corpus?")
    val = Windows.from_documents(tokenizer, val_docs, config.seq_len)
    return FullModel(model_dir, config, LlamaConfig.from_pretrained(str(model_dir)), tokenizer, train_docs, train, val)


def train_full_model(corpus, config: PretrainConfig, out: Path, cluster, queries=()) -> FullModel:
    """Train the full model into out/model as `whence pretrain` would (or find it there, trained with these
    arguments, from an earlier run), and return it with its windows. `queries` too long for the recipe's
    context fail (QueryError) before any training."""
    from flows.pretrain.data import llama_config, prepare_data
    from flows.pretrain.output import already_trained, training_report, write_model_dir
    from flows.pretrain.training import train_on_ray
    from whence.evaluation.measure import query_batch

    model_dir = Path(out) / MODEL_SUBDIR
    arguments = {"corpus": [str(p) for p in corpus.paths], "id_field": corpus.id_field,
                 "text_field": corpus.text_field, "workers": cluster.workers, **config.to_dict()}
    if already_trained(model_dir, arguments, overwrite=False):
        log.info("the full model is already trained in %s", model_dir)
        return recipe_from_model(model_dir, corpus)
    started = time.time()
    data = prepare_data(corpus, config)
    if queries:
        query_batch(data.tokenizer, queries, max_length=config.seq_len)
    model_config = llama_config(config, data.tokenizer)
    prepared_seconds = time.time() - started
    log.info("training the full model on %d windows (%d steps)", len(data.train), config.total_steps)
    outcome = train_on_ray(model_config, config, data, cluster, None)
    report = training_report(data, config, outcome, arguments, started, prepared_seconds)
    write_model_dir(model_dir, model_config, outcome["state_dict"], data.tokenizer, report, overwrite=True)
    log.info("full model: validation loss %.4f nats/token (unigram %.4f)", report["val_loss"],
             report["unigram_val_loss"])
    return FullModel(model_dir, config, model_config, data.tokenizer, data.train_docs, data.train, data.val)
