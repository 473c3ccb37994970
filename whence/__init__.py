"""Whence: trace a language model's behaviour back to its training data with EK-FAC influence functions.

The core library is pure torch (no Ray): load a model, choose the tracked layers, fit factors, prepare queries
and score sequences in one process. `actors/` and `flows/` run the same code at corpus scale on Ray.
"""

from whence.api import ScoreTable, fit, prepare, score
from whence.config import FitConfig, ScoreConfig
from whence.errors import (
    CorpusError,
    FactorsMismatchError,
    ModelError,
    QueryError,
    RunStateError,
    WhenceError,
)
from whence.factors import Factors
from whence.index import Index
from whence.model import TrackedLayer, find_tracked_layers, load_causal_lm, model_fingerprint
from whence.queries import PreparedQueries, prepare_queries
from whence.scoring import BatchScores, QueryScorer
from whence.text import Query, load_queries

__version__ = "0.1.0"

__all__ = [
    "BatchScores", "CorpusError", "Factors", "FactorsMismatchError", "FitConfig", "Index", "ModelError", "PreparedQueries",
    "Query", "QueryError", "QueryScorer", "RunStateError", "ScoreConfig", "ScoreTable", "TrackedLayer",
    "WhenceError", "find_tracked_layers", "fit", "load_causal_lm", "load_queries", "model_fingerprint", "prepare",
    "prepare_queries", "score",
]
