"""LiSSA: the classical iterative inverse-Hessian-vector product (Agarwal et al. 2017), as a baseline.

With H = G + D (G the Fisher over the tracked layers jointly, D the per-layer damping), the recursion
    x_0 = v,    x_{j+1} = v + x_j - H x_j / scale
has the fixed point x = scale * H^-1 v, and converges when scale > lambda_max(H). Each step needs one
Fisher-vector product G x = mean_n g_n <g_n, x>, computed from a batch's per-sequence gradients g_n (from
module hooks, no weight gradients); a new batch per step gives the stochastic version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

import torch

Vectors = dict[str, torch.Tensor]  # layer -> (Q, d_out, d_in): one vector per query, split by layer
FisherProduct = Callable[[Vectors], Vectors]


def inner(x: Vectors, y: Vectors) -> torch.Tensor:
    """(Q,) sum over layers of <x_q, y_q>."""
    return sum((x[n] * y[n]).flatten(1).sum(dim=1) for n in x)


def fisher_product(gradients: Vectors) -> FisherProduct:
    """G x = mean_n g_n <g_n, x> from per-sequence gradients (layer -> (N, d_out, d_in))."""

    def product(x: Vectors) -> Vectors:
        # coefficients (Q, N): <g_n, x_q> summed over layers
        coefficients = sum(torch.einsum("qoi,noi->qn", x[n], gradients[n].to(x[n].dtype)) for n in x)
        count = next(iter(gradients.values())).shape[0]
        return {n: torch.einsum("qn,noi->qoi", coefficients, gradients[n].to(x[n].dtype)) / count for n in x}

    return product


def top_eigenvalue(product: FisherProduct, like: Vectors, iterations: int = 30, seed: int = 0) -> float:
    """Power iteration for lambda_max(G) (G is PSD)."""
    generator = torch.Generator().manual_seed(seed)
    x = {n: torch.randn(t[:1].shape, generator=generator, dtype=t.dtype).to(t.device) for n, t in like.items()}
    value = 0.0
    for _ in range(iterations):
        norm = inner(x, x).sqrt()
        x = {n: t / norm for n, t in x.items()}
        y = product(x)
        value = float(inner(x, y)[0])
        x = y
    return value


def lissa_inverse_hvp(
    vectors: Vectors,
    products: Iterator[FisherProduct],
    damping: dict[str, float],
    scale: float,
    iterations: int,
    tolerance: float = 0.0,
) -> tuple[Vectors, int]:
    """(H^-1 v, steps taken). `products` yields one Fisher-vector product per step (a fixed one for the exact
    recursion, one per mini-batch for the stochastic one). Stops early when the relative change of x falls
    below `tolerance`."""
    x = {n: t.clone() for n, t in vectors.items()}
    steps = 0
    for product in islice(products, iterations):
        steps += 1
        gx = product(x)
        new = {n: vectors[n] + x[n] - (gx[n] + damping[n] * x[n]) / scale for n in x}
        change = (inner({n: new[n] - x[n] for n in x}, {n: new[n] - x[n] for n in x}).sqrt()
                  / inner(new, new).sqrt().clamp_min(1e-300)).max()
        x = new
        if tolerance and float(change) < tolerance:
            break
    return {n: t / scale for n, t in x.items()}, steps


def lissa_prepare_queries(hosted, factors, queries, batches, rank, damping="heuristic", iterations: int = 200,
                          fisher: str = "true"):
    """PreparedQueries preconditioned by stochastic LiSSA: one mini-batch of training `batches` (collated, with
    seeds) per step, cycled. `hosted`: a whence.queries.HostedModel. Damping per layer as for EK-FAC (`factors`
    supply the heuristic's eigenvalues)."""
    from itertools import cycle

    from whence.queries import factorise, query_gradients
    from whence.tracking import LayerTracker

    task, layers = hosted.task, hosted.layers
    tracker = LayerTracker(layers)
    products = []
    for batch in batches:  # per-sequence gradients of each mini-batch, kept for the recursion
        captures = tracker.capture(hosted.model, batch, lambda logits, b: task.fisher_objective(logits, b, fisher),
                                   task.forward)
        products.append(fisher_product({layer.name: c.per_sequence_gradients().to(torch.float64)
                                        for layer, c in zip(layers, captures)}))
    if not products:
        raise ValueError("LiSSA needs at least one training batch")
    vectors = query_gradients(hosted.model, hosted.tokenizer, layers, queries, task=task)
    damping_by_layer = {layer.name: factors.damping(layer.name, damping) for layer in layers}
    scale = 1.5 * (max(top_eigenvalue(p, vectors) for p in products[:4]) + max(damping_by_layer.values()))
    solved, _ = lissa_inverse_hvp(vectors, cycle(products), damping_by_layer, scale, iterations)
    return factorise([q.id for q in queries], solved, rank)
