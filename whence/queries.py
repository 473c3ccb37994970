"""Queries: gradients of the measurement, preconditioned, kept at rank r.

For query q and layer l, the prepared query is P_l(grad_l f(q)) (d_out, d_in). To score many queries against a
batch without per-example weight gradients we keep it as a rank-r factorisation (truncated SVD):
    P_l(grad_l f(q)) ~= sum_k  u_qk v_qk^T,    left (Q, r, d_out) = U_r S_r,  right (Q, r, d_in) = V_r
With rank "full" the matrices are kept exactly.

A prepared-queries file (RESULTS_DIR/queries.safetensors) holds the tensors `{layer}/left`, `{layer}/right` or
`{layer}/full`, and in its metadata the query ids, layer names and rank (`QueriesHeader`, read and written here
only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from whence.errors import FactorsMismatchError, QueryError
from whence.factors import Factors, assemble_factors, kfac_eigenvalues
from whence.model import TrackedLayer
from whence.task import LanguageModelingTask
from whence.text import Query, collate_queries, context_length
from whence.tracking import LayerTracker

DEFAULT_QUERY_RANK = 32
METHODS = ("ekfac", "kfac", "diagonal", "identity", "lissa", "ekfac-cg")
FITTING_METHODS = ("lissa", "ekfac-cg")  # need the fitting sequences' Fisher-vector products to prepare
BASELINE_METHODS = ("ekfac", "kfac", "diagonal", "identity")  # prepared from the factors alone
SEPARATOR = "\x1f"  # joined the query ids and the layer names in older prepared-queries files' metadata


@dataclass
class PreparedQueries:
    """Preconditioned query gradients for every tracked layer."""

    query_ids: list[str]
    layer_names: list[str]
    rank: int | str  # an int, or "full"
    left: dict[str, torch.Tensor]  # (Q, r, d_out) per layer; empty when rank == "full"
    right: dict[str, torch.Tensor]  # (Q, r, d_in)
    full: dict[str, torch.Tensor]  # (Q, d_out, d_in) per layer when rank == "full"
    diagnostics: dict = field(default_factory=dict)  # what preparation measured (ekfac-cg: residuals); not saved

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    def matrices(self, name: str) -> torch.Tensor:
        """(Q, d_out, d_in) P(grad f(q)) as stored (the rank-r reconstruction when factorised)."""
        if name in self.full:
            return self.full[name]
        return torch.einsum("qro,qri->qoi", self.left[name], self.right[name])

    @classmethod
    def concatenate(cls, parts: Sequence[PreparedQueries]) -> PreparedQueries:
        """The queries of `parts` side by side, in order (Q = sum of theirs): one set scored in one pass, each
        part's scores then the columns of its queries. The parts must track the same layers at the same rank."""
        first = parts[0]
        for part in parts[1:]:
            if part.layer_names != first.layer_names or part.rank != first.rank:
                raise QueryError(f"prepared queries of other layers or rank ({part.rank} vs {first.rank}) cannot "
                                 "be scored in one pass")
        join = lambda kind: {n: torch.cat([getattr(p, kind)[n] for p in parts]) for n in getattr(first, kind)}  # noqa: E731
        return cls([i for p in parts for i in p.query_ids], first.layer_names, first.rank, join("left"),
                   join("right"), join("full"))

    def to(self, device=None, dtype=None) -> PreparedQueries:
        move = lambda d: {n: t.to(device=device, dtype=dtype) for n, t in d.items()}  # noqa: E731
        return PreparedQueries(self.query_ids, self.layer_names, self.rank, move(self.left), move(self.right),
                               move(self.full))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{n}/left": t for n, t in self.left.items()}
        tensors |= {f"{n}/right": t for n, t in self.right.items()}
        tensors |= {f"{n}/full": t for n, t in self.full.items()}
        metadata = QueriesHeader(self.query_ids, self.layer_names, self.rank).to_metadata()
        partial = Path(str(path) + ".partial")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
        partial.replace(path)

    @classmethod
    def load(cls, path: str | Path, device="cpu", queries: tuple[int, int] | None = None) -> PreparedQueries:
        """The file's queries, or only those in [start, stop) = `queries` (read alone: a query group's actors
        never hold the others)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = QueriesHeader.of(handle.metadata())
            start, stop = queries or (0, len(header.query_ids))
            tensors = {k: handle.get_slice(k)[start:stop] for k in handle.keys()}  # the leading dimension is Q
        pick = lambda kind: {k.rsplit("/", 1)[0]: v for k, v in tensors.items() if k.endswith("/" + kind)}  # noqa: E731
        return cls(header.query_ids[start:stop], header.layer_names, header.rank, pick("left"), pick("right"),
                   pick("full"))


@dataclass(frozen=True)
class QueriesHeader:
    """What a prepared-queries file says about itself, read without loading its tensors: the query ids, the
    tracked layers (in the order of every layer_scores column) and the rank. Stored in the safetensors
    metadata as strings: the lists as JSON arrays (keys "query_ids.json", "layers.json"), so an id may hold any
    character; files written before that joined them with SEPARATOR (keys "query_ids", "layers") and still read."""

    query_ids: list[str]
    layer_names: list[str]
    rank: int | str

    @classmethod
    def of(cls, metadata: dict[str, str]) -> QueriesHeader:
        import json

        rank = metadata["rank"]
        if "query_ids.json" in metadata:
            ids, layers = json.loads(metadata["query_ids.json"]), json.loads(metadata["layers.json"])
        else:
            ids, layers = metadata["query_ids"].split(SEPARATOR), metadata["layers"].split(SEPARATOR)
        return cls(ids, layers, rank if rank == "full" else int(rank))

    def to_metadata(self) -> dict[str, str]:
        import json

        return {"query_ids.json": json.dumps(list(self.query_ids)), "layers.json": json.dumps(list(self.layer_names)),
                "rank": str(self.rank)}

    @classmethod
    def read(cls, path: str | Path) -> QueriesHeader:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return cls.of(handle.metadata())


def bytes_per_query(path: str | Path) -> int:
    """What one query of a prepared-queries file takes in memory: its tensors' bytes over Q (read from the
    file's header: no tensor is loaded)."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        queries = max(len(QueriesHeader.of(handle.metadata()).query_ids), 1)
        total = 0
        for key in handle.keys():
            part = handle.get_slice(key)
            total += math.prod(part.get_shape()) * torch.tensor([], dtype=_DTYPES[part.get_dtype()]).element_size()
    return total // queries


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_rank(rank: int | str) -> int | str:
    if rank == "full":
        return rank
    value = int(rank)
    if value < 1:
        raise ValueError(f"query rank must be a positive integer or 'full', got {rank!r}")
    return value


def factors_for_method(factors: Factors, method: str) -> Factors:
    """The factors that define `method`'s preconditioner, derived from the fitted ones where possible."""
    if method == factors.strategy or method in FITTING_METHODS:
        return factors
    if method == "identity":
        return assemble_factors("identity", factors.layers, None, None, None, factors.metadata)
    if method == "kfac" and factors.strategy == "ekfac":
        per_sequence = factors.metadata["tokens"] / max(factors.metadata["sequences"], 1)
        eigenvalues = {n: kfac_eigenvalues(factors.bases[n], per_sequence) for n in factors.layer_names}
        return Factors("kfac", factors.layers, factors.bases, eigenvalues, factors.metadata)
    raise FactorsMismatchError(
        f"method {method!r} cannot be derived from {factors.strategy!r} factors; fit with --strategy {method}"
    )


def query_gradients(model, tokenizer, layers: list[TrackedLayer], queries: Sequence[Query], batch_size: int = 8,
                    task: LanguageModelingTask | None = None) -> dict[str, torch.Tensor]:
    """grad_l f(q) for every layer: name -> (Q, d_out, d_in) float64."""
    if not queries:
        raise QueryError("no queries to prepare")
    task = task or LanguageModelingTask()
    tracker = LayerTracker(layers)
    device = next(model.parameters()).device
    max_length = context_length(model)
    per_layer: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    for start in range(0, len(queries), batch_size):
        batch = collate_queries(tokenizer, queries[start : start + batch_size], max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        captures = tracker.capture(model, batch, task.measurement, task.forward)
        for layer, capture in zip(layers, captures):
            a = capture.activations.to(torch.float64)
            s = capture.output_grads.to(torch.float64)
            per_layer[layer.name].append(torch.einsum("bto,bti->boi", s, a))
    return {name: torch.cat(parts) for name, parts in per_layer.items()}


def low_rank(matrices: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of (Q, d_out, d_in): left (Q, r, d_out) = (U_r S_r)^T, right (Q, r, d_in) = V_r^T, in the
    matrices' dtype, r = min(rank, d_out, d_in).

    Computed from the eigendecomposition of the smaller Gram matrix in float64 rather than by an SVD: for
    X = U S V^T, X^T X = V S^2 V^T, so its r leading eigenvectors are V_r and X V_r = U_r S_r (or, for d_out <
    d_in, X X^T = U S^2 U^T and U_r^T X = S_r V_r^T, its rows' norms S_r). A (k, k) eigh with k = min(d_out,
    d_in) costs a fraction of the SVD: for 8 queries of a 1376 x 512 layer, one thread, 0.19 s against 0.40 s
    (float32 SVD) and 0.71 s (float64); 512 x 1376: 0.19 s against 0.83 s. Squaring the matrix squares its
    condition number, which float64's 16 digits absorb: a kept direction's error is about 1e-16 (sigma_1 /
    sigma_r)^2 relative, so only singular values below 1e-6 sigma_1 lose accuracy, and those carry nothing of
    a score. The product left^T right is the rank-r approximation whatever the singular vectors' signs."""
    _, d_out, d_in = matrices.shape
    r = min(rank, d_out, d_in)
    x = matrices.to(torch.float64)
    if d_in <= d_out:
        _, vectors = torch.linalg.eigh(x.mT @ x)  # (Q, d_in, d_in), eigenvalues ascending
        v = vectors[..., -r:].flip(-1)  # (Q, d_in, r): V_r, largest first
        left, right = (x @ v).mT, v.mT  # (Q, r, d_out) = (U_r S_r)^T, (Q, r, d_in) = V_r^T
    else:
        _, vectors = torch.linalg.eigh(x @ x.mT)  # (Q, d_out, d_out)
        u = vectors[..., -r:].flip(-1)  # (Q, d_out, r): U_r
        scaled = u.mT @ x  # (Q, r, d_in): S_r V_r^T
        sigma = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)  # (Q, r, 1)
        left = (u * sigma.mT).mT  # (Q, r, d_out) = (U_r S_r)^T
        right = scaled / sigma.clamp_min(torch.finfo(torch.float64).tiny)  # V_r^T; a zero singular value's row stays 0
    return left.to(matrices.dtype).contiguous(), right.to(matrices.dtype).contiguous()


def factorise(query_ids: list[str], preconditioned: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
              rank: int | str) -> PreparedQueries:
    """Prepared queries from (Q, d_out, d_in) preconditioned matrices per layer (a dict, or (name, matrices)
    pairs consumed one at a time so that a rank-r factorisation holds one full layer at once)."""
    rank = parse_rank(rank)
    names, left, right, full = [], {}, {}, {}
    for name, matrices in (preconditioned.items() if isinstance(preconditioned, dict) else preconditioned):
        names.append(name)
        if rank == "full":
            full[name] = matrices
        else:
            left[name], right[name] = low_rank(matrices, rank)
    return PreparedQueries(query_ids, names, rank, left, right, full)


@dataclass
class HostedModel:
    """A model loaded for preparation: the model, its tokenizer, its tracked layers (forward order) and the task
    that defines the measurement and the Fisher objective."""

    model: object
    tokenizer: object
    layers: list[TrackedLayer]
    task: LanguageModelingTask = field(default_factory=LanguageModelingTask)


def prepare_queries(hosted: HostedModel, factors: Factors, queries: Sequence[Query],
                    rank: int | str = DEFAULT_QUERY_RANK, damping: float | str = "heuristic", method: str | None = None,
                    fitting=None, refine=None) -> PreparedQueries:
    """Gradients of the queries' measurements, preconditioned by `method` (default: the factors' strategy).

    ekfac-cg also needs `fitting`: a callable returning a fresh iterable of collated fitting batches (with label
    seeds, as fitting seeds them) for its Fisher-vector products, and takes `refine` (whence.refine.RefineSettings,
    default its defaults); its residuals per step are in the result's `diagnostics`."""
    method = method or factors.strategy
    if method == "lissa":
        raise ValueError("LiSSA needs training batches for its Hessian-vector products: use whence.lissa")
    if method == "ekfac-cg":
        from whence.refine import FisherVectorProduct, fitted_fisher

        if fitting is None:
            raise ValueError("ekfac-cg needs fitting batches for its Fisher-vector products (fitting=...)")
        product = FisherVectorProduct(hosted.model, hosted.layers, fitting, fitted_fisher(factors)[0],
                                      task=hosted.task)
        return refined_queries(hosted, factors, queries, product, rank, damping, refine)
    gradients = query_gradients(hosted.model, hosted.tokenizer, hosted.layers, queries, task=hosted.task)
    preconditioner = factors_for_method(factors, method)
    # Layer by layer, each gradient dropped as it is preconditioned and factorised: at most one layer's (Q, d_out,
    # d_in) preconditioned matrix exists beside the gradients still waiting (for a 90-layer 135M model and 9
    # queries, 5.7 GB of float64 gradients instead of twice that).
    preconditioned = ((name, preconditioner.precondition(name, gradients.pop(name), damping))
                      for name in list(gradients))
    return factorise([q.id for q in queries], preconditioned, rank)


def refined_queries(hosted: HostedModel, factors: Factors, queries: Sequence[Query], product,
                    rank: int | str = DEFAULT_QUERY_RANK, damping: float | str = "heuristic", refine=None
                    ) -> PreparedQueries:
    """ekfac-cg's prepared queries: (G + D)^-1 grad f(q) by conjugate gradient (whence.refine) with `product`
    computing G V (a whence.refine.FisherVectorProduct, or the stages' sum of one: actors.sharded_worker), the
    residuals per step in the result's `diagnostics`; refine: whence.refine.RefineSettings (default its defaults)."""
    from whence.refine import RefineSettings
    from whence.refine import refine as refine_solve

    gradients = query_gradients(hosted.model, hosted.tokenizer, hosted.layers, queries, task=hosted.task)
    result = refine_solve(factors, gradients, product, damping, refine or RefineSettings())
    prepared = factorise([q.id for q in queries], result.solution, rank)
    prepared.diagnostics = result.describe()
    return prepared
