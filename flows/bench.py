"""`whence bench`: speed and memory as ratios measured in one run, against the project's targets.

    whence bench [--config tiny|medium] [--out FILE.json]

Every figure is a ratio of two measurements taken in the same run (interleaved, best of n), so it holds on a
noisy machine; on a GPU the absolute throughput is printed too. `tiny` finishes in well under a minute (CI);
`medium` is a Llama-like shape (4 blocks, width 512, intermediate 1376, vocab 32000, seq len 512) and takes
several minutes on two CPU cores. Models are built from configs with random weights: timing does not depend on
the weights. The measurements (one function each below):

    1. scoring throughput / plain training-step throughput   1, 8, 32, 128 queries at rank 32 and full rank
    2. fit_factors time / training time over the same tokens
    3. LiSSA time to EK-FAC's accuracy / EK-FAC query preparation time   (micro model, exact damped Fisher)
    4. TF-IDF filtering: peak memory and docs/s on the corpus 4x over 1x
    5. `whence score` throughput after start-up over the in-process kernel's, 6. its peak memory 4x over 1x,
    7. 2 workers over 1, 8. 2 model shards (pipeline stages) over 1 and the stages' idle share   (Ray)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("whence.bench")

CONFIG_NAMES = ("tiny", "medium")
MEASUREMENTS = ("fitting", "scoring", "lissa", "tfidf", "pipeline", "score_memory", "workers", "shards")
PIPELINE_MEASUREMENTS = ("pipeline", "score_memory", "workers", "shards")  # need Ray (and flows.score)
# figure -> (comparison, target). Figures without a target are reported for context.
TARGETS = {
    "scoring_q32_rank32": (">=", 1.3),
    "fitting_vs_training": ("<=", 2.0),
    "lissa_vs_ekfac_preparation": (">=", 100.0),
    "tfidf_peak_memory_4x_vs_1x": ("<=", 1.15),
    "score_peak_memory_4x_vs_1x": ("<=", 1.15),
    "pipeline_throughput_vs_in_process": (">=", 0.85),
}
# Targets are stated for the medium shape; tiny is for checking that the benchmark runs.
TARGET_CONFIG = "medium"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=CONFIG_NAMES, default="medium",
                        help="model shape: tiny (CI, under a minute) or medium (Llama-like, several minutes)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                        help="also write every figure, its target and the raw timings as JSON")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]",
                        help=f"run only these measurements: {', '.join(MEASUREMENTS)}")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed repetitions of each step, best of N (default: the config's)")


@dataclass
class Results:
    """What the measurements found: ratios (figures), raw numbers (details) and what could not be measured."""

    figures: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # measurement -> why it was not measured


@dataclass
class Bench:
    """The shared state of one run: the model, its tracked layers and fitted factors, built once."""

    config: object  # whence.benchmarks.BenchConfig
    device: object
    dtype: object
    model: object = None
    layers: list = None
    tokenizer: object = None
    factors: object = None
    batches: list = None
    pipeline: object = None  # flows.bench_pipeline.PipelineFixture, made on first use

    def ensure_model(self) -> None:
        from whence.benchmarks import build_model, random_batches
        from whence.model import find_tracked_layers

        if self.model is None:
            self.model = build_model(self.config, self.device, self.dtype)
            self.layers = find_tracked_layers(self.model, "mlp")
            self.batches = random_batches(self.config, self.config.fit_batches, self.device)

    def ensure_tokenizer(self) -> None:
        from whence.benchmarks import find_corpus, iter_documents, make_tokenizer

        if self.tokenizer is None:
            texts = (text for _, text in iter_documents(find_corpus(), limit=200))
            self.tokenizer = make_tokenizer(texts, self.config.vocab)


def run(args: argparse.Namespace) -> int:
    import torch

    from whence.benchmarks import CONFIGS
    from whence.errors import WhenceError
    from whence.model import default_device, parse_dtype

    config = CONFIGS[args.config]
    if args.repeats is not None:
        if args.repeats < 1:
            raise WhenceError(f"--repeats must be at least 1, got {args.repeats}")
        from dataclasses import replace

        config = replace(config, repeats=args.repeats, fit_repeats=args.repeats)
    selected = MEASUREMENTS if args.only is None else tuple(n.strip() for n in args.only.split(","))
    skipped = [] if args.only is not None or config.pipeline else [n for n in selected if n in PIPELINE_MEASUREMENTS]
    unknown = sorted(set(selected) - set(MEASUREMENTS))
    if unknown:
        raise WhenceError(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")
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
        for name in (n for n in selected if n not in skipped):
            tick = time.perf_counter()
            print(f"[{name}]", flush=True)
            MEASURE[name](bench, results)
            print(f"  ({time.perf_counter() - tick:.1f}s)", flush=True)
    finally:
        from flows.bench_pipeline import cleanup

        cleanup(bench)
    print()
    print(format_table(results, config.name, absolute=device.type == "cuda"))
    if args.out is not None:
        write_results(args.out, results, bench, time.perf_counter() - started)
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# The measurements: each adds figures (ratios), details (raw numbers) or a pending reason to `results`.


def measure_fitting(bench: Bench, results: Results) -> None:
    """2. fit_factors (covariance pass + eigendecompositions + correction pass) over training steps."""
    from whence.benchmarks import fitting_time

    bench.ensure_model()
    figures, details, bench.factors = fitting_time(bench.model, bench.layers, bench.batches,
                                                   bench.config.fit_repeats, bench.device)
    results.figures.update(figures)
    results.details["fitting"] = details


def measure_scoring(bench: Bench, results: Results) -> None:
    """1. QueryScorer throughput over plain-training throughput, per number of queries and rank."""
    from whence.benchmarks import prepared_by_rank, scoring_throughput
    from whence.factors import compute_dtype
    from whence.fitting import fit_factors

    bench.ensure_model()
    bench.ensure_tokenizer()
    if bench.factors is None:  # scoring alone: factors from one batch are enough to time it
        bench.factors = fit_factors(bench.model, bench.layers, lambda: iter(bench.batches[:1]))
    prepared = prepared_by_rank(bench.model, bench.tokenizer, bench.layers, bench.factors, bench.config.ranks,
                                compute_dtype(bench.dtype))  # the precision QueryScorer keeps queries in
    figures, details = scoring_throughput(bench.model, bench.layers, prepared, bench.batches[0],
                                          bench.config.query_counts, bench.config.repeats, bench.device)
    results.figures.update(figures)
    results.details["scoring"] = details


def measure_query_preparation(bench: Bench, results: Results) -> None:
    """3. LiSSA iterations to EK-FAC's accuracy over EK-FAC preparation, on the micro model."""
    from whence.benchmarks import ekfac_vs_lissa, micro_setting

    setting = micro_setting(bench.config.micro_sequences)
    figures, details = ekfac_vs_lissa(setting, bench.config.repeats)
    results.figures.update(figures)
    results.details["lissa"] = details


def measure_tfidf(bench: Bench, results: Results) -> None:
    """4. TF-IDF filtering docs/s and peak memory, corpus 4x over 1x."""
    from whence.benchmarks import find_corpus, tfidf_scaling

    figures, details = tfidf_scaling(find_corpus(), bench.config)
    results.figures.update(figures)
    results.details["tfidf"] = details


def measure_pipeline_overhead(bench: Bench, results: Results) -> None:
    """5. `whence score` (flows.score.score_corpus) throughput after start-up over the in-process QueryScorer's
    on the same sequences."""
    from flows.bench_pipeline import pipeline_overhead

    _pipeline_measurement(bench, results, "pipeline", pipeline_overhead)


def measure_score_memory(bench: Bench, results: Results) -> None:
    """6. Peak memory of `whence score` on the corpus 4x over 1x."""
    from flows.bench_pipeline import score_memory

    _pipeline_measurement(bench, results, "score_memory", score_memory)


def measure_worker_scaling(bench: Bench, results: Results) -> None:
    """7. `whence score` throughput with 2 workers over 1 worker."""
    from flows.bench_pipeline import worker_scaling

    _pipeline_measurement(bench, results, "workers", worker_scaling)


def measure_shard_scaling(bench: Bench, results: Results) -> None:
    """8. Scoring throughput with the model in 2 stage actors over 1, and the stages' idle share."""
    from flows.bench_pipeline import shard_scaling

    _pipeline_measurement(bench, results, "shards", shard_scaling)


def _pipeline_measurement(bench: Bench, results: Results, name: str, measure) -> None:
    try:
        figures, details = measure(bench)
    except ImportError as error:  # Ray, or flows.score, missing from this installation
        results.pending[name] = f"not measured: {error}"
        return
    results.figures.update(figures)
    results.details[name] = details


MEASURE = {
    "fitting": measure_fitting,
    "scoring": measure_scoring,
    "lissa": measure_query_preparation,
    "tfidf": measure_tfidf,
    "pipeline": measure_pipeline_overhead,
    "score_memory": measure_score_memory,
    "workers": measure_worker_scaling,
    "shards": measure_shard_scaling,
}


# ---------------------------------------------------------------------------------------------------------
# Output


def verdict(name: str, value: float, config_name: str) -> str:
    if name not in TARGETS:
        return ""
    comparison, target = TARGETS[name]
    met = value >= target if comparison == ">=" else value <= target
    scope = "" if config_name == TARGET_CONFIG else f" (target is for {TARGET_CONFIG})"
    return ("meets" if met else "MISSES") + scope


def format_table(results: Results, config_name: str, absolute: bool = False) -> str:
    rows = [("figure (ratio)", "value", "target", "")]
    for name, value in results.figures.items():
        comparison, target = TARGETS.get(name, ("", None))
        rows.append((name, f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}",
                     f"{comparison} {target:g}" if target is not None else "", verdict(name, value, config_name)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if absolute:
        for key, detail in results.details.get("scoring", {}).items():
            lines.append(f"{key}: scoring {detail['score_tokens_per_s']:,.0f} tokens/s, "
                         f"training {detail['train_tokens_per_s']:,.0f} tokens/s")
    for name, reason in results.pending.items():
        lines.append(f"{name}: {reason}")
    return "\n".join(lines)


def write_results(path: Path, results: Results, bench: Bench, seconds: float) -> None:
    import torch

    bad = [name for name, value in results.figures.items() if not math.isfinite(value)]
    if bad:
        log.warning("non-finite figures: %s", ", ".join(bad))
    body = {
        "config": bench.config.to_dict(),
        "shape": bench.config.describe(),
        "device": str(bench.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "figures": results.figures,
        "targets": {name: f"{c} {t:g}" for name, (c, t) in TARGETS.items()},
        "target_config": TARGET_CONFIG,
        "details": results.details,
        "pending": results.pending,
        "seconds": seconds,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2, default=str))
