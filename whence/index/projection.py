"""Kronecker-structured projections of per-sequence gradients, and the query side that matches each.

For a tracked layer (weight d_out x d_in), a training sequence's gradient is dW = sum_t s_t a_t^T. A projection
keeps two matrices, P_in (k_in, d_in) and P_out (k_out, d_out), and stores per sequence
    G~ = P_out dW P_in^T = sum_t (P_out s_t)(P_in a_t)^T          (k_out, k_in)
computed from the projected tokens, so the d_out x d_in gradient is never formed. A query's score against the
stored G~ is <X~_q, G~> with X~_q (k_out, k_in) the query's side, made according to the kind:

  eigen   P_in = P_A^T, P_out = P_S^T: the eigenvectors of the fitted A and S with the k_in / k_out largest
          eigenvalues (rows of Q_A^T, Q_S^T). G~ is then a block of Q_S^T dW Q_A, the coordinates EK-FAC
          preconditions in, and preconditioning is exact there: X~_q = (P_S^T grad f(q) P_A) / (Lambda[kept] +
          damping), Lambda the corrected eigenvalues at the kept rows and columns. Keeping every eigenvector
          gives the EK-FAC score exactly; truncating drops the gradient's components along the directions of
          least input / output-gradient variance.
  lambda  the K*K eigen-coordinates (i, j) of largest corrected eigenvalue Lambda_ij, wherever they lie (not a
          square block): P_out, P_in hold the eigenvectors of the rows and columns those pairs touch, and only
          the pairs are stored. Preconditioning is exact there, as for eigen. The argument for it: a training
          gradient's variance along (i, j) is Lambda_ij, so for queries like the training data a coordinate's
          expected share of a score, Lambda^2 / (Lambda + damping)^2, grows with Lambda. Measured, it ranks
          worse than the square block (below), so eigen stays the default.
  random  P = sqrt(d / k) x (k orthonormal rows of a seeded Gaussian matrix): E[P^T P] = I, so
          <P_out X P_in^T, P_out dW P_in^T> is an unbiased (Johnson-Lindenstrauss) estimate of <X, dW>, with
          X = P(grad f(q)) preconditioned in full as `whence score` does (whence.queries). With k = d the
          projection is orthogonal and the estimate exact.
  lowrank not a fixed projection: each sequence's own rank-r factorisation dW ~= L R, L (d_out, r) and R (r, d_in)
          (the r largest singular triplets, sqrt(sigma) on each side), stored as r (d_out + d_in) values. A
          sequence's gradient is a sum of T rank-one terms and its singular values fall fast, so r = 16 keeps
          most of it where a fixed K x K projection of the same bytes keeps a small part (below). The factors
          come from a seeded randomized range finder (Halko, Martinsson & Tropp 2011) run on the tokens,
          dW Omega = s^T (a Omega), with POWER_ITERATIONS power iterations and OVERSAMPLE extra columns, so
          dW is never formed while compressing. The query side is X = P(grad f(q)) (d_out x d_in), as for
          random, met in one of two ways (BlockLayout.scores). Whole (query rank "full"): each stored row is
          expanded to its (d_out, d_in) rank-r gradient, a few rows at a time, and multiplied with the queries,
          about (r + Q) d_out d_in multiply-adds per sequence and layer, the stored factors' exact score. As
          factors (an integer query rank s, `whence query`'s default 32, the truncated SVD `whence score`
          takes of its queries): X ~= sum_s sigma_s u_s v_s^T, and <X, L R> = sum_{r,s} sigma_s (l_r . u_s)
          (r_r . v_s), two dense products of the stored factors with the queries' (r Q s (d_out + d_in)
          multiply-adds), nothing of size d_out x d_in written per sequence. On the bundled model's index (8
          queries, one thread, a part of 794 rows, bfloat16 products): 0.62 s whole against 0.19 s at s = 32,
          0.15 s at 16, 0.12 s at 8, with a mean per-query Spearman against the whole matrix's exact score of
          0.9994, 0.997 and 0.985. The factored cost grows with Q s where the expansion's grows with r + Q: for
          hundreds of queries at once, "full" is the faster.

Measured on the bundled model and corpus (flows.bench.index_agreement: 2,115 sequences of 128 tokens, 17 queries,
against the full-rank EK-FAC score; mean per-query Spearman / top-10 overlap, float16 rows):
    K        16          32          64           128
    eigen    0.45/0.17   0.60/0.29   0.74/0.43    0.87/0.72        bytes per sequence: 12 layers x K*K x 2
    random   0.21/0.22   0.32/0.48   0.55/0.62    0.78/0.80        (6 KB, 25 KB, 98 KB, 393 KB)
On the first 1,500 sequences of the same corpus, with the same 9 queries and 8 others (the first 8 of
flows/eval_assets/queries.jsonl), the lambda kind against eigen (Spearman, demo queries then the others):
K = 32 0.50/0.51 against 0.55/0.54, K = 64 0.67/0.67 against 0.71/0.70, K = 128 0.85/0.85 against 0.86/0.85
(top-10 overlap 0.37 against 0.51 at K = 64): the queries' preconditioned gradients weigh the directions of the
Kronecker factors' largest eigenvalues more than the training data's Lambda predicts.
The lowrank kind, on the first 1,500 sequences with the same 17 queries (flows.bench.index_agreement; Spearman
/ top-10 overlap / share of the exact top 10 within the index's top 100, demo queries then others, float16):
    r = 12 (203 KB a sequence)  0.86/0.66/0.98  0.87/0.69/1.00      eigen K = 64 (98 KB)  0.71/0.51/0.89  0.70/0.51/0.95
    r = 16 (270 KB)             0.90/0.72/0.98  0.91/0.76/1.00
    r = 20 (338 KB, default)    0.92/0.79/1.00  0.93/0.76/1.00      eigen K = 128 (393 KB, 2,115 sequences) 0.87/0.72
    r = 24 (406 KB)             0.94/0.84/1.00  0.95/0.81/1.00
A first in-process trial on 200 sequences with the exact truncated SVD: r = 6 (4,224 values a layer, as many as
K = 64's 4,096) 0.75 against eigen K = 64's 0.71; rounding the factors to int8 with a scale per vector moved no
figure by more than 0.001 (not implemented: the shards hold one floating dtype); non-square eigen blocks of 4,096
values (128 x 32, 32 x 128, 90 x 45) and an eigen block of 45 x 45 with a random sketch of the rest did no
better than the square block. Per byte, a sequence's own factors beat any fixed projection tried, and lowrank is
the default; its price is the search: a few dense products per sequence and layer where eigen takes one small
one, and query rows as wide as the layers (at model scale, choose eigen or random).
The eigen kind ranks closer than random at every K (Spearman) and was the default, at K = 64; the random kind finds more of the
top 10 at K >= 32. Neither is close at small K: with the heuristic damping (0.1 x mean Lambda) EK-FAC's score
spreads over most of a layer's d_out x d_in eigen-directions (sum of Lambda / (Lambda + damping) is 50-70 thousand
of 98 thousand for these layers), so any K x K block keeps a small part of it. float16 rows agree with float32
ones to the third decimal. `whence query --rescore N` restores the top of the ranking: the exact top 10 is within
the eigen K = 64 index's top 100 for 90% of them.

A sequence's stored row is every layer's G~ flattened (row-major, k_out x k_in) and concatenated in layer order;
`Projections.offsets` says where each layer's block starts. Saved to and loaded from one safetensors file
(PROJECTIONS_FILE in the index directory), so an index never depends on recomputing them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from whence.errors import FactorsMismatchError, SettingsError
from whence.factors import Factors, compute_dtype
from whence.storage import Location

KINDS = ("eigen", "lambda", "random", "lowrank")
DEFAULT_KIND = "lowrank"
DEFAULT_DIM = 64  # K of the fixed projections
# --dim when not given: K for the projections, the rank r for lowrank (the first rank whose mean Spearman with
# the full score passed 0.9 with a margin on the bundled corpus, see above).
DEFAULT_DIMS = {"eigen": DEFAULT_DIM, "lambda": DEFAULT_DIM, "random": DEFAULT_DIM, "lowrank": 20}
# The randomized range finder of the lowrank kind: extra sketch columns and power iterations. Two of each
# bring the kept rank-r part within a fraction of a percent of the exact truncated SVD for these spectra.
OVERSAMPLE = 8
POWER_ITERATIONS = 2
# Bytes of the dense (n, d_out * d_in) rank-r gradients a lowrank search expands at a time. The product that
# follows does Q multiply-adds per value it reads, so with few queries it is bound by memory, not arithmetic: a
# block that stays in cache is read back at cache speed (`python -m flows.bench.lowrank_blocks`: on this
# project's 2-core AMD EPYC, AVX2, the bundled model's layers, 8 queries, float32, one thread, 128 rows a block
# took 2.3 times as long as 8 to 32 rows, 3 to 12 MiB).
LOWRANK_BLOCK_BYTES = 4 << 20
PROJECTIONS_FILE = "projections.safetensors"
# Methods whose preconditioner is diagonal in the fitted eigenbasis: the eigen kind applies them exactly.
EIGEN_METHODS = ("ekfac", "kfac", "identity")
# The random and lowrank kinds precondition the full query gradient first: any method whence.queries derives
# from factors.
RANDOM_METHODS = ("ekfac", "kfac", "diagonal", "identity")


@dataclass(frozen=True)
class BlockLayout:
    """Where one layer's block lies in a stored row and in a prepared query row, and how the two meet: a plain
    dot product (rank 0), or for lowrank the stored (r, d_out) and (r, d_in) factors against the query's
    (d_out, d_in) matrix, given whole (query_rank 0) or as its rank-s factors (query_rank s). Small and
    picklable: what a search task needs of the projections."""

    stored: tuple[int, int]
    query: tuple[int, int]
    rank: int = 0
    d_out: int = 0
    d_in: int = 0
    query_rank: int = 0

    def scores(self, stored: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(n, Q) scores from this layer's stored blocks (n, w) and query blocks (Q, w_q), in their dtype (the
        factored sums in at least float32)."""
        if not self.rank:
            return stored @ queries.T
        if self.query_rank:
            return self._factored_scores(stored, queries)
        parts, step = [], max(1, LOWRANK_BLOCK_BYTES // (self.d_out * self.d_in * stored.element_size()))
        for start in range(0, stored.shape[0], step):
            rows = stored[start : start + step]
            left = rows[:, : self.rank * self.d_out].view(-1, self.rank, self.d_out)  # (n, r, d_out): L^T
            right = rows[:, self.rank * self.d_out :].view(-1, self.rank, self.d_in)  # (n, r, d_in): R
            dense = torch.bmm(left.transpose(1, 2), right).flatten(1)  # (n, d_out * d_in): L R, row-major
            parts.append(dense @ queries.T)
        return torch.cat(parts) if parts else stored.new_zeros(0, queries.shape[0])

    def _factored_scores(self, stored: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """<X_q, L R> with X_q ~= sum_s (sigma_s u_s) v_s^T given by its factors: for stored factors l_r (columns
        of L) and r_r (rows of R),
            <X_q, L R> = sum_r l_r^T X_q r_r^T = sum_{r,s} (l_r . sigma_s u_s)(r_r . v_s),
        two dense products per layer, (n r, d_out) @ (d_out, Q s) and (n r, d_in) @ (d_in, Q s), then their
        elementwise product summed over r and s: about r Q s (d_out + d_in) multiply-adds a sequence where the
        expansion takes (r + Q) d_out d_in, and all of it in large GEMMs, not a batch of rank-r ones."""
        rank, s, count = self.rank, self.query_rank, queries.shape[0]
        query_left = queries[:, : s * self.d_out].reshape(count * s, self.d_out)  # (Q s, d_out): sigma_s u_s
        query_right = queries[:, s * self.d_out :].reshape(count * s, self.d_in)  # (Q s, d_in): v_s
        # Sums over r and s in at least float32: bfloat16 products of 8-bit mantissas are fine one by one, a
        # bfloat16 running sum of r s = 640 of them is not.
        total = torch.promote_types(stored.dtype, torch.float32)
        step = max(1, LOWRANK_BLOCK_BYTES // (rank * count * s * stored.element_size()))
        parts = []
        for start in range(0, stored.shape[0], step):
            rows = stored[start : start + step]
            left = rows[:, : rank * self.d_out].reshape(-1, self.d_out)  # (n r, d_out): l_r
            right = rows[:, rank * self.d_out :].reshape(-1, self.d_in)  # (n r, d_in): r_r
            terms = (left @ query_left.T) * (right @ query_right.T)  # (n r, Q s)
            parts.append(terms.view(-1, rank, count, s).sum((1, 3), dtype=total))  # (n, Q)
        return torch.cat(parts) if parts else stored.new_zeros(0, count, dtype=total)


@dataclass
class LayerProjection:
    """One layer's projection: P_in (k_in, d_in), P_out (k_out, d_out), float64; for the eigen kind also the
    kept eigenbasis columns (into Lambda's d_in and rows of its d_out), else None. For lowrank (rank > 0),
    `input` is the range finder's seeded Gaussian test matrix (q, d_in) and `output` an empty (0, d_out)."""

    name: str
    input: torch.Tensor  # (k_in, d_in)
    output: torch.Tensor  # (k_out, d_out)
    input_index: torch.Tensor | None = None  # (k_in,) int64
    output_index: torch.Tensor | None = None  # (k_out,) int64
    pairs: torch.Tensor | None = None  # (m,) int64: the kept entries of the (k_out, k_in) block, row-major (lambda)
    rank: int = 0  # lowrank: r, the stored factors' rank; 0 for a fixed projection

    @property
    def d_in(self) -> int:
        return self.input.shape[1]

    @property
    def d_out(self) -> int:
        return self.output.shape[1]

    @property
    def k_in(self) -> int:
        return self.rank or self.input.shape[0]

    @property
    def k_out(self) -> int:
        return self.rank or self.output.shape[0]

    @property
    def width(self) -> int:
        """Stored values per sequence: k_out * k_in, the kept pairs' count, or r (d_out + d_in)."""
        if self.rank:
            return self.rank * (self.d_out + self.d_in)
        return self.input.shape[0] * self.output.shape[0] if self.pairs is None else self.pairs.shape[0]

    def query_rank_of(self, query_rank: int | str = "full") -> int:
        """s, the rank of this layer's prepared query factors at `query_rank` (an int or "full"): min(query_rank,
        d_out, d_in) for lowrank, 0 (the query given whole) for "full" and for the fixed projections."""
        if not self.rank or query_rank == "full":
            return 0
        return min(int(query_rank), self.d_out, self.d_in)

    def query_width(self, query_rank: int | str = "full") -> int:
        """Prepared query values: as many as stored; for lowrank d_out * d_in, or s (d_out + d_in) as factors."""
        if not self.rank:
            return self.width
        s = self.query_rank_of(query_rank)
        return s * (self.d_out + self.d_in) if s else self.d_out * self.d_in

    def keep(self, blocks: torch.Tensor) -> torch.Tensor:
        """(B, width) stored values from (B, k_out, k_in) blocks: all of them, or the kept pairs."""
        flat = blocks.flatten(1)
        return flat if self.pairs is None else flat[:, self.pairs.to(flat.device)]

    def compress(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(B, width) G~ = sum_t (P_out s_t)(P_in a_t)^T from s (B, T, d_out), a (B, T, d_in); for lowrank the
        rank-r factors of dW = s^T a."""
        if self.rank:
            return self._low_rank(s, a)
        ps = s @ self.output.to(s).T  # (B, T, k_out), on s's device and in its dtype
        pa = a @ self.input.to(a).T  # (B, T, k_in)
        return self.keep(torch.bmm(ps.transpose(1, 2), pa))  # (B, k_out, k_in) -> (B, width)

    def _low_rank(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(B, r (d_out + d_in)) rows [L^T, R] flattened, dW ~= L R with L = U sqrt(Sigma), R = sqrt(Sigma) V^T
        from a randomized SVD of each dW = s^T a that only ever multiplies the tokens (B, T, d)."""
        st = s.transpose(1, 2)  # (B, d_out, T)
        times = lambda m: st @ (a @ m)  # noqa: E731  dW M for M (B, d_in, q): (B, d_out, q)
        times_t = lambda m: a.transpose(1, 2) @ (s @ m)  # noqa: E731  dW^T M for M (B, d_out, q): (B, d_in, q)
        sketch = times(self.input.to(a).T.expand(a.shape[0], -1, -1))  # (B, d_out, q): dW Omega
        for _ in range(POWER_ITERATIONS):  # re-orthonormalised each way, so small singular values survive
            sketch = times(torch.linalg.qr(times_t(torch.linalg.qr(sketch).Q)).Q)
        basis = torch.linalg.qr(sketch).Q  # (B, d_out, q): orthonormal, spanning dW's leading left space
        small = (s @ basis).transpose(1, 2) @ a  # (B, q, d_in): basis^T dW
        u, sigma, vh = torch.linalg.svd(small, full_matrices=False)  # (B, q, q), (B, q), (B, q, d_in)
        root = sigma[:, : self.rank].sqrt()  # (B, r)
        left = (basis @ u[:, :, : self.rank]) * root[:, None, :]  # (B, d_out, r): L
        right = vh[:, : self.rank] * root[:, :, None]  # (B, r, d_in): R
        return torch.cat([left.transpose(1, 2).flatten(1), right.flatten(1)], dim=1)

    def layout(self, stored: int, query: int, query_rank: int | str = "full") -> BlockLayout:
        """This layer's BlockLayout, its blocks starting at `stored` in a stored row and `query` in a query row
        prepared at `query_rank`."""
        return BlockLayout((stored, stored + self.width), (query, query + self.query_width(query_rank)), self.rank,
                           self.d_out if self.rank else 0, self.d_in if self.rank else 0,
                           self.query_rank_of(query_rank))

    def project(self, matrices: torch.Tensor) -> torch.Tensor:
        """(Q, k_out, k_in) P_out V P_in^T for V (Q, d_out, d_in), in V's dtype."""
        return self.output.to(matrices) @ matrices @ self.input.to(matrices).T


@dataclass
class Projections:
    """Every tracked layer's projection (forward order), with how they were made."""

    kind: str
    dim: int
    seed: int
    layers: list[LayerProjection]

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def offsets(self) -> list[int]:
        """Start of each layer's block in a stored row, and the row's width last (L + 1 values)."""
        starts = [0]
        for layer in self.layers:
            starts.append(starts[-1] + layer.width)
        return starts

    @property
    def width(self) -> int:
        """Stored values per sequence."""
        return self.offsets[-1]

    def layout(self, query_rank: int | str = "full") -> list[BlockLayout]:
        """Each layer's blocks in a stored row and in a query row prepared at `query_rank` (prepare's; the
        argument of search.score_shard)."""
        blocks, stored, query = [], 0, 0
        for layer in self.layers:
            blocks.append(layer.layout(stored, query, query_rank))
            stored, query = stored + layer.width, query + layer.query_width(query_rank)
        return blocks

    def compress(self, captures) -> torch.Tensor:
        """(B, width) stored rows from the tracked layers' captures (whence.tracking.LayerCapture, layer order),
        computed in float32 (float64 for float64 models)."""
        dtype = compute_dtype(captures[0].activations.dtype)
        blocks = [layer.compress(c.output_grads.to(dtype), c.activations.to(dtype))
                  for layer, c in zip(self.layers, captures)]
        return torch.cat(blocks, dim=1)

    def prepare(self, gradients: dict[str, torch.Tensor], factors: Factors, method: str = "ekfac",
                damping: float | str = "heuristic", dtype: torch.dtype = torch.float64, query_rank: int | str = "full"
                ) -> torch.Tensor:
        """(Q, query width) query rows X~_q from grad_l f(q) (name -> (Q, d_out, d_in)), for `method` (as wide as
        the stored rows, except for lowrank: each layer's d_out * d_in, or at an integer `query_rank` the rank-s
        factors of that matrix, s = min(query_rank, d_out, d_in): [(U_s Sigma_s)^T, V_s^T] flattened, s (d_out +
        d_in) values, the truncated SVD `whence score` takes of its queries), computed in `dtype`
        (Factors.precondition: float32 halves the time and is far inside the index's compression error).
        layout(query_rank) says where each layer's block lies."""
        from whence.queries import factors_for_method, low_rank

        allowed = RANDOM_METHODS if self.kind in ("random", "lowrank") else EIGEN_METHODS
        if method not in allowed:
            raise SettingsError(f"method {method!r} cannot be applied to a {self.kind!r} index; choose from "
                                f"{', '.join(allowed)}", "method")
        preconditioner = factors_for_method(factors, method)
        blocks = []
        for layer in self.layers:
            g = gradients[layer.name].to("cpu", dtype)  # the factors and projections live on the CPU
            if self.kind == "lowrank":  # X = P(grad f(q)) itself, (Q, d_out * d_in), or its rank-s factors
                preconditioned = preconditioner.precondition(layer.name, g, damping, dtype)  # (Q, d_out, d_in)
                if s := layer.query_rank_of(query_rank):
                    left, right = low_rank(preconditioned, s)  # (Q, s, d_out) = (U_s Sigma_s)^T, (Q, s, d_in) = V_s^T
                    blocks.append(torch.cat([left.flatten(1), right.flatten(1)], dim=1))
                else:
                    blocks.append(preconditioned.flatten(1))
                continue
            if self.kind == "random":
                blocks.append(layer.keep(layer.project(preconditioner.precondition(layer.name, g, damping, dtype))))
                continue
            rotated = layer.project(g)  # (Q, k_out, k_in): P_S^T G P_A, a block of Q_S^T G Q_A
            if method != "identity":
                eigenvalues = preconditioner.eigenvalues[layer.name].to(dtype)  # (d_out, d_in)
                kept = eigenvalues[layer.output_index][:, layer.input_index]  # (k_out, k_in)
                # The damping is the full layer's (0.1 x mean of all of Lambda), as `whence score` uses.
                rotated = rotated / (kept + preconditioner.damping(layer.name, damping))
            blocks.append(layer.keep(rotated))
        return torch.cat(blocks, dim=1)

    def save(self, path: str | Path | Location) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for layer in self.layers:
            tensors[f"{layer.name}/input"] = layer.input
            tensors[f"{layer.name}/output"] = layer.output
            if layer.input_index is not None:
                tensors[f"{layer.name}/input_index"] = layer.input_index
                tensors[f"{layer.name}/output_index"] = layer.output_index
            if layer.pairs is not None:
                tensors[f"{layer.name}/pairs"] = layer.pairs
        metadata = {"kind": self.kind, "dim": str(self.dim), "seed": str(self.seed),
                    "layers.json": json.dumps(self.layer_names),
                    "ranks.json": json.dumps([layer.rank for layer in self.layers])}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        Location.of(path).write_through(lambda local: save_file(tensors, local, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path | Location) -> Projections:
        from safetensors import safe_open

        with Location.of(path).local_copy() as local, safe_open(str(local), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        names = json.loads(metadata["layers.json"])
        ranks = json.loads(metadata.get("ranks.json", "null")) or [0] * len(names)  # indexes from before lowrank
        layers = [LayerProjection(name, tensors[f"{name}/input"], tensors[f"{name}/output"],
                                  tensors.get(f"{name}/input_index"), tensors.get(f"{name}/output_index"),
                                  tensors.get(f"{name}/pairs"), rank)
                  for name, rank in zip(names, ranks)]
        return cls(metadata["kind"], int(metadata["dim"]), int(metadata["seed"]), layers)


def build_projections(factors: Factors, kind: str = DEFAULT_KIND, dim: int | None = None, seed: int = 0
                      ) -> Projections:
    """Per-layer projections keeping k = min(dim, d) dimensions on each side, or for lowrank factors of rank
    min(dim, d_out, d_in) (whence.index.projection doc); dim None: the kind's DEFAULT_DIMS."""
    if kind not in KINDS:
        raise SettingsError(f"projection must be one of {', '.join(KINDS)}, got {kind!r}", "projection")
    dim = DEFAULT_DIMS[kind] if dim is None else dim
    if dim < 1:
        raise SettingsError(f"dim must be a positive integer, got {dim}", "dim")
    layers = []
    for layer in factors.layers:
        name, d_in, d_out = layer["name"], int(layer["d_in"]), int(layer["d_out"])
        if kind == "eigen":
            layers.append(_eigen_projection(factors, name, min(dim, d_in), min(dim, d_out)))
        elif kind == "lambda":
            layers.append(_lambda_projection(factors, name, min(dim, d_in) * min(dim, d_out)))
        elif kind == "lowrank":
            rank = min(dim, d_in, d_out)
            layers.append(LayerProjection(name, random_projection(d_in, min(rank + OVERSAMPLE, d_in, d_out), seed,
                                                                  f"{name}/range"),
                                          torch.zeros(0, d_out, dtype=torch.float64), rank=rank))
        else:
            layers.append(LayerProjection(name, random_projection(d_in, min(dim, d_in), seed, f"{name}/input"),
                                          random_projection(d_out, min(dim, d_out), seed, f"{name}/output")))
    return Projections(kind, dim, seed, layers)


def _dense_basis(blocks: list[torch.Tensor]) -> torch.Tensor:
    """(d, d) float64 Q of a block-diagonal basis, its columns the eigenvectors."""
    return torch.block_diag(*[block.to(torch.float64) for block in blocks])


def _top_eigenvectors(blocks: list[torch.Tensor], values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, d) rows: the eigenvectors of the k largest eigenvalues of a block-diagonal basis, and their columns."""
    basis = _dense_basis(blocks)  # (d, d)
    # Largest first; ties (zero eigenvalues) by column, so the choice is deterministic.
    order = sorted(range(values.shape[0]), key=lambda j: (-float(values[j]), j))[:k]
    index = torch.tensor(order, dtype=torch.int64)
    return basis[:, index].T.contiguous(), index


def _eigen_projection(factors: Factors, name: str, k_in: int, k_out: int) -> LayerProjection:
    basis = factors.bases.get(name)
    if basis is None or factors.eigenvalues.get(name) is None:
        raise FactorsMismatchError(f"the eigen projection needs fitted eigenbases, and these are "
                                   f"{factors.strategy!r} factors (layer {name}); use --projection random or fit "
                                   "with --strategy ekfac")
    p_in, input_index = _top_eigenvectors(basis.activation_vectors, basis.activation_values, k_in)
    p_out, output_index = _top_eigenvectors(basis.gradient_vectors, basis.gradient_values, k_out)
    return LayerProjection(name, p_in, p_out, input_index, output_index)


def _lambda_projection(factors: Factors, name: str, kept: int) -> LayerProjection:
    """The `kept` eigen-coordinates (i, j) of largest corrected eigenvalue Lambda_ij, wherever they lie: P_out and
    P_in hold the eigenvectors of the rows I and columns J those pairs touch, and `pairs` the pairs' places in the
    (|I|, |J|) block. A training gradient's variance along coordinate (i, j) is Lambda_ij (its definition), so
    for queries like the training data the expected share of a score there is Lambda^2 / (Lambda + damping)^2,
    which grows with Lambda: these are the coordinates a K x K budget is best spent on, where the square block of
    the kind "eigen" keeps the largest products of the Kronecker factors' eigenvalues instead."""
    basis, eigenvalues = factors.bases.get(name), factors.eigenvalues.get(name)
    if basis is None or eigenvalues is None:
        raise FactorsMismatchError(f"the lambda projection needs fitted eigenbases, and these are "
                                   f"{factors.strategy!r} factors (layer {name}); use --projection random or fit "
                                   "with --strategy ekfac")
    lam = eigenvalues.to(torch.float64)  # (d_out, d_in), in the bases' column order
    d_in = lam.shape[1]
    # Largest first, ties by flat position (stable sort), so the choice is deterministic.
    order = torch.sort(-lam.flatten(), stable=True).indices[:kept]  # (kept,) flat positions in (d_out, d_in)
    rows, columns = order // d_in, order % d_in
    output_index, input_index = torch.unique(rows), torch.unique(columns)  # sorted I (k_out,), J (k_in,)
    place_out = torch.full((lam.shape[0],), -1, dtype=torch.int64)
    place_out[output_index] = torch.arange(output_index.shape[0])
    place_in = torch.full((d_in,), -1, dtype=torch.int64)
    place_in[input_index] = torch.arange(input_index.shape[0])
    pairs = torch.sort(place_out[rows] * input_index.shape[0] + place_in[columns]).values  # (kept,), row-major
    return LayerProjection(name, _dense_basis(basis.activation_vectors)[:, input_index].T.contiguous(),  # (k_in, d_in)
                           _dense_basis(basis.gradient_vectors)[:, output_index].T.contiguous(),  # (k_out, d_out)
                           input_index, output_index, pairs)


def random_projection(d: int, k: int, seed: int, key: str) -> torch.Tensor:
    """(k, d) sqrt(d / k) x k orthonormal rows, from a Gaussian matrix seeded by (seed, key): E[P^T P] = I."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    gaussian = torch.randn(d, k, generator=generator, dtype=torch.float64)  # (d, k)
    orthonormal, _ = torch.linalg.qr(gaussian)  # (d, k), orthonormal columns spanning a uniform random k-subspace
    return (orthonormal.T * (d / k) ** 0.5).contiguous()
