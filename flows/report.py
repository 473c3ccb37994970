"""`whence report RESULTS_DIR`: write a self-contained HTML report of a scoring run (no Ray needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

# Keep in step with whence.report.page.DEFAULT_MAX_SEQUENCES (not imported here, so that --help stays fast).
DEFAULT_MAX_SEQUENCES = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results_dir",
        metavar="RESULTS_DIR",
        type=Path,
        help="a `whence score` output directory (manifest.json, topk.parquet, optional tokens/scores.parquet)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        type=Path,
        default=None,
        help="where to write the HTML report (default: RESULTS_DIR/report.html)",
    )
    parser.add_argument(
        "--max-sequences",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_SEQUENCES,
        help=f"top sequences shown per query, in the table and as highlighted text (default: {DEFAULT_MAX_SEQUENCES})",
    )


def run(args: argparse.Namespace) -> int:
    from whence.errors import WhenceError
    from whence.report import write_report

    if args.max_sequences < 1:
        raise WhenceError(f"--max-sequences must be at least 1, got {args.max_sequences}")
    path = write_report(args.results_dir, out=args.out, max_sequences=args.max_sequences)
    print(f"wrote {path}")
    return 0
