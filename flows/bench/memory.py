"""`whence bench --only memory`: peak resident memory of a `whence fit` against the factors it writes.

For the config's shape and for the same shape with MEMORY_DEEP_BLOCKS blocks (about SmolLM2-135M's size at the
medium config), each fitted with 1 and 2 workers, with 2 shards and with 1 worker and activation checkpointing, on
MEMORY_SEQUENCES sequences of the demo corpus: the driver's peak, each fitting actor's peak over the factors'
bytes, the largest process's peak over its budget (`*_peak_vs_budget`: the whole model's weights plus 1.5 x an even
share of the factors, per worker or per stage), and the estimate (whence.memory_estimate) over the measured peak
(the driver's too; each actor's peak per phase goes in the details). Targets (issue 16): no process above model +
1.5 x the layers it owns (peak_vs_budget <= 1); the driver below 1 GiB whatever the model.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

MEMORY_DEEP_BLOCKS = 30
MEMORY_SEQUENCES = 16
VARIANTS = {"1w": dict(workers=1), "2w": dict(workers=2), "2s": dict(workers=1, shards=2),
            "1w-ckpt": dict(workers=1, checkpointing=True)}


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in (directory / "layers").glob("*.safetensors"))


def fit_in_subprocess(model_dir: Path, out: Path, config, layout: dict, address: str) -> dict:
    """`whence fit` as a user runs it, in its own process (so the driver's peak is the fit's alone), on the bench's
    cluster; its summary (which holds the measured peaks and the estimate)."""
    import json
    import subprocess
    import sys

    from flows.bench.fixtures import demo_corpus

    command = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())", "fit",
               "--model", str(model_dir), "--corpus", str(demo_corpus()), "--out", str(out), "--address", address,
               "--seq-len", str(config.seq_len), "--batch-size", str(config.batch_size),
               "--max-sequences", str(MEMORY_SEQUENCES), "--workers", str(layout.get("workers", 1)),
               "--shards", str(layout.get("shards", 1))] + (["--activation-checkpointing"] if layout.get("checkpointing")
                                                           else [])
    subprocess.run(command, check=True)
    return json.loads((out / "run.json").read_text())["summary"]


def fit_memory(bench) -> tuple[dict, dict]:
    """(figures, details) over the two shapes and the three layouts."""
    import ray

    from flows.bench.fixtures import build_model
    from flows.cluster import connect

    bench.ensure_tokenizer()
    connect(None)
    address = ray.get_runtime_context().gcs_address
    root = Path(tempfile.mkdtemp(prefix="whence-bench-memory-"))
    figures, details = {}, {}
    try:
        for label, config in ((bench.config.name, bench.config),
                              (f"{bench.config.name}{MEMORY_DEEP_BLOCKS}", replace(bench.config, blocks=MEMORY_DEEP_BLOCKS))):
            model_dir = root / f"model-{label}"
            model = build_model(config, "cpu", bench.dtype)
            model.save_pretrained(model_dir)
            bench.tokenizer.save_pretrained(model_dir)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            del model
            for variant, layout in VARIANTS.items():
                out = root / f"factors-{label}-{variant}"
                summary = fit_in_subprocess(model_dir, out, config, layout, address)
                memory, factors = summary["memory"], directory_bytes(out)
                peaks, estimate = memory["peak_rss"], memory["estimate"]
                name = f"fit_memory_{label}_{variant}"
                figures[f"{name}_actor_peak_vs_factors"] = max(peaks["actors"]) / factors
                # The target's budget: the weights plus 1.5 x the factors of the layers a process owns (an even
                # share of the layers per worker, per stage with shards).
                owned = factors / (layout.get("workers", 1) * layout.get("shards", 1))
                top = max(stage["peak_rss"] for pipeline in peaks["stages"] for stage in pipeline) if peaks.get(
                    "stages") else max(peaks["actors"])
                figures[f"{name}_peak_vs_budget"] = top / (weights + 1.5 * owned)
                figures[f"{name}_driver_peak_gib"] = peaks["driver"] / 2**30
                figures[f"{name}_estimate_vs_actor_peak"] = max(estimate["actors"]) / max(peaks["actors"])
                figures[f"{name}_estimate_vs_driver_peak"] = estimate["driver"] / peaks["driver"]
                if peaks.get("stages"):  # --shards: the stages own the sums, the pipelines' workers hold none
                    stage_peak = max(stage["peak_rss"] for pipeline in peaks["stages"] for stage in pipeline)
                    figures[f"{name}_stage_peak_vs_factors"] = stage_peak / factors
                    figures[f"{name}_estimate_vs_stage_peak"] = max(estimate["stages"]) / stage_peak
                details[name] = {"weights": weights, "factors": factors, "peak_rss": peaks, "estimate": estimate,
                                 "seconds": summary["seconds"]}  # peak_rss["phases"]: each actor's, per phase
                if layout.get("checkpointing"):  # what recomputing each block costs: the whole fit's seconds
                    plain = details[f"fit_memory_{label}_1w"]["seconds"]
                    figures[f"{name}_seconds_vs_1w"] = summary["seconds"] / plain
                print(f"  {name}: actors {[round(p / 2**20) for p in peaks['actors']]} MiB (estimate "
                      f"{[round(e / 2**20) for e in estimate['actors']]}), driver {peaks['driver'] / 2**20:.0f} MiB, "
                      f"weights {weights / 2**20:.0f} MiB, factors {factors / 2**20:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures, details
