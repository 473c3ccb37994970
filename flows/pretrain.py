"""`whence pretrain`: train a byte-level BPE tokenizer and a small Llama-style causal LM on a corpus, with Ray Train.

This is how the demo's model (`flows/demo_assets/model/`) is made. The steps:

1. Read the corpus (`whence.corpus`), drop repeated ids, and hold out `val_fraction` of the documents, chosen
   at random with `seed`, for validation.
2. Train a byte-level BPE tokenizer on the training documents. Its one special token, `<|endoftext|>`, is BOS,
   EOS and pad; `tokenizer(text)` puts a BOS in front of every text (and no EOS), so a document's first window
   and a query's prompt both start with it.
3. Cut every document into the training sequences that `whence fit` and `whence score` use (`whence.text`):
   consecutive, non-overlapping windows of at most `seq_len` tokens. The model is pretrained on exactly the
   sequences whose influence is later measured.
4. Train a `LlamaForCausalLM` with Ray Train's `TorchTrainer` (DDP over `workers` workers, GPUs when the cluster
   has them, bfloat16 autocast on GPU): AdamW, linear warm-up then cosine decay, gradient clipping. Each step
   takes `batch_size` windows (shared out among the workers) from a fresh random order of the windows each epoch.
   Training stops after `steps` steps or `time_limit` minutes; with a time limit the learning rate decays with
   whichever is further along. Workers checkpoint at every log step, and a failed worker group is restarted from
   the latest checkpoint.
5. Measure the validation loss (nats per predicted token, the mean of -log p(x_t | x_<t) over positions t >= 2
   of every validation window) and a unigram baseline: the cross-entropy of the same validation tokens under the
   add-one-smoothed unigram distribution of the training tokens.
6. Write MODEL_DIR as a standard Hugging Face directory (config.json, model.safetensors, tokenizer.json,
   tokenizer_config.json) and MODEL_DIR/training_report.json.

The directory is written under a temporary name and renamed when complete. A MODEL_DIR that already holds a
finished run with the same arguments is left as it is; with other arguments the command refuses unless given
`--overwrite`. Tokenization runs on the driver: this is for small corpora (the demo's is 22 M characters).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from whence.errors import CorpusError, RunStateError, WhenceError

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "<|endoftext|>"  # the tokenizer's one special token: BOS, EOS and pad
REPORT_FILE = "training_report.json"
IGNORE_INDEX = -100  # label of positions with no loss term (cross_entropy's ignore_index)
MIN_VOCAB_SIZE = 257 + 3  # 256 byte symbols, the special token, and a few merges
EVAL_SUBSET_WINDOWS = 32  # validation windows scored at each log step (the full set is scored at the end)
WARMUP_FRACTION, MAX_WARMUP_STEPS = 0.1, 200
MAX_FAILURES = 3  # worker-group restarts, each resuming from the latest checkpoint
CHECKPOINT_FILE = "train_state.pt"
FINAL_LR_FRACTION = 0.1  # the cosine schedule ends at this fraction of --lr
ADAM_BETAS, WEIGHT_DECAY, GRAD_CLIP_NORM = (0.9, 0.95), 0.1, 1.0


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class PretrainConfig:
    """What to train and for how long. The defaults are the demo's recipe (flows/demo_assets/README.md)."""

    vocab_size: int = _help("BPE vocabulary size, the special token included", 4096)
    hidden_size: int = _help("width of the residual stream", 192)
    intermediate_size: int | None = _help("width of the MLP (None: 8/3 x hidden, rounded up to a multiple of 32)",
                                          None)
    layers: int = _help("transformer blocks", 4)
    heads: int = _help("attention heads (hidden_size / heads must be even, for rotary embeddings)", 4)
    seq_len: int = _help("tokens per training window, and the model's context length", 256)
    steps: int | None = _help("optimizer steps (None: from `tokens`, or 2400 when neither is given)", None)
    tokens: int | None = _help("train on about this many tokens (window slots: steps x batch_size x seq_len)", None)
    time_limit: float | None = _help("stop training after this many minutes even if steps remain; the learning "
                                     "rate then decays with elapsed time, so it still ends low", None)
    batch_size: int = _help("windows per optimizer step, over all workers together", 16)
    lr: float = _help("peak learning rate (AdamW; linear warm-up, then cosine decay to a tenth of it)", 2e-3)
    val_fraction: float = _help("fraction of the documents held out for validation", 0.05)
    seed: int = _help("seed for the validation split, the initialisation and the order of windows", 0)
    log_every: int = _help("log the training loss, and a validation loss on a few windows, every N steps", 50)

    DEFAULT_STEPS = 2400

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "layers", "heads", "seq_len", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise WhenceError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise WhenceError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes, the special token and "
                              f"some merges), got {self.vocab_size}")
        if self.hidden_size % self.heads or (self.hidden_size // self.heads) % 2:
            raise WhenceError(f"--hidden-size {self.hidden_size} must be a multiple of --heads {self.heads} with an "
                              "even quotient (the head size, for rotary embeddings)")
        if self.seq_len < 2:
            raise WhenceError("--seq-len must be at least 2 (a window needs one predicted token)")
        if self.steps is not None and self.tokens is not None:
            raise WhenceError("give --steps or --tokens, not both")
        for name in ("steps", "tokens", "intermediate_size", "time_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise WhenceError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise WhenceError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if not self.lr > 0:
            raise WhenceError(f"--lr must be positive, got {self.lr}")

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 32 * math.ceil(self.hidden_size * 8 / 3 / 32)

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))
        return self.DEFAULT_STEPS

    def to_dict(self) -> dict:
        return asdict(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    helps = {f.name: f.metadata["help"] for f in fields(PretrainConfig)}
    defaults = PretrainConfig.__dataclass_fields__

    def option(name: str, type_, metavar: str, **kwargs) -> None:
        default = defaults[name].default
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type_, metavar=metavar, default=default,
                            help=helps[name] + shown, **kwargs)

    parser.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                        help="corpus files (.jsonl, .jsonl.gz, .parquet) or directories of them; fields id and text")
    parser.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR",
                        help="where to write the model, its tokenizer and training_report.json")
    parser.add_argument("--id-field", default="id", help="corpus field holding the document id (default: id)")
    parser.add_argument("--text-field", default="text", help="corpus field holding the document text (default: text)")
    option("vocab_size", int, "N")
    option("hidden_size", int, "N")
    option("intermediate_size", int, "N")
    option("layers", int, "N")
    option("heads", int, "N")
    option("seq_len", int, "N")
    length = parser.add_mutually_exclusive_group()
    for name, type_ in (("steps", int), ("tokens", _count)):
        length.add_argument(f"--{name}", dest=name, type=type_, metavar="N", default=None, help=helps[name])
    option("time_limit", float, "MINUTES")
    option("batch_size", int, "N")
    option("lr", float, "FLOAT")
    option("val_fraction", float, "FLOAT")
    option("seed", int, "N")
    option("log_every", int, "N")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="Ray Train workers (data-parallel; one GPU each when the cluster has GPUs) (default: 1)")
    parser.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                        help="Ray cluster to join; 'local' starts a new one (default: the connected one, else RAY_ADDRESS, "
                             "else a running local cluster, else a new one)")
    parser.add_argument("--storage-path", default=None, metavar="PATH_OR_URI",
                        help="where Ray Train keeps checkpoints: shared storage (s3://..., NFS) on a multi-node "
                             "cluster (default: a temporary local directory, removed at the end)")
    parser.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if it holds another run")


def _count(text: str) -> int:
    """An integer that may be written 5e6 or 5_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from error
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    if args.workers < 1:
        raise WhenceError(f"--workers must be positive, got {args.workers}")
    if config.batch_size % args.workers:
        raise WhenceError(f"--batch-size {config.batch_size} must be a multiple of --workers {args.workers}")
    arguments = {"corpus": [str(p) for p in args.corpus], "id_field": args.id_field, "text_field": args.text_field,
                 "workers": args.workers, **config.to_dict()}
    out = Path(args.out)
    if _finished_run_matches(out, arguments, args.overwrite):
        print(f"{out} already holds this run (see {out / REPORT_FILE}); nothing to do")
        return 0

    started = time.time()
    documents, tally = _read_documents(args.corpus, args.id_field, args.text_field)
    train_docs, val_docs = split_documents(documents, config.val_fraction, config.seed)
    log.info("%d documents (%d bad rows skipped): %d for training, %d held out", len(documents),
             tally.total_bad, len(train_docs), len(val_docs))
    tokenizer = train_tokenizer([text for _, text in train_docs], config.vocab_size)
    train = Windows.from_documents(tokenizer, train_docs, config.seq_len)
    val = Windows.from_documents(tokenizer, val_docs, config.seq_len)
    baseline = unigram_baseline(train, val, len(tokenizer))
    log.info("tokenizer: %d tokens; %d training windows (%d tokens), %d validation windows; unigram baseline %.4f "
             "nats/token", len(tokenizer), len(train), train.num_tokens, len(val), baseline["unigram_val_loss"])
    model_config = llama_config(config, tokenizer)
    prepared_seconds = time.time() - started

    outcome = _train_on_ray(model_config, config, train, val, args.workers, args.address, args.storage_path)
    report = {
        "val_loss": outcome["val_loss"],
        **baseline,
        "loss_units": "nats per predicted token (positions t >= 2 of each window)",
        "steps": outcome["steps"],
        "stopped_by_time_limit": outcome["stopped_by_time_limit"],
        "train": {"documents": len(train_docs), "windows": len(train), "tokens": train.num_tokens,
                  "tokens_seen": outcome["tokens_seen"], "epochs": outcome["tokens_seen"] / train.num_tokens},
        "val": {"documents": len(val_docs), "windows": len(val), "tokens": val.num_tokens,
                "predicted_tokens": val.num_targets},
        "model": {"parameters": outcome["parameters"], "vocab_size": len(tokenizer),
                  "hidden_size": config.hidden_size, "intermediate_size": config.mlp_size,
                  "layers": config.layers, "heads": config.heads, "context": config.seq_len},
        "timing": {"prepare_seconds": round(prepared_seconds, 1), "train_seconds": round(outcome["seconds"], 1),
                   "total_seconds": round(time.time() - started, 1),
                   "tokens_per_second": round(outcome["tokens_seen"] / max(outcome["seconds"], 1e-9))},
        "device": outcome["device"],
        "corpus": tally.as_dict(),
        "history": outcome["history"],
        "val_document_ids": [doc_id for doc_id, _ in val_docs],
        "arguments": arguments,
        "versions": _versions(),
    }
    _write_model_dir(out, model_config, outcome["state_dict"], tokenizer, report, args.overwrite)
    print(f"validation loss {report['val_loss']:.4f} nats/token (unigram baseline "
          f"{report['unigram_val_loss']:.4f}); wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Data: documents, tokenizer, windows, unigram baseline


def _read_documents(paths: list[str], id_field: str, text_field: str):
    """(doc_id, text) pairs in corpus order, the first occurrence of each id, and the tally of rows read.

    Bad rows are skipped and counted, as `whence fit` does without --strict.
    """
    from whence.corpus import DUPLICATE_ID, BadRow, CorpusTally, list_fragments, read_fragment

    documents, seen, tally = [], set(), CorpusTally()
    for fragment in list_fragments(paths):
        for row in read_fragment(fragment, id_field, text_field):
            tally.add(row)
            if isinstance(row, BadRow):
                continue
            if row.doc_id in seen:
                tally.documents -= 1
                tally.add_bad(DUPLICATE_ID)
                continue
            seen.add(row.doc_id)
            documents.append((row.doc_id, row.text))
    if tally.total_bad:
        log.warning("skipped %d bad corpus rows: %s", tally.total_bad, tally.as_dict()["bad_by_reason"])
    if len(documents) < 2:
        raise CorpusError(f"{' '.join(paths)}: {len(documents)} usable documents; pretraining needs at least 2 "
                          "(some to train on, some to validate on)")
    return documents, tally


def split_documents(documents: list[tuple[str, str]], val_fraction: float, seed: int):
    """(train, val): a random `val_fraction` of the documents (at least one each side) is held out."""
    import numpy as np

    num_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
    held_out = set(np.random.default_rng(seed).permutation(len(documents))[:num_val].tolist())
    train = [doc for i, doc in enumerate(documents) if i not in held_out]
    val = [doc for i, doc in enumerate(documents) if i in held_out]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (no unknown tokens) whose `tokenizer(text)` starts with the special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer, length=len(texts))
    bos_id = backend.token_to_id(SPECIAL_TOKEN)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{SPECIAL_TOKEN} $A", pair=f"{SPECIAL_TOKEN} $A {SPECIAL_TOKEN} $B:1",
                                      special_tokens=[(SPECIAL_TOKEN, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN,
                                   pad_token=SPECIAL_TOKEN)


@dataclass
class Windows:
    """Training sequences as one padded array: `tokens` (N, seq_len) int32, right-padded; `lengths` (N,) int32."""

    tokens: object  # np.ndarray (N, T) int32
    lengths: object  # np.ndarray (N,) int32
    pad_id: int

    @classmethod
    def from_documents(cls, tokenizer, documents: list[tuple[str, str]], seq_len: int) -> Windows:
        import numpy as np

        from whence.text import chunk_tokens, pad_id_of, tokenize_document

        pad_id = pad_id_of(tokenizer)
        windows = [w for _, text in documents for w in chunk_tokens(tokenize_document(tokenizer, text), seq_len)]
        tokens = np.full((len(windows), seq_len), pad_id, dtype=np.int32)
        lengths = np.zeros(len(windows), dtype=np.int32)
        for row, window in enumerate(windows):
            tokens[row, : len(window)] = window
            lengths[row] = len(window)
        return cls(tokens, lengths, pad_id)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_targets(self) -> int:
        """Predicted tokens: every token of a window but its first."""
        return int(self.lengths.sum() - len(self.lengths))

    def targets(self):
        """The predicted tokens of all windows, flattened (int64)."""
        import numpy as np

        positions = np.arange(self.tokens.shape[1])
        mask = (positions >= 1) & (positions < self.lengths[:, None])  # (N, T)
        return self.tokens[mask].astype(np.int64)


def unigram_baseline(train: Windows, val: Windows, vocab_size: int) -> dict:
    """Cross-entropy of the validation targets under the training targets' unigram distribution (add-one
    smoothed, so a token unseen in training costs a finite amount), and that distribution's own entropy."""
    import numpy as np

    counts = np.bincount(train.targets(), minlength=vocab_size).astype(np.float64) + 1.0  # add-one smoothing
    log_p = np.log(counts / counts.sum())  # (V,)
    return {
        "unigram_val_loss": float(-log_p[val.targets()].mean()),
        "unigram_train_entropy": float(-(np.exp(log_p) * log_p).sum()),
    }


def llama_config(config: PretrainConfig, tokenizer):
    from transformers import LlamaConfig

    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.mlp_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.seq_len,
        tie_word_embeddings=False,
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
    )


# ---------------------------------------------------------------------------------------------------------------
# Training with Ray Train


def _train_on_ray(model_config, config: PretrainConfig, train: Windows, val: Windows, workers: int,
                  address: str | None, storage_path: str | None) -> dict:
    """Run `train_loop` on `workers` Ray Train workers; the rank-0 worker's result (weights, losses).

    The workers checkpoint at every log step; a failed worker group is restarted (up to MAX_FAILURES times) and
    resumes from the latest checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flows.cluster import connect

    started_here = not ray.is_initialized()
    connect(address)  # ray.init(address) unless this process is already connected
    try:
        resources = ray.cluster_resources()
        use_gpu = resources.get("GPU", 0) >= 1
        # On CPU, share the cluster's cores among the workers; each worker sets torch's thread count to its share.
        cpus = 1 if use_gpu else max(1, int(resources.get("CPU", 1)) // workers)
        loop_config = {
            "model_config": model_config.to_dict(),
            "train_ref": ray.put(train),
            "val_ref": ray.put(val),
            "steps": config.total_steps,
            "time_limit_s": None if config.time_limit is None else 60.0 * config.time_limit,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "seed": config.seed,
            "log_every": config.log_every,
            "cpus_per_worker": cpus,
        }
        with tempfile.TemporaryDirectory(prefix="whence-pretrain-") as scratch:
            trainer = TorchTrainer(
                train_loop,
                train_loop_config=loop_config,
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                             resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
                run_config=RunConfig(
                    name=f"whence-pretrain-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                    storage_path=storage_path or scratch,
                    failure_config=FailureConfig(max_failures=MAX_FAILURES),
                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                    # Ray Train's own INFO lines (one per report) would drown the loss log.
                    logging_config=LoggingConfig(log_level="WARNING"),
                ),
            )
            result = trainer.fit()
        return result.return_value
    finally:
        if started_here:
            ray.shutdown()


def train_loop(loop_config: dict) -> dict | None:
    """Ray Train's per-worker loop: DDP training, then the validation loss over every validation window.

    Every worker takes its share of each global batch and of the validation windows; rank 0 returns the weights
    (numpy arrays), the losses and the loss history.
    """
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(int(loop_config["cpus_per_worker"]))
    train, val = ray.get(loop_config["train_ref"]), ray.get(loop_config["val_ref"])
    steps, batch_size, seed = loop_config["steps"], loop_config["batch_size"], loop_config["seed"]
    per_worker = batch_size // world

    torch.manual_seed(seed)  # the same initial weights on every worker (DDP also broadcasts rank 0's)
    model = LlamaForCausalLM(LlamaConfig.from_dict(loop_config["model_config"]))
    parameters = sum(p.numel() for p in model.parameters())
    saved = _load_train_state()  # after a restart: weights, optimizer, step, elapsed time, history
    if saved is not None:
        model.load_state_dict(saved["model"])
    model = ray.train.torch.prepare_model(model)
    optimizer = _optimizer(model, loop_config["lr"])
    clock = _Clock(steps, loop_config["time_limit_s"], device, world)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    eval_subset = np.arange(min(EVAL_SUBSET_WINDOWS, len(val)))
    batches = _global_batches(len(train), batch_size, seed)

    step, history, tokens_seen, interval_loss, interval_steps = 0, [], 0, 0.0, 0
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        step, history, tokens_seen = saved["step"], saved["history"], saved["tokens_seen"]
        clock.started -= saved["elapsed"]
        for _ in range(step):  # replay the window order up to where the checkpoint was taken
            next(batches)
        if rank == 0:
            log.info("resumed from the checkpoint at step %d (%.0fs of training)", step, saved["elapsed"])
    interval_started = time.time()
    model.train()
    while not clock.done(step):
        step += 1
        lr = loop_config["lr"] * _lr_multiplier(step, clock.progress(step), steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = next(batches)  # (batch_size,) window indices, the same on every worker
        input_ids, labels = _batch(train, rows[rank * per_worker : (rank + 1) * per_worker], device)
        with autocast:
            logits = model(input_ids=input_ids).logits  # (b, T, V)
        loss = _next_token_loss(logits, labels, reduction="mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        tokens_seen += int(train.lengths[rows].sum())
        interval_loss, interval_steps = interval_loss + loss.item(), interval_steps + 1
        if step % loop_config["log_every"] == 0 or clock.done(step):
            val_subset = _evaluate(model, val, eval_subset, device, autocast, rank, world)
            metrics = {"step": step, "train_loss": interval_loss / interval_steps, "val_loss_subset": val_subset,
                       "lr": lr, "tokens_seen": tokens_seen, "seconds": round(clock.elapsed(), 1),
                       "tokens_per_second": round(tokens_seen / clock.elapsed())}
            history.append(metrics)
            if rank == 0:
                log.info("step %d/%d: train loss %.4f, val loss (first %d windows) %.4f, lr %.2e, %d tokens/s, "
                         "%.0fs", step, steps, metrics["train_loss"], len(eval_subset), val_subset, lr,
                         metrics["tokens_per_second"], time.time() - interval_started)
            state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "history": history, "tokens_seen": tokens_seen, "elapsed": clock.elapsed()}
            _report_with_checkpoint(metrics, state if rank == 0 else None)
            interval_loss, interval_steps, interval_started = 0.0, 0, time.time()
    seconds = clock.elapsed()
    val_loss = _evaluate(model, val, np.arange(len(val)), device, autocast, rank, world)
    ray.train.report({"step": step, "val_loss": val_loss})
    if rank != 0:
        return None
    return {
        "state_dict": {name: t.detach().cpu().numpy() for name, t in _unwrap(model).state_dict().items()},
        "val_loss": val_loss,
        "history": history,
        "steps": step,
        "stopped_by_time_limit": step < steps,
        "tokens_seen": tokens_seen,
        "seconds": seconds,
        "parameters": parameters,
        "device": f"{world} x {device.type}" + (f" ({loop_config['cpus_per_worker']} threads)"
                                                  if device.type == "cpu" else ""),
    }


def _unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def _report_with_checkpoint(metrics: dict, state: dict | None) -> None:
    """ray.train.report on every worker (it is a barrier); the worker passing `state` also saves a checkpoint."""
    import ray.train
    import torch

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="whence-pretrain-ckpt-") as directory:
        torch.save(state, Path(directory) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _load_train_state() -> dict | None:
    """The training state of the latest checkpoint of this run, if Ray Train restarted the workers."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu")


def _optimizer(model, lr: float):
    """AdamW with weight decay on matrices (embeddings and linear layers), none on norm weights."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS)


class _Clock:
    """How far training has got: the larger of the fraction of steps done and the fraction of the time limit used.

    With several workers, rank 0's elapsed time is broadcast every step so that all stop at the same step.
    """

    def __init__(self, steps: int, time_limit_s: float | None, device, world: int):
        self.steps, self.time_limit_s, self.device, self.world = steps, time_limit_s, device, world
        self.started = time.time()
        self._synced: tuple[int, float] = (-1, 0.0)  # (step, elapsed seconds agreed on at that step)

    def elapsed(self) -> float:
        return time.time() - self.started

    def _agreed_elapsed(self, step: int) -> float:
        if self._synced[0] != step:
            elapsed = self.elapsed()
            if self.world > 1:
                import torch
                import torch.distributed as dist

                value = torch.tensor([elapsed], dtype=torch.float64, device=self.device)
                dist.broadcast(value, src=0)
                elapsed = float(value.item())
            self._synced = (step, elapsed)
        return self._synced[1]

    def progress(self, step: int) -> float:
        """In [0, 1]: the fraction of training done before `step` runs."""
        done = (step - 1) / self.steps
        if self.time_limit_s is not None:
            done = max(done, self._agreed_elapsed(step) / self.time_limit_s)
        return min(1.0, done)

    def done(self, step: int) -> bool:
        """True once `step` steps have run and training should stop (all steps, or the time limit reached)."""
        if step >= self.steps:
            return True
        return self.time_limit_s is not None and step > 0 and self._agreed_elapsed(step) >= self.time_limit_s


def _lr_multiplier(step: int, progress: float, steps: int) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine decay to FINAL_LR_FRACTION as `progress` goes to 1.

    Warm-up ends after MAX_WARMUP_STEPS steps or a WARMUP_FRACTION of training (by steps or time), whichever is
    first; `progress` (steps or time, whichever is further along) then drives the decay.
    """
    warm = max(step / MAX_WARMUP_STEPS, progress / WARMUP_FRACTION, step / max(1.0, WARMUP_FRACTION * steps))
    if warm < 1:
        return warm
    decay_start = min(WARMUP_FRACTION, MAX_WARMUP_STEPS / steps)  # where warm-up ends when steps decide
    decay = min(1.0, max(0.0, (progress - decay_start) / (1 - decay_start)))
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * decay))


def _global_batches(num_windows: int, batch_size: int, seed: int):
    """Endless batches of window indices: each epoch a new random order, batches running across epochs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pending = np.empty(0, dtype=np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(num_windows)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _batch(windows: Windows, rows, device):
    """(input_ids, labels), both (b, T) int64; labels are IGNORE_INDEX on padding.

    Padding is on the right and attention is causal, so no real token attends to a pad: no attention mask needed.
    """
    import numpy as np
    import torch

    input_ids = torch.from_numpy(windows.tokens[rows].astype(np.int64))  # (b, T)
    labels = input_ids.clone()
    labels[torch.arange(labels.shape[1]) >= torch.from_numpy(windows.lengths[rows])[:, None]] = IGNORE_INDEX
    return input_ids.to(device), labels.to(device)


def _next_token_loss(logits, labels, reduction: str):
    """-log p(x_t | x_<t) over positions t >= 2 (logits at t-1 predict the label at t), ignoring padding."""
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def _evaluate(model, windows: Windows, rows, device, autocast, rank: int, world: int,
              batch_size: int = 32) -> float:
    """Mean loss per predicted token over windows[rows]; each worker scores every world-th row, then a sum."""
    import torch
    import torch.distributed as dist

    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, predicted tokens)
    mine = rows[rank::world]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            input_ids, labels = _batch(windows, mine[start : start + batch_size], device)
            with autocast:
                logits = model(input_ids=input_ids).logits
            total[0] += _next_token_loss(logits, labels, reduction="sum").double()
            total[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


# ---------------------------------------------------------------------------------------------------------------
# Output directory


def _finished_run_matches(out: Path, arguments: dict, overwrite: bool) -> bool:
    """True if `out` holds a finished run with these arguments; raises if it holds anything else (no --overwrite)."""
    if overwrite or not out.exists():
        return False
    if not out.is_dir():
        raise RunStateError(f"{out} is a file, not a model directory")
    if not any(out.iterdir()):
        return False
    report = out / REPORT_FILE
    if report.is_file():
        previous = json.loads(report.read_text()).get("arguments")
        if previous == arguments:
            return True
        raise RunStateError(f"{out} holds a model trained with other arguments ({report}); pass --overwrite to "
                            "replace it")
    raise RunStateError(f"{out} exists and is not a finished `whence pretrain` run; pass --overwrite to replace it")


def _write_model_dir(out: Path, model_config, state_dict: dict, tokenizer, report: dict, overwrite: bool) -> None:
    """Save the model, tokenizer and report under a temporary name beside `out`, then move it into place."""
    import torch
    from transformers import LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model = LlamaForCausalLM(model_config)
        model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in state_dict.items()})
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _portable_tokenizer_class(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _usual_permissions(staging)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise FileExistsError(f"{out} appeared while training")
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _usual_permissions(directory: Path) -> None:
    """Readable by others as the umask allows (mkdtemp makes the directory private; some writers do files too)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _portable_tokenizer_class(directory: Path) -> None:
    """Name the tokenizer class that both transformers 4 and 5 load from tokenizer.json as it is.

    transformers 5 writes "TokenizersBackend", which transformers 4 lacks; both know "PreTrainedTokenizerFast".
    """
    path = directory / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("whence", "torch", "transformers", "tokenizers", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
