"""What every actor does first: pick its device and threads, load the model, find the tracked layers; and what
the fitting actors add, an allocator that hands freed tensors back (map_large_blocks)."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from whence.model import default_device, find_tracked_layers, load_causal_lm
from whence.task import sequence_seed
from whence.text import collate, pad_id_of


@dataclass(frozen=True)
class ModelSpec:
    """How an actor loads its model: path or hub id, tracked modules, dtype ("auto": bfloat16 on GPU)."""

    path: str
    modules: str = "mlp"
    dtype: str = "auto"

    @classmethod
    def of(cls, spec: ModelSpec | str) -> ModelSpec:
        """A ModelSpec as given, or one for a path (MLP layers, dtype "auto")."""
        return cls(spec) if isinstance(spec, str) else spec


def gpu_share(gpus: float, actors: int) -> float:
    """GPUs each of `actors` GPU actors reserves on a cluster of `gpus` GPUs: one each when there are enough,
    else an equal share (W workers x N stages on one GPU get 1/(W*N) each), so that they all start rather than
    wait for GPUs a fixed cluster will never have. 0 without GPUs."""
    if gpus <= 0:
        return 0.0
    # Round the share down to 1/100 so that `actors` shares never sum to more than the cluster holds.
    return min(1.0, math.floor(100 * gpus / max(actors, 1)) / 100)


# glibc's malloc serves a block at or above its mmap threshold with a mapping of its own, handed back to the system
# when freed; smaller blocks come from its heap arenas, whose freed pages mostly stay resident. The threshold starts
# at 128 KiB but rises to the size of every mapped block freed (up to 32 MiB), so after an actor's first batch most
# of its tensors (activations, captures, one layer's products) come from the arenas, which fragment: on the
# 30-block bench fit (1 worker, checkpointed) the covariance pass peaked at 3.79 GiB with the moving threshold and
# 3.12 GiB with it fixed at 128 KiB, in the same time (206 vs 216 s, one run each). mallopt fixes it (and stops
# its adjustment) for the rest of the process. The fitting actors (FitterActor, StageActor) set it, where memory
# is what limits a fit; scoring and indexing actors keep glibc's default, whose speed their benchmarks measure (each
# fresh mapping costs page faults at first touch).
MMAP_THRESHOLD_BYTES = 128 * 2**10
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def map_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of at least `threshold` bytes from its own mapping, returned to the system when it is
    freed (glibc's mallopt; elsewhere nothing happens). True if the allocator took the setting."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def quiet_model_loading() -> None:
    """No weight-loading progress bars from this (actor) process: with several actors they interleave in the
    driver's log, one per actor and restart, and say nothing the run's own progress lines do not."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def host_model(spec: ModelSpec, num_threads: int | None = None):
    """(model, tokenizer, layers) on this process's device."""
    if num_threads:
        torch.set_num_threads(num_threads)
    quiet_model_loading()
    model, tokenizer = load_causal_lm(spec.path, device=default_device(), dtype=spec.dtype)
    return model, tokenizer, find_tracked_layers(model, spec.modules)


def sequence_rows_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    """True for sequence rows, False for the fragments' marker rows."""
    return batch["marker_total"] < 0


def rows_to_batch(batch: dict[str, np.ndarray], keep: np.ndarray, pad_id: int, seed: int | None = None) -> dict:
    """Collate the kept rows of a Ray Data batch into model inputs (with true-Fisher seeds when seed is given)."""
    tokens = [batch["input_ids"][i] for i in np.flatnonzero(keep)]
    out = collate(tokens, pad_id)
    if seed is not None:
        doc_ids, chunks = batch["doc_id"][keep], batch["chunk"][keep]
        out["seeds"] = torch.tensor([sequence_seed(seed, str(d), int(c)) for d, c in zip(doc_ids, chunks)])
    return out


def maybe_fail(counter: int) -> None:
    """Fault injection for tests: WHENCE_FAULT_AFTER_BATCHES="N:PATH" kills this process once, after N
    batches, if PATH does not exist yet (it is created first, so the restarted actor carries on)."""
    setting = os.environ.get("WHENCE_FAULT_AFTER_BATCHES")
    if not setting:
        return
    after, path = setting.split(":", 1)
    if counter >= int(after) and not os.path.exists(path):
        open(path, "w").close()
        os._exit(1)


__all__ = ["ModelSpec", "gpu_share", "host_model", "maybe_fail", "pad_id_of", "quiet_model_loading", "rows_to_batch",
           "sequence_rows_mask"]
