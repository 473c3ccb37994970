"""Timers for `whence bench`: each figure is a ratio of two timings taken in the same process, interleaved and
best-of-n. Timings take the minimum over repeats: other processes only ever add time, so the minimum is the
best estimate of what the code itself costs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def best_times(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best-of-`repeats` seconds of each function, run round-robin so slow phases of the machine hit all."""
    times = {name: math.inf for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name] = min(times[name], time_call(function, device))
    return times


def training_step(model, batch: dict) -> None:
    """A plain training step without the optimizer: forward, mean next-token cross-entropy, backward into every
    parameter's .grad; gradients are dropped afterwards."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def tokens_in(batch: dict) -> int:
    return int(batch["attention_mask"].sum())
