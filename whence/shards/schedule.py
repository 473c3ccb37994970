"""Micro-batches and their order: batches cut into micro-batches, and the one-forward-one-backward (1F1B)
schedule that lets micro-batch i + 1 enter stage 0 while micro-batch i is further down the pipeline."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FORWARD, BACKWARD = "forward", "backward"

# The last stage runs its LM head a group of sequences at a time (unless the head is tracked): the largest (g T, V)
# logits a group may hold, in the model's dtype. Each group's logits, sampled labels and their gradient are gone
# before the next group's exist, so a batch holds one group's, not its whole (B T, V): 128 MiB is two sequences
# of 512 tokens at a 32k vocabulary in float32, and at least one sequence always.
HEAD_GROUP_BYTES = 2**27


def head_group_sequences(seq_len: int, vocab: int, element: int) -> int:
    """Sequences per group of the last stage's LM head: as many as HEAD_GROUP_BYTES of logits hold, at least one."""
    return max(1, HEAD_GROUP_BYTES // max(1, seq_len * vocab * element))


def pipeline_micro_batch(batch_size: int, num_stages: int) -> int:
    """The micro-batch size of a pipeline of `num_stages` stages fed batches of `batch_size` sequences:
    ceil(batch_size / num_stages). Under 1F1B (stage_order) stage k keeps num_stages - k micro-batches' graphs at
    once, so no stage holds more than one batch's, as an unsharded actor does; micro-batches of a whole batch
    would have stage 0 hold `num_stages` batches' activations."""
    return max(1, -(-batch_size // num_stages))


def split_batch(batch: dict, micro_batch_size: int | None) -> list[dict]:
    """Row slices of a batch of at most `micro_batch_size` sequences (None: the batch itself). Slices keep the
    batch's width T, so per-token results concatenate back along the batch dimension."""
    size = batch["input_ids"].shape[0]
    if micro_batch_size is None or micro_batch_size >= size:
        return [batch]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    return [{k: v[start : start + micro_batch_size] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for start in range(0, size, micro_batch_size)]


def stage_order(micro_batch_ids: Sequence[int], stage: int, num_stages: int, max_in_flight: int | None = None
                ) -> list[tuple[str, int]]:
    """The order in which one stage runs its calls: `warmup` forwards, then alternately one forward and one
    backward. warmup = max_in_flight - stage - 1 (default max_in_flight: num_stages) is non-increasing along the
    pipeline, which keeps the in-order execution of each stage free of deadlock, and bounds the graphs a stage
    holds at once to warmup + 1."""
    in_flight = num_stages if max_in_flight is None else max_in_flight
    if in_flight < 1:
        raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
    ids = list(micro_batch_ids)
    warmup = min(len(ids), max(0, in_flight - stage - 1))
    order = [(FORWARD, mb) for mb in ids[:warmup]]
    for j, mb in enumerate(ids):
        if warmup + j < len(ids):
            order.append((FORWARD, ids[warmup + j]))
        order.append((BACKWARD, mb))
    return order


def pipeline_schedule(micro_batch_ids: Sequence[int], num_stages: int, max_in_flight: int | None = None
                      ) -> list[tuple[str, int, int]]:
    """Every call (kind, stage, micro-batch) in an order that respects both each stage's 1F1B order and the data
    dependencies (forward k after forward k - 1, backward k after backward k + 1). Submitting calls to in-order
    actors in this order lets micro-batch i + 1 enter stage 0 while micro-batch i is further down the pipeline."""
    orders = [stage_order(micro_batch_ids, k, num_stages, max_in_flight) for k in range(num_stages)]
    pointers = [0] * num_stages
    done: set[tuple[str, int, int]] = set()
    schedule = []
    total = sum(len(o) for o in orders)
    while len(schedule) < total:
        progressed = False
        for k in range(num_stages):
            while pointers[k] < len(orders[k]):
                kind, mb = orders[k][pointers[k]]
                before = (FORWARD, k - 1, mb) if kind == FORWARD else (BACKWARD, k + 1, mb)
                if 0 <= before[1] < num_stages and before not in done:
                    break
                done.add((kind, k, mb))
                schedule.append((kind, k, mb))
                pointers[k] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule has a cycle")  # cannot happen with non-increasing warmups
    return schedule
