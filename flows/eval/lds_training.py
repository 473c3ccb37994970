"""`whence eval lds`'s retraining: one model per (subset, seed), trained as parallel Ray tasks, each measured on
every query; finished ones are kept in OUT/subsets/m{m}-s{s}.json so that a rerun trains only the rest.

Every task trains a fresh model from the recipe's initialisation (torch seed = the recipe's `seed`, the same for
every subset and seed) on the windows of its subset, with the recipe's schedule (steps, batch size, learning
rate), by one worker (flows.pretrain.training.train_single); only the order of windows differs between seeds
(data seed = the recipe's seed + s). It returns the queries' f(q) = log p(completion | prompt), not the weights.
Each task asks for `task_cpus` CPUs (and a GPU when the cluster has GPUs): on a cluster the tasks spread over
the nodes; here two one-CPU tasks run side by side on the two cores.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("whence.eval.lds")

SUBSETS_SUBDIR = "subsets"
MAX_TASK_RETRIES = 2  # a task lost with its worker (a node gone) is run again


@dataclass(frozen=True)
class Retraining:
    """What every subset model shares: the full model's recipe and windows, and the queries as one batch."""

    full: object  # flows.eval.lds_recipe.FullModel
    queries: dict  # whence.evaluation.measure.query_batch of the queries
    query_ids: tuple[str, ...]
    task_cpus: int = 1


def subset_path(out: Path, m: int, s: int) -> Path:
    return Path(out) / SUBSETS_SUBDIR / f"m{m}-s{s}.json"


def train_and_measure(loop_config: dict, train, mask, queries: dict) -> dict:
    """A Ray task (also callable in process): train on the windows train[mask] and measure the queries.
    Returns {"measured": [f(q) per query], "val_loss", "steps", "seconds"}."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flows.pretrain.data import Windows
    from flows.pretrain.training import train_single
    from whence.evaluation.measure import measure_queries

    mask = np.asarray(mask, dtype=bool)
    subset = Windows(train.tokens[mask], train.lengths[mask], train.pad_id)  # (N_m, T)
    outcome = train_single({**loop_config, "train_ref": subset})
    model = LlamaForCausalLM(LlamaConfig.from_dict(loop_config["model_config"]))
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in outcome["state_dict"].items()})
    return {"measured": measure_queries(model, queries).tolist(), "val_loss": outcome["val_loss"],
            "steps": outcome["steps"], "seconds": round(outcome["seconds"], 1), "windows": int(mask.sum())}


def finished_measurement(out: Path, m: int, s: int, query_ids, windows: int) -> list[float] | None:
    """The kept measurement of (m, s), or None when there is none or it is not of these queries and subset."""
    path = subset_path(out, m, s)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if body.get("query_ids") != list(query_ids) or body.get("windows") != windows:
        log.warning("%s is not a measurement of these queries and subset; training it again", path)
        return None
    return body["measured"]


def retrain_subsets(work: Retraining, masks, seeds: int, out: Path, cluster):
    """(M, S, Q) measured f of every subset model: kept ones read back, the others trained as Ray tasks (each
    written to OUT/subsets as soon as it finishes, so an interruption costs only the unfinished tasks)."""
    import numpy as np

    from flows.cluster import connect, surface_user_errors
    from flows.pretrain.training import loop_config_for

    masks = np.asarray(masks, dtype=bool)
    measured = np.full((len(masks), seeds, len(work.query_ids)), np.nan)
    todo = []
    for m, mask in enumerate(masks):
        for s in range(seeds):
            kept = finished_measurement(out, m, s, work.query_ids, int(mask.sum()))
            if kept is None:
                todo.append((m, s))
            else:
                measured[m, s] = kept
    log.info("%d subset models kept, %d to train", masks.shape[0] * seeds - len(todo), len(todo))
    if not todo:
        return measured
    ray = connect(cluster.address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=work.task_cpus, num_gpus=gpus, max_retries=MAX_TASK_RETRIES)(train_and_measure)
    config, full = work.full.config, work.full
    train_ref = ray.put(full.train)
    pending = {}
    for m, s in todo:
        loop_config = {**loop_config_for(full.model_config, config, None, full.val, work.task_cpus),
                       "data_seed": config.seed + s}
        pending[task.remote(loop_config, train_ref, masks[m], work.queries)] = (m, s)
    wait = surface_user_errors(lambda ref: ray.get(ref))
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        m, s = pending.pop(done[0])
        result = wait(done[0])
        measured[m, s] = result["measured"]
        write_measurement(out, m, s, work.query_ids, result)
        log.info("subset model m%d-s%d: %d windows, %d steps in %.0fs, validation loss %.4f (%d left)", m, s,
                 result["windows"], result["steps"], result["seconds"], result["val_loss"], len(pending))
    return measured


def write_measurement(out: Path, m: int, s: int, query_ids, result: dict) -> None:
    path = subset_path(out, m, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"subset": m, "seed": s, "query_ids": list(query_ids), **result}, indent=1))
    partial.replace(path)
