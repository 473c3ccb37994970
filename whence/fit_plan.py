"""How a fit is divided between processes: which actor owns which layers, and which reads which fragments.

Pure arithmetic over layer shapes and sequence counts, deterministic: the same inputs give the same plan, so a
resumed or repeated fit sums the same partial sums in the same order (fits are bit-reproducible).

    layer_sum_bytes    bytes of one layer's float64 covariance sums (the A and S blocks)
    plan_owners        layers dealt to owners, balanced by those bytes
    assign_sequences   contiguous runs of the corpus's sequences dealt to data-parallel workers
"""

from __future__ import annotations

from whence.factors import block_slices, packed_size

FLOAT64_BYTES = 8


def layer_sum_bytes(d_out: int, d_in: int, num_blocks: int = 1) -> int:
    """Bytes of one layer's float64 covariance sums: the blocks of A (d_in) and of S (d_out), each packed (its upper
    triangle, d (d + 1) / 2 values: whence.factors.pack_symmetric)."""
    widths = [s.stop - s.start for d in (d_in, d_out) for s in block_slices(d, num_blocks)]
    return FLOAT64_BYTES * sum(packed_size(width) for width in widths)


def plan_owners(layers: list[dict], owners: int, num_blocks: int = 1) -> list[list[str]]:
    """The layer names each of `owners` owns (in model order within an owner): largest layers first, each onto
    the owner holding the fewest bytes so far (ties: the lower index), so owners hold nearly equal bytes.
    layers: TrackedLayer.describe() dicts (name, d_out, d_in)."""
    loads, owned = [0] * owners, [[] for _ in range(owners)]
    order = sorted(range(len(layers)), key=lambda i: (-layer_sum_bytes(layers[i]["d_out"], layers[i]["d_in"],
                                                                      num_blocks), i))
    for i in order:
        target = min(range(owners), key=lambda o: (loads[o], o))
        loads[target] += layer_sum_bytes(layers[i]["d_out"], layers[i]["d_in"], num_blocks)
        owned[target].append(i)
    return [[layers[i]["name"] for i in sorted(indices)] for indices in owned]


def assign_sequences(counts: dict[int, int], workers: int) -> list[dict[int, tuple[int, int]]]:
    """The sequences each of `workers` reads: worker w takes the w-th of `workers` nearly equal, contiguous runs
    of the corpus's sequences in corpus order (fragment, then position), as {fragment: (first, count)} per worker,
    first counted from the fragment's first sequence. counts: fragment -> sequences. A run may start or end inside
    a fragment, so one large fragment (a gzip file, which cannot be split into byte ranges) is shared out too; a
    fixed assignment (rather than a streaming split's first-come blocks) makes each worker's sums, and so the
    fit, the same in every run."""
    total = sum(counts.values())
    bounds = [total * w // workers for w in range(workers + 1)]  # worker w: global sequences [bounds[w], bounds[w+1])
    assigned: list[dict[int, tuple[int, int]]] = [{} for _ in range(workers)]
    offset = 0  # the global index of the fragment's first sequence
    for fragment in sorted(counts):
        stop_fragment = offset + counts[fragment]
        for w in range(workers):
            first, last = max(bounds[w], offset), min(bounds[w + 1], stop_fragment)
            if first < last:
                assigned[w][fragment] = (first - offset, last - first)
        offset = stop_fragment
    return assigned
