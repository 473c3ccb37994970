"""EK-FAC-preconditioned conjugate gradient: the queries' damped-Fisher solves over all tracked layers at once.

EK-FAC approximates the Fisher G block-diagonally (one block per tracked layer) and so drops the cross-layer
blocks. Here we solve the exact system over all tracked layers jointly, for every query q,
    (G + D) x_q = grad f(q),        G = mean_n g_n g_n^T,   D = damping_l on layer l's parameters
by preconditioned conjugate gradient (PCG), with EK-FAC (the fitted factors, their damping) as the
preconditioner M^-1 = P. PCG starts from x_0 = 0, so after one step x_1 is EK-FAC's answer scaled by the best
step length; K steps cost K Fisher-vector products, each one pass (forward and backward) over the M fitting
sequences. G uses the Fisher the factors were fitted with: labels sampled per sequence from seeds
(whence.task.sequence_seed, the fit's seed) for the true Fisher, so every pass sees the same G and CG converges.

Fisher-vector products, all queries at once (V: the current direction, per query q and layer l (d_out, d_in)),
never forming a parameter gradient, with a and s the captured inputs and output gradients (whence.tracking):
    c_nq      = sum_l sum_t s_nt^T V_ql a_nt                      (N, Q) coefficients: <g_n, V_q> over layers
    (G V_q)_l = mean_n sum_t c_nq s_nt a_nt^T                       one GEMM per layer per batch
Two evaluations per layer ("path"), the cheaper taken as in whence.scoring:
    tokens    c from (a V^T) . s, then G V as (c * s)^T a: no per-sequence matrix at all  ~ 2 Q B T d_out d_in
    gradient  the batch's transient dW_b = s_b^T a_b (B, d_out, d_in), c = dW V, G V = c^T dW
                                                                           ~ B T d_out d_in + 2 B Q d_out d_in
The tokens path never holds more than a query chunk's (B, T, d_out) products; the gradient path holds the
batch's per-sequence matrices only while that batch is processed, and only when they fit DENSE_BATCH_BYTES.
CG state (x, r, z, p) is float64, (Q, d_out, d_in) per layer; products run in the model's compute precision
(float32 for bfloat16 and float32 models, float64 for float64 ones) and are summed in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from whence.errors import FactorsMismatchError
from whence.factors import Factors, compute_dtype
from whence.lissa import Vectors, inner
from whence.tracking import LayerCapture, LayerTracker

log = logging.getLogger("whence.refine")

# Measured on six-layer tiny Llamas against exact influence (mean per-query Pearson): tests/test_refine.py's,
# EK-FAC 0.815 -> 0.965 after 10 steps; with 256 other sequences, 0.772 -> 0.963 (10), 0.990 (20), 0.999 (40).
DEFAULT_REFINE_STEPS = 10
DEFAULT_REFINE_SEQUENCES = 512
DEFAULT_REFINE_TOLERANCE = 1e-6  # stop when every query's ||r_k|| / ||grad f(q)|| is below this
REFINE_FILE = "refine.json"  # RESULTS_DIR/refine.json: residual norms per step, written by the prepare task
DENSE_BATCH_BYTES = 1024**3  # the gradient path's per-batch (B, d_out, d_in) matrices, per layer, at most
TOKEN_CHUNK_BYTES = 256 * 1024**2  # the tokens path's (B, T, Qc, d_out) products per query chunk, at most
PATHS = ("auto", "tokens", "gradient")

Batches = Callable[[], Iterable[dict]]  # a fresh iterable of collated batches (with "seeds") per call


@dataclass(frozen=True)
class RefineSettings:
    """How far to refine: at most `steps` PCG steps, fewer once every query's relative residual is below
    `tolerance`."""

    steps: int = DEFAULT_REFINE_STEPS
    tolerance: float = DEFAULT_REFINE_TOLERANCE

    def __post_init__(self):
        from whence.errors import SettingsError

        if self.steps < 1:
            raise SettingsError(f"refine_steps must be positive, got {self.steps}", "refine_steps")
        if not self.tolerance >= 0:  # NaN too
            raise SettingsError(f"refine_tolerance must be >= 0, got {self.tolerance}", "refine_tolerance")


@dataclass
class RefineResult:
    solution: Vectors  # layer -> (Q, d_out, d_in) float64 x_q ~= (G + D)^-1 grad f(q)
    residuals: torch.Tensor  # (steps + 1, Q) ||r_k|| / ||grad f(q)||, row 0 for x_0 = 0 (all ones)

    @property
    def steps(self) -> int:
        return self.residuals.shape[0] - 1

    def describe(self) -> dict:
        """What the results manifest stores: steps taken and the relative residuals per step (rows) and query."""
        return {"steps": self.steps, "relative_residuals": self.residuals.tolist(),
                "max_relative_residual": [float(row.max()) for row in self.residuals]}


def fitted_fisher(factors: Factors) -> tuple[str, int]:
    """(fisher mode, seed) the factors were fitted with (their manifest's arguments; "true", 0 when absent)."""
    arguments = factors.metadata.get("arguments") or {}
    return str(arguments.get("fisher", "true")), int(arguments.get("seed", 0))


# ---------------------------------------------------------------------------------------------------------
# Fisher-vector products


def choose_path(path: str, sequences: int, tokens: int, queries: int, shape: tuple[int, int], itemsize: int) -> str:
    """"tokens" or "gradient" for one layer and batch (counting multiply-adds; see the module docstring)."""
    if path != "auto":
        return path
    d_out, d_in = shape
    if sequences * d_out * d_in * itemsize > DENSE_BATCH_BYTES:
        return "tokens"
    gradient = tokens * d_out * d_in + 2 * sequences * queries * d_out * d_in
    return "gradient" if gradient <= 2 * queries * tokens * d_out * d_in else "tokens"


def _query_chunk(tokens: int, d_out: int, itemsize: int, queries: int) -> int:
    return max(1, min(queries, TOKEN_CHUNK_BYTES // max(tokens * d_out * itemsize, 1)))


def token_coefficients(capture: LayerCapture, v: torch.Tensor) -> torch.Tensor:
    """(B, Q) sum_t s_bt^T V_q a_bt for one layer, v (Q, d_out, d_in) in the captures' dtype."""
    a, s = capture.activations, capture.output_grads  # (B, T, d_in), (B, T, d_out)
    step = _query_chunk(a.shape[0] * a.shape[1], v.shape[1], v.element_size(), v.shape[0])
    parts = []
    for start in range(0, v.shape[0], step):
        chunk = v[start : start + step]  # (Qc, d_out, d_in)
        projected = (a @ chunk.reshape(-1, chunk.shape[-1]).T).view(*a.shape[:2], chunk.shape[0], -1)  # (B,T,Qc,o)
        parts.append(torch.einsum("btqo,bto->bq", projected, s))
    return torch.cat(parts, dim=1)


def token_products(capture: LayerCapture, c: torch.Tensor) -> torch.Tensor:
    """(Q, d_out, d_in) sum_b sum_t c_bq s_bt a_bt^T for one layer, c (B, Q): per query chunk one GEMM of the
    c-weighted output gradients (Qc * d_out, B * T) with the activations (B * T, d_in)."""
    a, s = capture.activations, capture.output_grads
    flat_a = a.reshape(-1, a.shape[-1])  # (B*T, d_in)
    step = _query_chunk(a.shape[0] * a.shape[1], s.shape[-1], s.element_size(), c.shape[1])
    parts = []
    for start in range(0, c.shape[1], step):
        weights = c[:, start : start + step]  # (B, Qc)
        weighted = torch.einsum("bq,bto->qobt", weights, s).reshape(-1, flat_a.shape[0])  # (Qc*d_out, B*T)
        parts.append((weighted @ flat_a).view(weights.shape[1], s.shape[-1], -1))
    return torch.cat(parts)


class LayerProducts:
    """The two halves of one Fisher-vector product over a group of tracked layers: all of them in one process
    (FisherVectorProduct), or one pipeline stage's (whence.shards.Stage), where c must be summed over the stages
    between the halves. Per batch, with its captures on this group's layers:
        coefficients(key, captures) -> (B, Q) this group's part of c_bq = sum_l sum_t s_bt^T V_ql a_bt; the
                                        captures (or the batch's per-sequence gradients) are kept under `key`
        accumulate(key, c)          -> adds sum_b c_bq s_b a_b^T per layer to the float64 sums, c (B, Q) summed
                                        over every group of layers
    and mean() is (G V)_l = the sums over the sequences accumulated.

    directions: layer -> (Q, d_out, d_in) V in the precision products run in (compute_dtype of the model's)."""

    def __init__(self, directions: Vectors, path: str = "auto"):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.directions, self.path = directions, path
        self.sums = {name: torch.zeros(d.shape, dtype=torch.float64, device=d.device) for name, d in directions.items()}
        self.sequences = 0
        self._held: dict[object, list[tuple[LayerCapture, torch.Tensor | None]]] = {}  # key -> per layer

    def coefficients(self, key, captures: list[LayerCapture]) -> torch.Tensor:
        """(B, Q) sum over this group's layers (in `directions` order, as `captures`) of <g_b, V_q>_l."""
        held, c = [], 0.0
        for d, capture in zip(self.directions.values(), captures):  # d: (Q, d_out, d_in)
            capture = LayerCapture(capture.activations.to(d.dtype), capture.output_grads.to(d.dtype))
            sequences, tokens = capture.activations.shape[0], capture.activations.shape[:2].numel()
            if choose_path(self.path, sequences, tokens, d.shape[0], d.shape[1:], d.element_size()) == "gradient":
                gradients = capture.per_sequence_gradients().flatten(1)  # (B, d_out*d_in), this batch's only
                held.append((capture, gradients))
                c = c + gradients @ d.flatten(1).T  # (B, Q)
            else:
                held.append((capture, None))
                c = c + token_coefficients(capture, d)
        self._held[key] = held
        return c

    def accumulate(self, key, c: torch.Tensor) -> None:
        """Add the batch kept under `key`'s sum_b c_bq s_b a_b^T to each layer's sums (and forget the batch)."""
        held = self._held.pop(key)
        for (name, d), (capture, gradients) in zip(self.directions.items(), held):
            c = c.to(d.device, d.dtype)
            product = (c.T @ gradients).view_as(d) if gradients is not None else token_products(capture, c)
            self.sums[name] += product.to(torch.float64)
        self.sequences += int(c.shape[0])

    def mean(self) -> Vectors:
        """layer -> (Q, d_out, d_in) float64 (G V)_l over the sequences accumulated."""
        if self.sequences == 0:
            raise ValueError("ekfac-cg needs at least one fitting sequence for its Fisher-vector products")
        return {name: total / self.sequences for name, total in self.sums.items()}


class FisherVectorProduct:
    """G V for all queries at once, from one streamed pass over `batches()` (the fitting sequences).

    model and layers: the hosted model and its tracked layers; fisher: "true" or "empirical" as the factors
    were fitted (true: each batch carries its sequences' label seeds)."""

    def __init__(self, model, layers, batches: Batches, fisher: str = "true", path: str = "auto", task=None):
        from whence.task import LanguageModelingTask

        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.model, self.layers, self.batches, self.fisher, self.path = model, list(layers), batches, fisher, path
        self.task = task or LanguageModelingTask()
        self.tracker = LayerTracker(self.layers)
        self.device = next(model.parameters()).device
        self.dtype = compute_dtype(next(model.parameters()).dtype)
        self.passes = 0  # how many products (passes over the fitting sequences) so far

    def _captures(self, batch: dict) -> list[LayerCapture]:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return self.tracker.capture(self.model, batch, lambda logits, b: self.task.fisher_objective(
            logits, b, self.fisher), self.task.forward)

    def __call__(self, v: Vectors) -> Vectors:
        """layer -> (Q, d_out, d_in) float64 (G V)_l; `v` as it (any float dtype, on the model's device)."""
        products = LayerProducts({layer.name: v[layer.name].to(self.device, self.dtype) for layer in self.layers},
                                 self.path)
        for batch in self.batches():
            products.accumulate(None, products.coefficients(None, self._captures(batch)))
        result = products.mean()
        self.passes += 1
        return result


# ---------------------------------------------------------------------------------------------------------
# Preconditioned conjugate gradient


def _axpy(x: Vectors, scale: torch.Tensor, y: Vectors) -> Vectors:
    """x + scale_q y_q per layer, scale (Q,)."""
    return {n: x[n] + scale.view(-1, *([1] * (x[n].dim() - 1))) * y[n] for n in x}


def preconditioned_cg(b: Vectors, product: Callable[[Vectors], Vectors], damping: dict[str, float],
                      precondition: Callable[[Vectors], Vectors], settings: RefineSettings = RefineSettings()  # noqa: B008
                      ) -> RefineResult:
    """x_q ~= (G + D)^-1 b_q for every query q at once (independent CG runs sharing each product).

    b: layer -> (Q, d_out, d_in); product(V) = G V; damping: layer -> damping_l; precondition(R) = P(R), SPD.
    A query stops moving (its step length set to 0) once its relative residual is below the tolerance."""
    x = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in b.items()}
    r = {n: t.to(torch.float64).clone() for n, t in b.items()}
    z = precondition(r)
    p = z
    rz = inner(r, z)  # (Q,)
    scale = inner(r, r).sqrt()  # (Q,) ||b_q||
    active = scale > 0
    residuals = [torch.ones_like(scale)]
    for step in range(settings.steps):
        if not bool(active.any()):
            break
        gp = product(p)
        ap = {n: gp[n] + damping[n] * p[n] for n in p}  # (G + D) p
        curvature = inner(p, ap)  # (Q,) p^T (G + D) p > 0 for an active query
        alpha = torch.where(active, rz / torch.where(active, curvature, 1.0), 0.0)
        x, r = _axpy(x, alpha, p), _axpy(r, -alpha, ap)
        relative = inner(r, r).sqrt() / scale.clamp_min(torch.finfo(torch.float64).tiny)
        residuals.append(torch.where(scale > 0, relative, 0.0))
        log.info("ekfac-cg step %d: relative residual max %.3e, mean %.3e", step + 1, float(relative.max()),
                 float(relative.mean()))
        active = active & (relative > settings.tolerance)
        z = precondition(r)
        rz_next = inner(r, z)
        beta = torch.where(active, rz_next / torch.where(active, rz, 1.0), 0.0)
        p, rz = _axpy(z, beta, p), rz_next
    return RefineResult(x, torch.stack(residuals).cpu())


def refine(factors: Factors, gradients: Vectors, product: Callable[[Vectors], Vectors],
           damping: float | str = "heuristic", settings: RefineSettings = RefineSettings()  # noqa: B008
           ) -> RefineResult:
    """(G + D)^-1 grad f(q) for every query by PCG with the factors' preconditioner P and damping D.

    gradients: layer -> (Q, d_out, d_in) query gradients (whence.queries.query_gradients); product: G V, e.g.
    a FisherVectorProduct over the fitting sequences."""
    if factors.strategy == "identity":
        raise FactorsMismatchError("ekfac-cg needs fitted factors for its preconditioner and damping; these are "
                                   "identity factors: fit with --strategy ekfac")
    damping_by_layer = {name: factors.damping(name, damping) for name in gradients}
    if not all(value > 0 for value in damping_by_layer.values()):
        raise ValueError(f"ekfac-cg needs positive damping on every layer, got {damping_by_layer}")

    def precondition(r: Vectors) -> Vectors:
        return {name: factors.precondition(name, t, damping) for name, t in r.items()}

    return preconditioned_cg(gradients, product, damping_by_layer, precondition, settings)
