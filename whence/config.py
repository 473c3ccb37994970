"""Settings for fitting and scoring: validated dataclasses with help text on every field.

The command line fills these; notebooks construct them directly. `help_for(Config, "field")` returns a field's
help so the two never drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from whence.factors import STRATEGIES
from whence.queries import DEFAULT_QUERY_RANK, METHODS, parse_rank
from whence.settings import help_for, setting
from whence.task import FISHER_MODES

__all__ = ["FitConfig", "ScoreConfig", "help_for"]


@dataclass
class FitConfig:
    modules: str = setting("tracked layers: 'mlp' (every block's MLP linear layers), 'all' (attention too), "
                         "or a regex over module names", "mlp")
    strategy: str = setting(f"Hessian approximation: {', '.join(STRATEGIES)}", "ekfac")
    fisher: str = setting("'true' samples labels from the model (default); 'empirical' uses the data's", "true")
    seq_len: int = setting("tokens per training sequence (documents are cut into windows of this length)", 512)
    max_sequences: int | None = setting("fit on at most this many sequences (None: all)", None)
    batch_size: int = setting("sequences per forward/backward pass", 8)
    seed: int = setting("seed for the true Fisher's sampled labels", 0)
    num_blocks: int = setting("split A and S block-diagonally into this many blocks (very large layers)", 1)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.fisher not in FISHER_MODES:
            raise ValueError(f"fisher must be one of {FISHER_MODES}, got {self.fisher!r}")
        for name in ("seq_len", "batch_size", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2 (a sequence needs one predicted token)")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(f"max_sequences must be positive, got {self.max_sequences}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoreConfig:
    top_k: int | None = setting("sequences kept per query, by score (None: all)", 10)
    tfidf_candidates: int = setting("per query, score only the N sequences most similar by TF-IDF (0: all)", 10_000)
    query_rank: int | str = setting("rank of each preconditioned query gradient (SVD), or 'full'", DEFAULT_QUERY_RANK)
    damping: float | str = setting("'heuristic' (0.1 x mean corrected eigenvalue per layer) or an absolute value",
                                 "heuristic")
    method: str = setting(f"preconditioner: {', '.join(METHODS)}", "ekfac")
    per_token: bool = setting("also compute per-token scores of the top-k sequences", False)
    seq_len: int | None = setting("tokens per training sequence (None: as the factors were fitted)", None)
    batch_size: int = setting("sequences per scoring batch", 8)
    save_all_scores: bool = setting("also write every (query, sequence) score to scores.parquet", False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        self.query_rank = parse_rank(self.query_rank)
        if self.damping != "heuristic":
            self.damping = float(self.damping)
            if self.damping < 0:
                raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be positive or None, got {self.top_k}")
        if self.tfidf_candidates < 0:
            raise ValueError(f"tfidf_candidates must be >= 0, got {self.tfidf_candidates}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)
