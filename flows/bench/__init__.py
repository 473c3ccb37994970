"""`whence bench`: speed and memory as ratios measured in one run, against the project's targets.

    whence bench [--config tiny|medium] [--out FILE.json] [--only NAME[,NAME]] [--repeats N]

Every figure is a ratio of two measurements taken in the same run (interleaved, best of n), so it holds on a
noisy machine; on a GPU the absolute throughput is printed too. `tiny` finishes in well under a minute (CI);
`medium` is a Llama-like shape (4 blocks, width 512, intermediate 1376, vocab 32000, seq len 512) and takes
several minutes on two CPU cores. Models are built from configs with random weights: timing does not depend on
the weights. The measurements:

    1. scoring throughput / plain training-step throughput   1, 8, 32, 128 queries at rank 32 and full rank
    2. fit_factors time / training time over the same tokens
    3. LiSSA time to EK-FAC's accuracy / EK-FAC query preparation time   (micro model, exact damped Fisher)
    4. TF-IDF filtering: peak memory and docs/s on the corpus 4x over 1x
    5. `whence score` throughput after start-up over the in-process kernel's, 6. its peak memory 4x over 1x,
    7. 2 workers over 1, 8. 2 model shards (pipeline stages) over 1 and the stages' idle share   (Ray)
    9. `whence fit` peak memory of the driver and of each fitting actor over the factors' bytes, and the memory
       estimate over the measured peak (--only memory; flows.bench.memory)   (Ray)
   10. the scoring driver's bytes and CPU seconds per sequence, scorers sending their batches' top-k over every
       score (--only reduce; flows.bench.reduce)
   11. at scale, on a 3-node Ray cluster (ray.cluster_utils.Cluster) and 200,000 generated short sequences with a
       tiny model: the same driver costs measured in `whence score` itself, the scan's sequences/s from one .jsonl
       file's byte-range fragments over one .jsonl.gz, and the driver's and the largest scoring actor's peak
       memory on the corpus 4x over 1x (--only scale; flows.bench.scale)   (Ray)
   12. the gradient index against `whence score` on the pipeline fixture (--only index; flows.bench.index), and
       over the whole bundled corpus with the bundled model and 8 new queries, about 40 minutes (run only when
       named: --only index_bundled; flows.bench.index_bundled)   (Ray)

Layout of this package (beside the flows it measures; nothing in whence/ imports it):
    configs.py    BenchConfig, the named CONFIGS (tiny, medium), the queries about the demo corpus
    fixtures.py   the demo corpus (package data), a random Llama of the config's shape, batches, the tokenizer,
                  and Bench: that state, built once per run
    timing.py     timers (interleaved, best of n) and the plain training step every ratio is taken against
    micro.py      the micro setting shared with tests/test_accuracy.py (exact damped Fisher of one layer)
    kernels.py    measurements 1-4, in process
    pipeline.py   measurements 5-8, the Ray scoring pipeline and sharded workers
    memory.py     measurement 9, `whence fit` in subprocesses; real_model.py: SmolLM2-135M from its GGUF file
    reduce.py     measurement 10, in process
    scale.py      measurement 11, a multi-node Ray cluster started in this process
    index.py      measurement 12 on the fixture; index_bundled.py: over the whole bundled corpus
    measure.py    the measurements by name (--only) and Results
    table.py      the targets, the printed table and the JSON written by --out
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flows.bench.measure import MEASURE, MEASUREMENTS, NAMED_ONLY, PIPELINE_MEASUREMENTS, Results
from flows.bench.table import TARGET_CONFIG, TARGETS, format_table, write_results

__all__ = ["MEASUREMENTS", "PIPELINE_MEASUREMENTS", "TARGETS", "TARGET_CONFIG", "add_arguments", "run"]

CONFIG_NAMES = ("tiny", "medium")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=CONFIG_NAMES, default="medium",
                        help="model shape: tiny (CI, under a minute) or medium (Llama-like, several minutes)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                        help="also write every figure, its target and the raw timings as JSON")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]",
                        help=f"run only these measurements: {', '.join(MEASUREMENTS)}")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed repetitions of each step, best of N (default: the config's)")


def chosen_config(args: argparse.Namespace):
    """The named BenchConfig, with --repeats applied."""
    from dataclasses import replace

    from flows.bench.configs import CONFIGS
    from whence.errors import WhenceError

    config = CONFIGS[args.config]
    if args.repeats is not None:
        if args.repeats < 1:
            raise WhenceError(f"--repeats must be at least 1, got {args.repeats}")
        config = replace(config, repeats=args.repeats, fit_repeats=args.repeats)
    return config


def chosen_measurements(args: argparse.Namespace, config) -> tuple[list[str], list[str]]:
    """(to run, skipped): --only's names, else every measurement but the Ray ones of a config without them."""
    from whence.errors import WhenceError

    everything = tuple(name for name in MEASUREMENTS if name not in NAMED_ONLY)
    selected = everything if args.only is None else tuple(n.strip() for n in args.only.split(","))
    unknown = sorted(set(selected) - set(MEASUREMENTS))
    if unknown:
        raise WhenceError(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    skipped = [] if args.only is not None or config.pipeline else [n for n in selected if n in PIPELINE_MEASUREMENTS]
    return [n for n in selected if n not in skipped], skipped


def run(args: argparse.Namespace) -> int:
    import torch

    from flows.bench.fixtures import Bench
    from flows.bench.pipeline import cleanup
    from whence.model import default_device, parse_dtype

    config = chosen_config(args)
    selected, skipped = chosen_measurements(args, config)
    device = default_device()
    bench = Bench(config, device, parse_dtype("auto", device))
    print(f"whence bench --config {config.name}: {config.describe()}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = Results()
    for name in skipped:
        results.pending[name] = (f"skipped in the {config.name} config (Ray start-up dominates); "
                                 f"ask for it with --only {','.join(PIPELINE_MEASUREMENTS)}")
    started = time.perf_counter()
    try:
        for name in selected:
            tick = time.perf_counter()
            print(f"[{name}]", flush=True)
            MEASURE[name](bench, results)
            print(f"  ({time.perf_counter() - tick:.1f}s)", flush=True)
    finally:
        cleanup(bench)
    print()
    print(format_table(results, config.name, absolute=device.type == "cuda"))
    if args.out is not None:
        write_results(args.out, results, bench, time.perf_counter() - started)
        print(f"wrote {args.out}")
    return 0
