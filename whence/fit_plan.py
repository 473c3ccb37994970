"""How a fit is divided between processes: which actor owns which layers, and which reads which fragments.

Pure arithmetic over layer shapes and sequence counts, deterministic: the same inputs give the same plan, so a
resumed or repeated fit sums the same partial sums in the same order (fits are bit-reproducible).

    layer_sum_bytes    bytes of one layer's float64 covariance sums (the A and S blocks)
    plan_owners        layers dealt to owners, balanced by those bytes
    assign_fragments   fragments dealt to data-parallel workers, balanced by their sequences
"""

from __future__ import annotations

from whence.factors import block_slices

FLOAT64_BYTES = 8


def layer_sum_bytes(d_out: int, d_in: int, num_blocks: int = 1) -> int:
    """Bytes of one layer's float64 covariance sums: the blocks of A (d_in) and of S (d_out), squared."""
    square = sum((s.stop - s.start) ** 2 for s in block_slices(d_in, num_blocks))
    square += sum((s.stop - s.start) ** 2 for s in block_slices(d_out, num_blocks))
    return FLOAT64_BYTES * square


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


def assign_fragments(counts: dict[int, int], workers: int) -> list[list[int]]:
    """The fragment indices each of `workers` reads (in corpus order within a worker): largest fragments first,
    each onto the worker with the fewest sequences so far (ties: the lower index). counts: fragment -> sequences.
    A fixed assignment (rather than a streaming split's first-come blocks) makes each worker's sums, and so the
    fit, the same in every run."""
    loads, assigned = [0] * workers, [[] for _ in range(workers)]
    for fragment in sorted(counts, key=lambda f: (-counts[f], f)):
        target = min(range(workers), key=lambda w: (loads[w], w))
        loads[target] += counts[fragment]
        assigned[target].append(fragment)
    return [sorted(fragments) for fragments in assigned]
