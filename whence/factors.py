"""EK-FAC factors: covariances, their eigenbases, corrected eigenvalues, and the preconditioner they define.

Per tracked layer l (weight d_out x d_in, bias folded into d_in):
    A   = mean over tokens of a_t a_t^T          (d_in, d_in)     inputs
    S   = mean over tokens of s_t s_t^T          (d_out, d_out)   output gradients
    A = Q_A diag(l_A) Q_A^T,  S = Q_S diag(l_S) Q_S^T             (eigh in float64)
    Lambda = mean over sequences n of (Q_S^T dW_n Q_A)^2          (d_out, d_in), the eigenvalue correction
    P(V) = Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T        approximates (G + damping I)^-1 vec(V)

Strategies share that form: "kfac" uses Lambda = T_mean * l_S l_A^T (the Kronecker eigenvalues, scaled by the
mean tokens per sequence so K-FAC and EK-FAC approximate the same G); "diagonal" uses identity bases, so Lambda
is the diagonal of G; "identity" is P(V) = V (the gradient dot product).

Very large layers: A and S may be split block-diagonally into `num_blocks` blocks (paper, Appendix A); each
block has its own eigenbasis, and the basis of the layer is their direct sum.

Sums are kept unnormalised (float64) with their counts, so partial sums from workers add up exactly to a single
pass over all data; normalisation happens once, at eigendecomposition. A and S are symmetric, so each of their
blocks is kept packed: its upper triangle row by row, d (d + 1) / 2 values (`pack_symmetric`, `unpack_symmetric`),
about half the bytes of the square (a 30-block model's sums 1.55 -> 0.78 GB). A fit saves each pass's merged sums
(`save_sums`, `load_sums`, `sums_exist`: COVARIANCE_SUMS_FILE, CORRECTION_SUMS_FILE) so that an interrupted run
resumes at the next pass; the finished factors go to one file per layer and MANIFEST_FILE (`Factors.save`,
`Factors.load`; whence.factor_files: the layout, checksums, and the older single FACTORS_FILE).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from whence.errors import FactorsMismatchError
from whence.tracking import LayerCapture

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
DEFAULT_DAMPING_FACTOR = 0.1  # damping_l = 0.1 x mean(Lambda_l) (DESIGN.md)

# Names of stored factors (safetensors keys are f"{layer}/{NAME}" or f"{layer}/{NAME}/{block}").
ACTIVATION_EIGENVECTORS = "activation_eigenvectors"
ACTIVATION_EIGENVALUES = "activation_eigenvalues"
GRADIENT_EIGENVECTORS = "gradient_eigenvectors"
GRADIENT_EIGENVALUES = "gradient_eigenvalues"
CORRECTED_EIGENVALUES = "corrected_eigenvalues"

FACTORS_FILE = "factors.safetensors"
MANIFEST_FILE = "manifest.json"

# A pass's merged partial sums, saved beside the unfinished factors. Keys f"{layer}/{ACTIVATION_SUM}/{block}" and
# f"{layer}/{GRADIENT_SUM}/{block}" (CovarianceSums: packed, see pack_symmetric), f"{layer}/{LAMBDA_SUM}"
# (LambdaSums), all float64; the metadata holds SUMS_KIND (COVARIANCE_KIND or CORRECTION_KIND) and the counts, as
# decimal strings.
COVARIANCE_SUMS_FILE = "covariance.safetensors"
CORRECTION_SUMS_FILE = "corrections.safetensors"
ACTIVATION_SUM = "A"
GRADIENT_SUM = "S"
LAMBDA_SUM = "L"
SUMS_KIND = "kind"
COVARIANCE_KIND = "covariance"
CORRECTION_KIND = "correction"


def block_slices(dim: int, num_blocks: int) -> list[slice]:
    """Split range(dim) into min(num_blocks, dim) contiguous, nearly equal slices."""
    count = max(1, min(num_blocks, dim))
    bounds = [round(i * dim / count) for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Matmuls for statistics run in float32 at least (float64 for float64 models); sums are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Covariance pass


@dataclass
class CovarianceSums:
    """Unnormalised sums of a a^T and s s^T per layer, as lists of diagonal blocks, each packed (float64,
    (d (d + 1) / 2,): see pack_symmetric)."""

    activation: dict[str, list[torch.Tensor]]
    gradient: dict[str, list[torch.Tensor]]
    tokens: int = 0
    sequences: int = 0

    @classmethod
    def zeros(cls, layer_shapes: dict[str, tuple[int, int]], num_blocks: int = 1, device="cpu") -> CovarianceSums:
        """layer_shapes: name -> (d_out, d_in)."""

        def blocks(dim):
            return [torch.zeros(packed_size(s.stop - s.start), dtype=torch.float64, device=device)
                    for s in block_slices(dim, num_blocks)]

        return cls({n: blocks(d_in) for n, (_, d_in) in layer_shapes.items()},
                   {n: blocks(d_out) for n, (d_out, _) in layer_shapes.items()})

    def accumulate(self, captures: dict[str, LayerCapture], tokens: int, sequences: int) -> None:
        for name, capture in captures.items():
            _add_block_gram(self.activation[name], capture.activations)
            _add_block_gram(self.gradient[name], capture.output_grads)
        self.tokens += tokens
        self.sequences += sequences

    def __add__(self, other: CovarianceSums) -> CovarianceSums:
        return CovarianceSums(
            {n: [a + b.to(a.device) for a, b in zip(blocks, other.activation[n])] for n, blocks in self.activation.items()},
            {n: [a + b.to(a.device) for a, b in zip(blocks, other.gradient[n])] for n, blocks in self.gradient.items()},
            self.tokens + other.tokens,
            self.sequences + other.sequences,
        )

    def to(self, device) -> CovarianceSums:
        move = lambda d: {n: [t.to(device) for t in blocks] for n, blocks in d.items()}  # noqa: E731
        return CovarianceSums(move(self.activation), move(self.gradient), self.tokens, self.sequences)

    def subset(self, names) -> CovarianceSums:
        """The sums of the layers `names` only (the same tensors, not copies)."""
        return CovarianceSums({n: self.activation[n] for n in names}, {n: self.gradient[n] for n in names},
                              self.tokens, self.sequences)

    def matrices(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Layer `name`'s blocks of A's and S's sums as square matrices (unpacked copies)."""
        return ([unpack_symmetric(b) for b in self.activation[name]],
                [unpack_symmetric(b) for b in self.gradient[name]])


# ---------------------------------------------------------------------------------------------------------
# Packed symmetric matrices: the upper triangle, row by row (row i holds columns i .. d - 1)


def packed_size(d: int) -> int:
    return d * (d + 1) // 2


def packed_dim(size: int) -> int:
    """d of a packed (d (d + 1) / 2,) vector."""
    d = (math.isqrt(8 * size + 1) - 1) // 2
    if packed_size(d) != size:
        raise ValueError(f"{size} values are not the upper triangle of a square matrix")
    return d


_UPPER_INDEX: dict[tuple[int, str], torch.Tensor] = {}


def upper_index(d: int, device) -> torch.Tensor:
    """Flat positions in a (d, d) row-major matrix of its upper triangle, row by row: int64 (d (d + 1) / 2,),
    kept per size and device (a few distinct block sizes per model: 7.6 MB for d = 1376)."""
    device = torch.device(device)
    key = (d, str(device))
    if key not in _UPPER_INDEX:
        rows, cols = torch.triu_indices(d, d, device=device)
        _UPPER_INDEX[key] = rows * d + cols
    return _UPPER_INDEX[key]


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a square (d, d) matrix, row by row: (d (d + 1) / 2,), its dtype. Reads only the upper
    triangle (the lower may hold anything)."""
    d = matrix.shape[0]
    return matrix.reshape(-1).index_select(0, upper_index(d, matrix.device))


def unpack_upper(packed: torch.Tensor) -> torch.Tensor:
    """The (d, d) matrix with packed's values in its upper triangle and zeros below: a new tensor, packed's dtype."""
    d = packed_dim(packed.shape[0])
    matrix = torch.zeros(d * d, dtype=packed.dtype, device=packed.device)
    return matrix.index_copy_(0, upper_index(d, packed.device), packed).view(d, d)


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric (d, d) matrix whose upper triangle `packed` holds (pack_symmetric's inverse): exactly
    symmetric, a new tensor in packed's dtype."""
    upper = unpack_upper(packed)
    return upper + upper.triu(1).T


def _add_block_gram(blocks: list[torch.Tensor], x: torch.Tensor) -> None:
    """blocks[k] += packed x_k^T x_k over all tokens, x (B, T, d) with zero rows at padding."""
    flat = x.reshape(-1, x.shape[-1]).to(compute_dtype(x.dtype))  # (B*T, d)
    start = 0
    for block in blocks:
        width = packed_dim(block.shape[0])
        part = flat[:, start:start + width]
        # The product runs in the capture's precision (float32 on GPU for bfloat16 models); the running sum is
        # float64 so millions of tokens do not lose the small eigenvalues (add_ widens each float32 value exactly).
        # Only the upper triangle is formed (upper_gram) and kept: the sum it unpacks to is exactly symmetric.
        block.add_(pack_symmetric(upper_gram(part)).to(block.device))
        start += width


# Column blocks for upper_gram; below GRAM_MIN_DIM one GEMM is as fast.
GRAM_SPLITS = 4
GRAM_MIN_DIM = 256


def upper_gram(x: torch.Tensor, splits: int = GRAM_SPLITS) -> torch.Tensor:
    """x^T x (d, d) for x (n, d), with only its upper triangle (and the diagonal blocks) computed; what lies below
    the diagonal blocks is undefined.

    x^T x is symmetric, so with x's columns cut into `splits` blocks we multiply only the block rows from the
    diagonal rightwards (one GEMM each, x_i^T x[:, start_i:]): 10 of 16 block products for 4 splits, about a
    quarter less time than the full GEMM (measured on (2048, 1376) float32 inputs).
    """
    d = x.shape[1]
    if d < GRAM_MIN_DIM:
        return x.T @ x
    bounds = [round(i * d / splits) for i in range(splits + 1)]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[lo:hi, lo:] = x[:, lo:hi].T @ x[:, lo:]  # (hi - lo, d - lo): block row i, diagonal block first
    return out


# ---------------------------------------------------------------------------------------------------------
# Eigendecomposition


@dataclass
class LayerBasis:
    """Eigenbases of one layer's A and S, as block-diagonal lists (float64)."""

    activation_vectors: list[torch.Tensor]  # blocks of Q_A
    activation_values: torch.Tensor  # (d_in,) l_A, blocks concatenated
    gradient_vectors: list[torch.Tensor]  # blocks of Q_S
    gradient_values: torch.Tensor  # (d_out,)


def packed_eigh(packed_sum: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a packed sum (see pack_symmetric) / count, in float64: (eigenvalues >= 0,
    eigenvectors). LAPACK reads only the upper triangle (UPLO="U"), which is all the packed sum holds, so the
    matrix is neither mirrored nor symmetrised: the square, eigh's own copy of it, the eigenvectors and the
    workspace are the only (d, d) float64 blocks (whence.memory_estimate.EIGH_COPIES)."""
    matrix = unpack_upper(packed_sum.to(torch.float64)).div_(max(count, 1))
    values, vectors = torch.linalg.eigh(matrix, UPLO="U")
    return values.clamp_min(0.0), vectors  # covariances are PSD; tiny negative values are rounding


def eigendecompose_layer(covariance: CovarianceSums, name: str, device: torch.device | str | None = None
                         ) -> LayerBasis:
    """The eigenbases of one layer's A and S blocks, computed on `device` (default: where the sums are; on a
    GPU, cuSOLVER's float64 eigh, which the large blocks of big models need), returned on the CPU."""
    def eigh(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, vectors = packed_eigh(block.to(device) if device is not None else block, covariance.tokens)
        return values.cpu(), vectors.cpu()

    a = [eigh(block) for block in covariance.activation[name]]
    s = [eigh(block) for block in covariance.gradient[name]]
    return LayerBasis([v for _, v in a], torch.cat([e for e, _ in a]), [v for _, v in s], torch.cat([e for e, _ in s]))


# ---------------------------------------------------------------------------------------------------------
# Rotations by block-diagonal orthogonal matrices


def right_multiply(x: torch.Tensor, blocks: list[torch.Tensor] | None, transpose: bool = False) -> torch.Tensor:
    """x @ Q (or x @ Q^T) over the last dimension, Q = blockdiag(blocks); None means Q = I."""
    if blocks is None:
        return x
    parts, start = [], 0
    for block in blocks:
        end = start + block.shape[0]
        q = block.to(x.dtype)
        parts.append(x[..., start:end] @ (q.T if transpose else q))
        start = end
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def to_eigenbasis(v: torch.Tensor, basis: LayerBasis | None) -> torch.Tensor:
    """Q_S^T V Q_A for V (..., d_out, d_in)."""
    if basis is None:
        return v
    left = right_multiply(v.transpose(-1, -2), basis.gradient_vectors).transpose(-1, -2)  # Q_S^T V
    return right_multiply(left, basis.activation_vectors)


def from_eigenbasis(v: torch.Tensor, basis: LayerBasis | None) -> torch.Tensor:
    """Q_S V Q_A^T for V (..., d_out, d_in)."""
    if basis is None:
        return v
    left = right_multiply(v.transpose(-1, -2), basis.gradient_vectors, transpose=True).transpose(-1, -2)
    return right_multiply(left, basis.activation_vectors, transpose=True)


# ---------------------------------------------------------------------------------------------------------
# Eigenvalue-correction pass


@dataclass
class LambdaSums:
    """Unnormalised sums over sequences of (Q_S^T dW_n Q_A)^2 per layer, (d_out, d_in) float64."""

    sums: dict[str, torch.Tensor]
    sequences: int = 0

    @classmethod
    def zeros(cls, layer_shapes: dict[str, tuple[int, int]], device="cpu") -> LambdaSums:
        return cls({n: torch.zeros(shape, dtype=torch.float64, device=device) for n, shape in layer_shapes.items()})

    def accumulate(self, captures: dict[str, LayerCapture], bases: dict[str, LayerBasis | None], sequences: int) -> None:
        for name, capture in captures.items():
            basis = bases.get(name)
            dtype = compute_dtype(capture.activations.dtype)
            # Rotate tokens first: (Q_S^T dW Q_A) = (s Q_S)^T (a Q_A), cheaper than rotating each dW.
            s = right_multiply(capture.output_grads.to(dtype), basis.gradient_vectors if basis else None)
            a = right_multiply(capture.activations.to(dtype), basis.activation_vectors if basis else None)
            rotated = torch.bmm(s.transpose(1, 2), a)  # (B, d_out, d_in); bmm reads s transposed, einsum copies it
            # square_ in place: `rotated` is ours, and a (B, d_out, d_in) temporary less per layer and batch.
            self.sums[name].add_(rotated.square_().sum(dim=0).to(self.sums[name].device, torch.float64))
        self.sequences += sequences

    def __add__(self, other: LambdaSums) -> LambdaSums:
        return LambdaSums({n: t + other.sums[n].to(t.device) for n, t in self.sums.items()}, self.sequences + other.sequences)

    def to(self, device) -> LambdaSums:
        return LambdaSums({n: t.to(device) for n, t in self.sums.items()}, self.sequences)


# ---------------------------------------------------------------------------------------------------------
# Partial sums on disk (an interrupted fit resumes at the pass after the last one saved)


def save_sums(path: str | Path, sums: CovarianceSums | LambdaSums) -> Path:
    """Write a pass's merged sums to `path` (COVARIANCE_SUMS_FILE or CORRECTION_SUMS_FILE in a run directory),
    float64, through a .partial file and a rename so that a crash never leaves half a file that looks finished."""
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(sums, CovarianceSums):
        tensors = {f"{n}/{ACTIVATION_SUM}/{i}": t for n, blocks in sums.activation.items() for i, t in enumerate(blocks)}
        tensors |= {f"{n}/{GRADIENT_SUM}/{i}": t for n, blocks in sums.gradient.items() for i, t in enumerate(blocks)}
        metadata = {SUMS_KIND: COVARIANCE_KIND, "tokens": str(sums.tokens), "sequences": str(sums.sequences)}
    else:
        tensors = {f"{n}/{LAMBDA_SUM}": t for n, t in sums.sums.items()}
        metadata = {SUMS_KIND: CORRECTION_KIND, "sequences": str(sums.sequences)}
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to("cpu", torch.float64).contiguous() for k, v in tensors.items()}, str(partial),
              metadata=metadata)
    partial.replace(path)
    return path


def sums_exist(path: str | Path) -> bool:
    return Path(path).exists()


def load_sums(path: str | Path) -> CovarianceSums | LambdaSums:
    """The sums save_sums wrote: CovarianceSums or LambdaSums, as the file's SUMS_KIND says (blocks in order)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if metadata[SUMS_KIND] == CORRECTION_KIND:
        suffix = f"/{LAMBDA_SUM}"
        return LambdaSums({k.removesuffix(suffix): v for k, v in tensors.items()}, int(metadata["sequences"]))
    activation, gradient = {}, {}
    for key in sorted(tensors, key=lambda k: (k.rsplit("/", 2)[0], int(k.rsplit("/", 1)[1]))):
        layer, kind, _ = key.rsplit("/", 2)  # layer names hold dots, never slashes
        block = tensors[key]  # packed; a square block is a file written before sums were packed
        (activation if kind == ACTIVATION_SUM else gradient).setdefault(layer, []).append(
            pack_symmetric(block) if block.dim() == 2 else block)
    return CovarianceSums(activation, gradient, int(metadata["tokens"]), int(metadata["sequences"]))


# ---------------------------------------------------------------------------------------------------------
# Fitted factors


@dataclass
class Factors:
    """Everything needed to precondition query gradients, for every tracked layer."""

    strategy: str
    layers: list[dict]  # TrackedLayer.describe() in forward order
    bases: dict[str, LayerBasis | None]  # None for diagonal and identity
    eigenvalues: dict[str, torch.Tensor | None]  # (d_out, d_in) Lambda; None for identity
    metadata: dict = field(default_factory=dict)  # fingerprint, arguments, counts, versions

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.layers]

    def damping(self, name: str, damping: float | str = "heuristic") -> float:
        """damping_l: 0.1 x mean(Lambda_l) by default ("heuristic"), or an absolute value."""
        if self.strategy == "identity":
            return 0.0
        if damping == "heuristic":
            return DEFAULT_DAMPING_FACTOR * float(self.eigenvalues[name].mean())
        return float(damping)

    def precondition(self, name: str, v: torch.Tensor, damping: float | str = "heuristic",
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """P(V) = Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T for V (..., d_out, d_in), computed in `dtype`.

        float64 by default. float32 (what an index's query rows for a float32 model take) halves the time of the
        four products per layer and costs a relative error of about sqrt(d) x 6e-8 in each entry, far below the
        index's own compression error; the eigenvalues and damping are rounded once."""
        if self.strategy == "identity":
            return v.to(dtype)
        basis = self.bases[name]
        rotated = to_eigenbasis(v.to(dtype), _basis_on(basis, v.device))
        scaled = rotated / (self.eigenvalues[name].to(v.device, dtype) + self.damping(name, damping))
        return from_eigenbasis(scaled, _basis_on(basis, v.device))

    def check_compatible(self, fingerprint: str, layers: list[dict]) -> None:
        """FactorsMismatchError unless these factors were fitted for this model and these tracked layers."""
        theirs = self.metadata.get("model_fingerprint")
        if theirs != fingerprint:
            raise FactorsMismatchError(
                f"factors were fitted for another model (fingerprint {theirs}, this model {fingerprint}; "
                f"factors model: {self.metadata.get('model', '?')})"
            )
        mine = [(d["name"], d["d_out"], d["d_in"]) for d in self.layers]
        wanted = [(d["name"], d["d_out"], d["d_in"]) for d in layers]
        if mine != wanted:
            missing = sorted({w[0] for w in wanted} - {m[0] for m in mine})
            raise FactorsMismatchError(
                "factors track other layers than requested"
                + (f": no factors for {', '.join(missing[:8])}" if missing else f": {mine[:3]} ... vs {wanted[:3]} ...")
            )

    def save(self, directory: str | Path, manifest: dict | None = None, factor_dtype: str = "float64") -> Path:
        """One file per layer and kind, each with its checksum, and the manifest (whence.factor_files)."""
        from whence.factor_files import save_factors

        return save_factors(self, directory, manifest, factor_dtype)

    @classmethod
    def load(cls, directory: str | Path, device="cpu", layers: list[str] | None = None) -> Factors:
        """The factors in `directory` (either format, checksums verified); with `layers`, only those layers'."""
        from whence.factor_files import load_factors

        return load_factors(cls, directory, device, layers)


def _basis_on(basis: LayerBasis | None, device) -> LayerBasis | None:
    if basis is None or basis.activation_values.device == torch.device(device):
        return basis
    return LayerBasis([q.to(device) for q in basis.activation_vectors], basis.activation_values.to(device),
                      [q.to(device) for q in basis.gradient_vectors], basis.gradient_values.to(device))


def kfac_eigenvalues(basis: LayerBasis, tokens_per_sequence: float) -> torch.Tensor:
    """Lambda_KFAC = T_mean * l_S l_A^T: the eigenvalues of T_mean (S kron A), which approximates G when the
    tokens of a sequence are independent."""
    return tokens_per_sequence * torch.outer(basis.gradient_values, basis.activation_values)


def assemble_factors(
    strategy: str,
    layers: list[dict],
    covariance: CovarianceSums | None,
    bases: dict[str, LayerBasis] | None,
    corrections: LambdaSums | None,
    metadata: dict | None = None,
) -> Factors:
    """Combine the passes' results into Factors for `strategy`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    names = [layer["name"] for layer in layers]
    if strategy == "identity":
        return Factors(strategy, layers, dict.fromkeys(names), dict.fromkeys(names), metadata or {})
    if strategy == "kfac":
        per_sequence = covariance.tokens / max(covariance.sequences, 1)
        return Factors(strategy, layers, dict(bases), {n: kfac_eigenvalues(bases[n], per_sequence) for n in names},
                       metadata or {})
    eigenvalues = {n: corrections.sums[n] / max(corrections.sequences, 1) for n in names}
    kept_bases = dict(bases) if strategy == "ekfac" else dict.fromkeys(names)
    return Factors(strategy, layers, kept_bases, eigenvalues, metadata or {})


def write_json(path: Path, body: dict) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(body, indent=2, sort_keys=False, default=str))
    partial.replace(path)
