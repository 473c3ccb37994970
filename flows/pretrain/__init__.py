"""`whence pretrain`: train a byte-level BPE tokenizer and a small Llama-style causal LM on a corpus, with Ray Train.

This is how the demo's model (`flows/demo_assets/model/`) is made. The steps:

1. Read the corpus (`whence.corpus`), drop repeated ids, and hold out `val_fraction` of the documents, chosen
   at random with `seed`, for validation.
2. Train a byte-level BPE tokenizer on the training documents (`whence.tokenizer`). Its one special token,
   `<|endoftext|>`, is BOS, EOS and pad; `tokenizer(text)` puts a BOS in front of every text (and no EOS), so a
   document's first window and a query's prompt both start with it.
3. Cut every document into the training sequences that `whence fit` and `whence score` use (`whence.text`):
   consecutive, non-overlapping windows of at most `seq_len` tokens. The model is pretrained on exactly the
   sequences whose influence is later measured.
4. Train a `LlamaForCausalLM` with Ray Train's `TorchTrainer` (DDP over `workers` workers, GPUs when the cluster
   has them, bfloat16 autocast on GPU), checkpointing at every log step; stop after `steps` steps or
   `time_limit` minutes.
5. Measure the validation loss (nats per predicted token, the mean of -log p(x_t | x_<t) over positions t >= 2
   of every validation window) and a unigram baseline: the cross-entropy of the same validation tokens under the
   add-one-smoothed unigram distribution of the training tokens.
6. Write MODEL_DIR as a standard Hugging Face directory and MODEL_DIR/training_report.json.

Tokenization runs on the driver: this is for small corpora (the demo's is 22 M characters).

Layout of this package:
    settings.py   PretrainConfig, the command line's options, the run's arguments
    data.py       documents, validation split, tokenizer, windows, unigram baseline (on the driver)
    training.py   the Ray Train loop: DDP, schedule, time limit, checkpoints and restarts
    output.py     the model directory, training_report.json, and whether MODEL_DIR already holds this run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flows.pretrain.settings import PretrainConfig, add_arguments

__all__ = ["PretrainConfig", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from flows.cluster import ClusterSettings
    from flows.pretrain.data import llama_config, prepare_data
    from flows.pretrain.output import REPORT_FILE, already_trained, training_report, write_model_dir
    from flows.pretrain.settings import config_from_args, run_arguments
    from flows.pretrain.training import train_on_ray
    from whence.corpus import CorpusSource

    config = config_from_args(args)
    arguments = run_arguments(args, config)
    out = Path(args.out)
    if already_trained(out, arguments, args.overwrite):
        print(f"{out} already holds this run (see {out / REPORT_FILE}); nothing to do")
        return 0

    started = time.time()
    data = prepare_data(CorpusSource(args.corpus, args.id_field, args.text_field), config)
    model_config = llama_config(config, data.tokenizer)
    prepared_seconds = time.time() - started
    outcome = train_on_ray(model_config, config, data, ClusterSettings(workers=args.workers, address=args.address),
                           args.storage_path)
    report = training_report(data, config, outcome, arguments, started, prepared_seconds)
    write_model_dir(out, model_config, outcome["state_dict"], data.tokenizer, report, args.overwrite)
    print(f"validation loss {report['val_loss']:.4f} nats/token (unigram baseline "
          f"{report['unigram_val_loss']:.4f}); wrote {out}")
    return 0
