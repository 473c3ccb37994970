"""Settings for fitting and scoring: validated dataclasses with help text on every field.

The command line fills these; notebooks construct them directly. `help_for(Config, "field")` returns a field's
help so the two never drift apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from whence.errors import SettingsError
from whence.factors import STRATEGIES
from whence.queries import BASELINE_METHODS, DEFAULT_QUERY_RANK, METHODS, parse_rank
from whence.refine import DEFAULT_REFINE_SEQUENCES, DEFAULT_REFINE_STEPS, DEFAULT_REFINE_TOLERANCE
from whence.results import BASELINES_DIR
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
    factor_dtype: str = setting("dtype of the stored eigenbases and eigenvalues: 'float64', or 'float32' (half the "
                                "bytes; sums still accumulate and eigh still runs in float64)", "float64")
    skip_non_finite: bool = setting("skip and count the sequences whose activations or output gradients hold NaN or "
                                    "inf, named in the manifest (default: stop with an error naming them)", False)

    def __post_init__(self):
        _require(self.factor_dtype in ("float32", "float64"), "factor_dtype",
                 f"must be 'float32' or 'float64', got {self.factor_dtype!r}")
        _require(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}, got {self.strategy!r}")
        _require(self.fisher in FISHER_MODES, "fisher", f"must be one of {FISHER_MODES}, got {self.fisher!r}")
        for name in ("seq_len", "batch_size", "num_blocks"):
            _require(getattr(self, name) >= 1, name, f"must be positive, got {getattr(self, name)}")
        _require(self.seq_len >= 2, "seq_len",
                 f"must be at least 2 (a sequence needs one predicted token), got {self.seq_len}")
        _require(self.max_sequences is None or self.max_sequences >= 1, "max_sequences",
                 f"must be positive, got {self.max_sequences}")

    def to_dict(self) -> dict:
        values = asdict(self)
        if not values["skip_non_finite"]:  # unset: recorded as before it existed, so earlier fits resume
            del values["skip_non_finite"]
        return values


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
    refine_steps: int = setting("ekfac-cg: conjugate-gradient steps at most", DEFAULT_REFINE_STEPS)
    refine_sequences: int = setting("ekfac-cg: fitting sequences its Fisher-vector products average over",
                                    DEFAULT_REFINE_SEQUENCES)
    refine_tolerance: float = setting("ekfac-cg: stop once every query's relative residual is below this",
                                      DEFAULT_REFINE_TOLERANCE)
    skip_non_finite: bool = setting("skip and count the sequences whose activations, gradients or scores hold NaN "
                                    "or inf, named in the manifest (default: stop with an error naming them)", False)
    query_batch: int | None = setting("score the queries in groups of N, one pass each, so an actor holds N queries' "
                                      "prepared gradients at a time (None: as many as fit a quarter of its "
                                      "node's memory share, logged)", None)
    baselines: list[str] = setting(
        f"methods also scored in the same pass, each into RESULTS_DIR/{BASELINES_DIR}/METHOD (one of "
        f"{', '.join(BASELINE_METHODS)}): they share its forward and backward passes", [])

    def __post_init__(self):
        _require(self.method in METHODS, "method", f"must be one of {METHODS}, got {self.method!r}")
        try:
            self.query_rank = parse_rank(self.query_rank)
        except ValueError as error:
            raise SettingsError(f"query_rank: {error}", "query_rank") from None
        if self.damping != "heuristic":
            self.damping = _finite_float(self.damping, "damping")
            # NaN makes every score NaN and inf makes every score 0: neither is a damping.
            _require(self.damping >= 0, "damping", f"must be 'heuristic' or a finite number >= 0, got {self.damping}")
        _require(self.top_k is None or self.top_k >= 1, "top_k", f"must be positive or None, got {self.top_k}")
        _require(self.tfidf_candidates >= 0, "tfidf_candidates",
                 f"must be >= 0 (0: score every sequence), got {self.tfidf_candidates}")
        _require(self.seq_len is None or self.seq_len >= 2, "seq_len",
                 f"must be at least 2 (a sequence needs one predicted token), got {self.seq_len}")
        _require(self.batch_size >= 1, "batch_size", f"must be positive, got {self.batch_size}")
        _require(self.refine_steps >= 1, "refine_steps", f"must be positive, got {self.refine_steps}")
        _require(self.refine_sequences >= 1, "refine_sequences", f"must be positive, got {self.refine_sequences}")
        self.refine_tolerance = _finite_float(self.refine_tolerance, "refine_tolerance")
        _require(self.refine_tolerance >= 0, "refine_tolerance", f"must be >= 0, got {self.refine_tolerance}")
        _require(self.query_batch is None or self.query_batch >= 1, "query_batch",
                 f"must be positive or None, got {self.query_batch}")
        self.baselines = list(self.baselines)
        for baseline in self.baselines:
            _require(baseline in BASELINE_METHODS, "baselines",
                     f"must be among {BASELINE_METHODS} (methods prepared from the factors alone), got {baseline!r}")
        _require(len(set(self.baselines)) == len(self.baselines) and self.method not in self.baselines, "baselines",
                 f"must name each method once and not the scored method {self.method!r}, got {self.baselines}")

    def to_dict(self) -> dict:
        values = asdict(self)
        for name in ("baselines", "skip_non_finite", "query_batch"):  # unset: recorded as before they existed
            if not values[name]:
                del values[name]
        return values


def _require(condition: bool, name: str, message: str) -> None:
    """SettingsError "name must ..." naming the field (the command line names its option) unless condition."""
    if not condition:
        raise SettingsError(f"{name} {message}", name)


def _finite_float(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}", name) from None
    _require(math.isfinite(number), name, f"must be a finite number, got {value!r}")
    return number
