"""`whence eval`: measure how right the influences are.

    whence eval trace   fact tracing: recall@k and MRR of each query's known source       -> DIR/trace.json
    whence eval exact   each method against exact damped-Fisher influence (small models)  -> DIR/exact.json

One module per subcommand (flows/eval/trace.py, flows/eval/exact.py), each with `add_arguments(parser)` and
`run(args)`, as the top-level commands are; flows/eval/common.py holds what they share (options, reading the
corpus in process, writing results). The mathematics lives in whence.evaluation. Both subcommands run in
this process through the Python API: they are meant for models and corpora small enough to score every
(query, sequence) pair.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "trace": ("flows.eval.trace", "fact tracing: recall@1/10/100 and MRR of each query's source document"),
    "exact": ("flows.eval.exact", "each method's Pearson and Spearman against exact influence (small models)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(SUBCOMMANDS[args.eval_command][0]).run(args) or 0)
