"""Settings of an index build (`whence index`, flows.index): validated, with help text on every field.
`whence query` takes whence.config.ScoreConfig (top_k, tfidf_candidates, method, damping, per_token)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from whence.errors import SettingsError
from whence.index.projection import DEFAULT_DIMS, DEFAULT_KIND, KINDS
from whence.index.shards import DEFAULT_PART_BYTES, DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES
from whence.settings import setting


@dataclass
class IndexConfig:
    dim: int | None = setting("per tracked layer, keep K input and K output dimensions (k_in = min(K, d_in), k_out "
                              "= min(K, d_out)): K*K stored values per layer and sequence; for lowrank the rank "
                              "r: r*(d_out + d_in) values (default: " + ", ".join(
                                  f"{k} {v}" for k, v in DEFAULT_DIMS.items()) + ")", None)
    projection: str = setting("'eigen': the fitted EK-FAC eigenvectors of largest eigenvalue (exact "
                              "preconditioning in the kept space); 'lambda': the K*K eigen-coordinates of "
                              "largest corrected eigenvalue, wherever they lie (also exact there); 'random': "
                              "seeded random orthogonal projections of the gradient (a Johnson-Lindenstrauss "
                              "estimate); 'lowrank': each sequence's own rank-r factorisation of its gradient "
                              "(the query preconditioned in full)", DEFAULT_KIND)
    seed: int = setting("seed of the random projections", 0)
    dtype: str = setting(f"storage dtype of the compressed gradients: {', '.join(STORAGE_DTYPES)}",
                         DEFAULT_STORAGE_DTYPE)
    batch_size: int = setting("sequences per forward/backward pass", 8)
    seq_len: int | None = setting("tokens per training sequence (None: as the factors were fitted)", None)
    part_size: int | None = setting("most sequences one shard file holds: a larger fragment is written in parts as "
                                    "it is indexed, so an indexing actor holds one part's rows at a time and an "
                                    "interrupted fragment resumes after its finished parts (default: as many as "
                                    f"fit in {DEFAULT_PART_BYTES >> 20} MiB)", None)

    def __post_init__(self):
        if self.dim is None and self.projection in DEFAULT_DIMS:
            self.dim = DEFAULT_DIMS[self.projection]
        checks = [(self.dim is None or self.dim >= 1, "dim", f"must be a positive integer, got {self.dim}"),
                  (self.projection in KINDS, "projection", f"must be one of {', '.join(KINDS)}, got {self.projection!r}"),
                  (self.dtype in STORAGE_DTYPES, "dtype", f"must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}"),
                  (self.batch_size >= 1, "batch_size", f"must be positive, got {self.batch_size}"),
                  (self.seq_len is None or self.seq_len >= 2, "seq_len", f"must be at least 2, got {self.seq_len}"),
                  (self.part_size is None or self.part_size >= 1, "part_size",
                   f"must be positive, got {self.part_size}")]
        for ok, name, message in checks:
            if not ok:
                raise SettingsError(f"{name} {message}", name)

    def to_dict(self) -> dict:
        return asdict(self)
