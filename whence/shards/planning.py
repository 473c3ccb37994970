"""Choosing the stages: which contiguous blocks each stage holds (balancing their compute by parameter count) and
which tracked layers are its own, as one `StageSpec` per stage."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from whence.errors import ModelError
from whence.model import TrackedLayer
from whence.shards.architecture import architecture_of


@dataclass(frozen=True)
class StageSpec:
    """What a stage is built from: its place in the pipeline, its blocks and its tracked layers."""

    index: int  # 0 .. num_stages - 1
    num_stages: int
    block_range: tuple[int, int]  # blocks [start, stop)
    layers: tuple[TrackedLayer, ...]  # the tracked layers inside those modules, in model order
    positions: tuple[int, ...]  # each layer's index in the model's tracked-layer order


def parameter_count(modules: Iterable[nn.Module]) -> int:
    """Parameters held by these modules, each tensor counted once (tied weights too)."""
    seen, total = set(), 0
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
    return total


def balance_blocks(block_sizes: Sequence[int], num_stages: int, first_extra: int = 0, last_extra: int = 0
                   ) -> list[tuple[int, int]]:
    """Contiguous block ranges [start, stop), one per stage and at least one block each, that minimise the largest
    stage's parameter count. Stage 0 also holds `first_extra` (embeddings), the last stage `last_extra` (final
    norm and LM head). Ties go to the split with the earliest cuts. Dynamic programme, O(num_stages * n^2)."""
    n = len(block_sizes)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} blocks into {num_stages} stages (each stage needs at least one block)")
    prefix = [0]
    for size in block_sizes:
        prefix.append(prefix[-1] + size)

    def load(stage: int, start: int, stop: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == num_stages - 1 else 0)
        return prefix[stop] - prefix[start] + extra

    inf = float("inf")
    # best[s][j]: the smallest possible largest load when stages 0..s hold blocks [0, j); cut[s][j]: stage s start.
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = load(0, 0, j)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                value = max(best[s - 1][i], load(s, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, stop = [], n
    for s in range(num_stages - 1, 0, -1):
        start = cut[s][stop]
        bounds.append((start, stop))
        stop = start
    bounds.append((0, stop))
    return bounds[::-1]


def plan_stages(model: nn.Module, num_stages: int) -> list[tuple[int, int]]:
    """The block range [start, stop) of each stage, balancing the stages' compute (ModelError if impossible).

    A token costs each weight matrix it passes through ~2 x its parameters in multiply-adds, so a stage's work
    is the parameter count of its blocks, plus the final norm and LM head on the last stage. The embeddings are
    lookups, not products: they are left out, or stage 0 would get too few blocks and idle behind the last
    (with a 32k vocabulary and width 512, the head alone is five blocks' work)."""
    architecture = architecture_of(model)
    blocks = architecture.blocks_of(model)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    if num_stages > len(blocks):
        raise ModelError(
            f"cannot split {type(model).__name__} into {num_stages} stages: it has {len(blocks)} transformer "
            f"blocks and each stage needs at least one"
        )
    last = parameter_count(architecture.last_modules(model))
    return balance_blocks([parameter_count([b]) for b in blocks], num_stages, 0, last)


def stage_specs(model: nn.Module, num_stages: int, layers: Sequence[TrackedLayer]) -> list[StageSpec]:
    """The stages of `model` as `plan_stages` balances them, each tracked layer (given in the model's order) on the
    stage that holds its module. ModelError for a layer outside every stage's modules."""
    architecture = architecture_of(model)
    bounds = plan_stages(model, num_stages)
    owners: dict[int, int] = {}  # id(module) -> stage
    for stage, block_range in enumerate(bounds):
        for module in architecture.held_modules(model, block_range, stage == 0, stage == num_stages - 1):
            for sub in module.modules():
                owners.setdefault(id(sub), stage)
    per_stage: list[list[tuple[int, TrackedLayer]]] = [[] for _ in bounds]
    for position, layer in enumerate(layers):
        if id(layer.module) not in owners:
            raise ModelError(f"tracked layer {layer.name} is outside the transformer blocks, embeddings and LM head "
                             f"of {type(model).__name__}; it cannot be assigned to a pipeline stage")
        per_stage[owners[id(layer.module)]].append((position, layer))
    return [StageSpec(i, num_stages, bounds[i], tuple(layer for _, layer in held), tuple(p for p, _ in held))
            for i, held in enumerate(per_stage)]
