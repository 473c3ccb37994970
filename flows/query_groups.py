"""Query groups (`whence score --query-batch N`): the queries split into groups scored in successive passes, so a
scoring actor holds one group's prepared queries at a time and its memory no longer grows with the number of
queries.

    QueryGroup    [start, stop) of the run's queries, and where its parts go: parts/ itself when it is the only
                  group (the layout of a run without groups), else parts/queries-START-STOP/ (named by the range,
                  so a resume with another grouping finds none of the old parts and scores again: time, not results)
    plan_groups   groups of --query-batch queries, or by default as many queries per group as fit the memory
                  budget of one actor (QUERY_MEMORY_SHARE of its node's memory), estimated from the prepared file

Every group scores the same sequences; a query's scores do not depend on the other queries it is scored with, so
the stitched results equal those of all queries at once (tests/test_query_groups.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flows.run_state import PARTS

log = logging.getLogger("whence.score")

# The share of a node's memory (divided among the actors on it) that one actor's prepared queries may take: the
# model, its activations and output gradients, and the Ray worker itself need the rest.
QUERY_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class QueryGroup:
    start: int
    stop: int
    only: bool  # the run's only group: parts/ as without groups

    @property
    def range(self) -> tuple[int, int]:
        return self.start, self.stop

    def directory(self, run_path: Path) -> Path:
        parts = run_path / PARTS
        return parts if self.only else parts / f"queries-{self.start:06d}-{self.stop:06d}"

    def part_path(self, run_path: Path) -> Callable[[str, int], Path]:
        """part_path(kind, fragment) for this group's parts (as flows.run_state.RunDirectory.part_path)."""

        def path(kind: str, index: int) -> Path:
            directory = self.directory(run_path)
            directory.mkdir(parents=True, exist_ok=True)
            return directory / f"{kind}-{index:06d}.parquet"

        return path

    def finished_parts(self, run_path: Path, kind: str) -> dict[int, Path]:
        """fragment -> this group's finished part of `kind` (as RunDirectory.finished_parts)."""
        directory = self.directory(run_path)
        if not directory.exists():
            return {}
        return {int(p.stem.rsplit("-", 1)[1]): p for p in sorted(directory.glob(f"{kind}-*.parquet"))}


def plan_groups(num_queries: int, query_batch: int | None, queries_file: Path, copies: int, workers: int
                ) -> list[QueryGroup]:
    """Consecutive groups of `query_batch` queries, or by default of as many as fit QUERY_MEMORY_SHARE of the
    largest node's memory per actor, each query held `copies` times (the run's and each baseline's). Logged."""
    if query_batch is None:
        from whence.queries import bytes_per_query

        per_query = bytes_per_query(queries_file) * copies
        budget = QUERY_MEMORY_SHARE * _largest_node_memory() / max(workers, 1)
        query_batch = max(1, int(budget // max(per_query, 1)))
        log.info("prepared queries: %.1f MiB a query (x%d methods); %s within %.2f GiB per actor",
                 per_query / 2**20, copies, "all at once" if query_batch >= num_queries else
                 f"{query_batch} a group", budget / 2**30)
    size = max(1, min(query_batch, num_queries))
    starts = range(0, num_queries, size)
    return [QueryGroup(start, min(start + size, num_queries), len(starts) == 1) for start in starts]


def _largest_node_memory() -> int:
    import ray

    sizes = [int(node["Resources"].get("memory", 0)) for node in ray.nodes() if node.get("Alive")]
    return max(sizes, default=0) or 2**33
