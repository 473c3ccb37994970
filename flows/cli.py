"""The `whence` command line: a thin layer that parses options and hands them to one module per command.

Each command lives in its own module of `flows/` exposing two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int        # the process exit code

Modules are imported only when their command runs, so `whence --help` stays fast and `whence report`
never starts Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from flows.options import check_local_output
from whence.errors import WhenceError
from whence.redact import redact_text

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("flows.fit", "fit EK-FAC (or K-FAC, diagonal) factors of a causal LM on a corpus"),
    "score": ("flows.score", "score corpus sequences against queries; write top-k influences per query"),
    "report": ("flows.report", "write RESULTS_DIR/report.html from a scoring run"),
    "pretrain": ("flows.pretrain", "pretrain a small causal LM on a corpus with Ray Train (the demo's model)"),
    "bench": ("flows.bench", "measure speed and memory as ratios taken in one run"),
    "demo": ("flows.demo", "the main job on the bundled corpus: fit, filter, score, report"),
    "eval": ("flows.eval", "measure how right the influences are: LDS, fact tracing, exact influence"),
    "index": ("flows.index", "store every corpus sequence's compressed gradient once, for `whence query`"),
    "query": ("flows.query", "answer queries from an index by matrix products; write the files of `whence score`"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to register its options (others show their help line)."""
    parser = argparse.ArgumentParser(
        prog="whence",
        description="Which training documents made the model say this? Influence functions (EK-FAC) on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if word in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        check_local_output(getattr(args, "out", None), command=args.command)  # every command's --out
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun with the same arguments resumes", file=sys.stderr)
        return 130
    except WhenceError as error:
        print(f"whence {args.command}: error: {redact_text(str(error))}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
