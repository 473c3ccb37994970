"""The output of `whence bench`: each figure against its target, as a printed table and as JSON (--out)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("whence.bench")

# figure -> (comparison, target). Figures without a target are reported for context.
TARGETS = {
    "scoring_q32_rank32": (">=", 1.3),
    "fitting_vs_training": ("<=", 2.0),
    "lissa_vs_ekfac_preparation": (">=", 100.0),
    "tfidf_peak_memory_4x_vs_1x": ("<=", 1.15),
    "score_peak_memory_4x_vs_1x": ("<=", 1.15),
    "pipeline_throughput_vs_in_process": (">=", 0.85),
    # `whence score` on a multi-node cluster (flows.bench.scale): no process grows with the corpus.
    "scale_driver_peak_memory_4x_vs_1x": ("<=", 1.15),
    "scale_actor_peak_memory_4x_vs_1x": ("<=", 1.15),
    # The gradient index over the whole bundled corpus (flows.bench.index_bundled, issue #13).
    "index_bundled_query_vs_score_speedup": (">=", 20.0),
}
# Targets are stated for the medium shape; tiny is for checking that the benchmark runs. The scale and
# index_bundled measurements have their own model and corpus whatever the config: their targets hold for every one.
TARGET_CONFIG = "medium"
ANY_CONFIG_PREFIXES = ("scale_", "index_bundled_")


def verdict(name: str, value: float, config_name: str) -> str:
    if name not in TARGETS:
        return ""
    comparison, target = TARGETS[name]
    met = value >= target if comparison == ">=" else value <= target
    scope = "" if config_name == TARGET_CONFIG or name.startswith(ANY_CONFIG_PREFIXES) else \
        f" (target is for {TARGET_CONFIG})"
    return ("meets" if met else "MISSES") + scope


def format_value(value: float) -> str:
    """Three decimals; a large value whole, a small one (below 0.01, say bytes a sequence kept) in three digits."""
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.3f}"


def format_table(results, config_name: str, absolute: bool = False) -> str:
    """figure, value, target, verdict: one row per figure of `results` (flows.bench.measure.Results); then,
    with `absolute`, the scoring throughput in tokens/s, and why each pending measurement did not run."""
    rows = [("figure (ratio)", "value", "target", "")]
    for name, value in results.figures.items():
        comparison, target = TARGETS.get(name, ("", None))
        rows.append((name, format_value(value),
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


def write_results(path: Path, results, bench, seconds: float) -> None:
    """FILE.json: the config and shape, device and torch, every figure, the targets, details and pending."""
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
