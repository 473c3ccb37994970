"""`whence eval`: measure how right the influences are.

    whence eval lds     the linear datamodeling score of each method, from models retrained on subsets -> DIR/lds.json
    whence eval trace   fact tracing: recall@k and MRR of each query's known source       -> DIR/trace.json
    whence eval exact   each method against exact damped-Fisher influence (small models)  -> DIR/exact.json
    whence eval bundled lds and trace on the bundled slice of the demo corpus (flows/eval_assets/)

One module per subcommand (flows/eval/lds.py, trace.py, exact.py), each with `add_arguments(parser)` and
`run(args)`, as the top-level commands are; flows/eval/common.py holds what they share (options, reading the
corpus in process, writing results). The mathematics lives in whence.evaluation. Scoring runs in this
process through the Python API: these are meant for models and corpora small enough to score every
(query, sequence) pair; `lds` trains its subset models as parallel Ray tasks (flows/eval/lds_training.py).
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "lds": ("flows.eval.lds", "linear datamodeling score: do summed scores predict retraining on subsets?"),
    "trace": ("flows.eval.trace", "fact tracing: recall@1/10/100 and MRR of each query's source document"),
    "exact": ("flows.eval.exact", "each method's Pearson and Spearman against exact influence (small models)"),
    "bundled": ("flows.eval.bundled", "the bundled setup: lds and trace on a slice of the demo corpus (~30 min)"),
}


# The Python API of the subcommands, imported when first used (the command line's --help stays fast).
PYTHON_API = {"lds_corpus": "flows.eval.lds", "LDSSettings": "flows.eval.lds", "trace_corpus": "flows.eval.trace",
              "TraceSettings": "flows.eval.trace", "exact_corpus": "flows.eval.exact",
              "ExactSettings": "flows.eval.exact", "run_bundled": "flows.eval.bundled"}


def __getattr__(name: str):
    if name in PYTHON_API:
        return getattr(importlib.import_module(PYTHON_API[name]), name)
    raise AttributeError(f"module 'flows.eval' has no attribute {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(SUBCOMMANDS[args.eval_command][0]).run(args) or 0)
