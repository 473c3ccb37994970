"""How many stored rows a lowrank search should expand at a time (whence.index.projection.LOWRANK_BLOCK_BYTES).

    python -m flows.bench.lowrank_blocks [ROWS ...]

Times BlockLayout.scores over 4,096 random stored rows of the bundled model's three MLP layers of one block
(512 x 192, 512 x 192, 192 x 512), rank 20, against 8 queries, float32, one thread, expanding ROWS rows at a time
(default 128 64 32 16 8 4), then at the byte budget the search uses. Each figure is the best of 3.
"""

from __future__ import annotations

import sys
import time

import torch

from whence.index import projection
from whence.index.projection import BlockLayout

SHAPES = [(512, 192), (512, 192), (192, 512)]  # (d_out, d_in) of the bundled model's gate, up and down layers
RANK, QUERIES, SEQUENCES = 20, 8, 4096


def seconds(block_bytes: int) -> float:
    torch.manual_seed(0)
    projection.LOWRANK_BLOCK_BYTES, total = block_bytes, 0.0
    for d_out, d_in in SHAPES:
        layout = BlockLayout((0, RANK * (d_out + d_in)), (0, d_out * d_in), RANK, d_out, d_in)
        stored, queries = torch.randn(SEQUENCES, RANK * (d_out + d_in)), torch.randn(QUERIES, d_out * d_in)
        layout.scores(stored[:64], queries)  # warm-up
        best = float("inf")
        for _ in range(3):
            tick = time.perf_counter()
            layout.scores(stored, queries)
            best = min(best, time.perf_counter() - tick)
        total += best
    return total


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    default = projection.LOWRANK_BLOCK_BYTES
    largest = max(d_out * d_in for d_out, d_in in SHAPES) * 4  # bytes of one expanded float32 row
    for rows in [int(a) for a in argv] or [128, 64, 32, 16, 8, 4]:
        print(f"{rows:4d} rows a block ({rows * largest / 2**20:5.1f} MiB): {seconds(rows * largest):.2f} s", flush=True)
    print(f"the search's {default / 2**20:.0f} MiB ({default // largest} rows): {seconds(default):.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
