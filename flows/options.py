"""Command-line options shared by `whence fit` and `whence score` (help text from the settings dataclasses), and
the parsed options turned into the objects the flows take: a settings dataclass, the corpus (CorpusSource) and,
in flows.cluster, the cluster (ClusterSettings.from_args)."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

from whence.config import FitConfig, help_for
from whence.corpus import CorpusSource
from whence.errors import SettingsError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_model_and_corpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR_OR_ID", help="Hugging Face causal LM: directory or hub id")
    parser.add_argument("--corpus", required=True, nargs="+", metavar="PATH",
                        help=".jsonl, .jsonl.gz, .parquet files or directories of them (local, s3://, gs://)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (resumed if unfinished)")
    parser.add_argument("--id-field", default="id", help="corpus field holding the document id")
    parser.add_argument("--text-field", default="text", help="corpus field holding the document text")
    parser.add_argument("--batch-size", type=positive_int, default=8, help=help_for(FitConfig, "batch_size"))
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="data-parallel workers, each holding a model replica (a GPU each on a GPU cluster)")
    parser.add_argument("--shards", type=positive_int, default=1,
                        help="split the model into this many pipeline stages (actors) per worker")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float64", "bfloat16"],
                        help="model precision: auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                        help="Ray cluster to join (default: the one a job runs in, else a new local one)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first malformed corpus row (default: skip and count them)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output directory that holds a run with other arguments")


def corpus_from_args(args: argparse.Namespace) -> CorpusSource:
    """The corpus of add_model_and_corpus's options: --corpus, --id-field, --text-field and --strict."""
    return CorpusSource(args.corpus, id_field=args.id_field, text_field=args.text_field, strict=args.strict)


def settings_from_args(settings_class, args: argparse.Namespace):
    """A settings dataclass (FitConfig, ScoreConfig) filled from the options named like its fields; a value out of
    range is a SettingsError naming the option and the value (`--damping nan: damping must be ...`)."""
    values = {f.name: getattr(args, f.name) for f in fields(settings_class) if hasattr(args, f.name)}
    try:
        return settings_class(**values)
    except SettingsError as error:
        if error.setting not in values:
            raise
        raise SettingsError(f"{option_name(error.setting)} {values[error.setting]}: {error}", error.setting) from None


# Fields whose option is not their name with dashes (a repeatable option, named in the singular).
OPTION_OF = {"baselines": "--baseline"}


def option_name(setting: str) -> str:
    """The command-line option of a settings field: seq_len -> --seq-len."""
    return OPTION_OF.get(setting, "--" + setting.replace("_", "-"))


# A scheme (s3://, gs://, file://, hdfs://, ...) at the start of a path; one slash too, as pathlib.Path("s3://b")
# prints "s3:/b" (options parsed with type=Path).
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


# Commands that write their --out through whence.storage (any pyarrow filesystem); the others use local files.
URI_OUTPUTS = ("fit", "index")


def check_local_output(path: str | None, option: str = "--out", command: str | None = None) -> None:
    """Outputs of commands outside URI_OUTPUTS are written with local file operations: a URI would become a
    local directory named `s3:`. Refuse it (SettingsError) rather than write somewhere the user did not ask for."""
    if command in URI_OUTPUTS:
        return
    if path is not None and URI.match(str(path)):
        raise SettingsError(f"{option} {path}: this command's outputs must be local paths (`whence fit` and "
                            "`whence index` write to URIs such as s3:// or gs://); write locally and copy the "
                            "directory to object storage", "out")

