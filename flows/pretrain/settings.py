"""`whence pretrain`'s settings and command line: PretrainConfig (what to train, for how long) and its options.

The run's arguments (`run_arguments`) are what `training_report.json` records under "arguments" and what a
rerun is compared with: the corpus, its id and text fields, the workers and every PretrainConfig field.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from whence.errors import WhenceError
from whence.settings import help_for, setting

MIN_VOCAB_SIZE = 257 + 3  # 256 byte symbols, the special token, and a few merges


@dataclass
class PretrainConfig:
    """What to train and for how long. The defaults are the demo's recipe (flows/demo_assets/README.md)."""

    vocab_size: int = setting("BPE vocabulary size, the special token included", 4096)
    hidden_size: int = setting("width of the residual stream", 192)
    intermediate_size: int | None = setting("width of the MLP (None: 8/3 x hidden, rounded up to a multiple of 32)",
                                            None)
    layers: int = setting("transformer blocks", 4)
    heads: int = setting("attention heads (hidden_size / heads must be even, for rotary embeddings)", 4)
    seq_len: int = setting("tokens per training window, and the model's context length", 256)
    steps: int | None = setting("optimizer steps (None: from `tokens`, or 2400 when neither is given)", None)
    tokens: int | None = setting("train on about this many tokens (window slots: steps x batch_size x seq_len)", None)
    time_limit: float | None = setting("stop training after this many minutes even if steps remain; the learning "
                                       "rate then decays with elapsed time, so it still ends low", None)
    batch_size: int = setting("windows per optimizer step, over all workers together", 16)
    lr: float = setting("peak learning rate (AdamW; linear warm-up, then cosine decay to a tenth of it)", 2e-3)
    val_fraction: float = setting("fraction of the documents held out for validation", 0.05)
    seed: int = setting("seed for the validation split, the initialisation and the order of windows", 0)
    log_every: int = setting("log the training loss, and a validation loss on a few windows, every N steps", 50)

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


# PretrainConfig options in --help order: (field, type, metavar), the model's shape before and the rest after
# the mutually exclusive --steps / --tokens.
SHAPE_OPTIONS = (("vocab_size", int, "N"), ("hidden_size", int, "N"), ("intermediate_size", int, "N"),
                 ("layers", int, "N"), ("heads", int, "N"), ("seq_len", int, "N"))
SCHEDULE_OPTIONS = (("time_limit", float, "MINUTES"), ("batch_size", int, "N"), ("lr", float, "FLOAT"),
                    ("val_fraction", float, "FLOAT"), ("seed", int, "N"), ("log_every", int, "N"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                        help="corpus files (.jsonl, .jsonl.gz, .parquet) or directories of them; fields id and text")
    parser.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR",
                        help="where to write the model, its tokenizer and training_report.json")
    parser.add_argument("--id-field", default="id", help="corpus field holding the document id (default: id)")
    parser.add_argument("--text-field", default="text", help="corpus field holding the document text (default: text)")
    add_recipe_options(parser)
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="Ray Train workers (data-parallel; one GPU each when the cluster has GPUs) (default: 1)")
    parser.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                        help="Ray cluster to join; 'local' starts a new one (default: the connected one, else RAY_ADDRESS, "
                             "else a running local cluster, else a new one)")
    parser.add_argument("--storage-path", default=None, metavar="PATH_OR_URI",
                        help="where Ray Train keeps checkpoints: shared storage (s3://..., NFS) on a multi-node "
                             "cluster (default: a temporary local directory, removed at the end)")
    parser.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if it holds another run")


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """One option per PretrainConfig field (the recipe), --steps and --tokens mutually exclusive."""
    _config_options(parser, SHAPE_OPTIONS)
    length = parser.add_mutually_exclusive_group()
    for name, type_ in (("steps", int), ("tokens", parse_count)):
        length.add_argument(f"--{name}", dest=name, type=type_, metavar="N", default=None,
                            help=help_for(PretrainConfig, name))
    _config_options(parser, SCHEDULE_OPTIONS)


def _config_options(parser: argparse.ArgumentParser, options) -> None:
    """One option per PretrainConfig field: its help text, and its default when it has one."""
    defaults = PretrainConfig.__dataclass_fields__
    for name, type_, metavar in options:
        default = defaults[name].default
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type_, metavar=metavar, default=default,
                            help=help_for(PretrainConfig, name) + shown)


def parse_count(text: str) -> int:
    """An integer that may be written 5e6 or 5_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from error
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The PretrainConfig of the command line, checked against --workers (each takes an equal share of a batch)."""
    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    if args.workers < 1:
        raise WhenceError(f"--workers must be positive, got {args.workers}")
    if config.batch_size % args.workers:
        raise WhenceError(f"--batch-size {config.batch_size} must be a multiple of --workers {args.workers}")
    return config


def run_arguments(args: argparse.Namespace, config: PretrainConfig) -> dict:
    """The arguments that define the run (training_report.json's "arguments"; the keys runs have always used)."""
    return {"corpus": [str(p) for p in args.corpus], "id_field": args.id_field, "text_field": args.text_field,
            "workers": args.workers, **config.to_dict()}
