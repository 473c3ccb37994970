"""Measuring how right influence scores are: pure torch / numpy / scipy, no Ray (the `whence eval` commands
orchestrate these in flows/eval/).

    lds.py        the linear datamodeling score (Park et al. 2023): subsets, Spearman per query, noise figures
    trace.py      fact tracing: the rank of a query's known source, recall@k and MRR; BM25 and random baselines
    exact.py      exact damped-Fisher influence for small tracked layers, and each method's agreement with it
    methods.py    every method's (Q, N) score matrix over a list of sequences, in process
    interpret.py  a score's first-order meaning: the change of log p(completion | prompt) in nats
    measure.py    each query's f(q) = log p(completion | prompt) under a model, in float64
    tables.py     the result files (lds.json, trace.json, exact.json) read back as tables

The runs themselves (training subset models on Ray, scoring a corpus) are flows: `whence eval lds|trace|exact`
from the command line, or from Python flows.eval.lds_corpus, flows.eval.trace_corpus, flows.eval.exact_corpus.
"""

from whence.evaluation.errors import EvaluationError, ModelTooLargeError
from whence.evaluation.interpret import predicted_change
from whence.evaluation.lds import LDSResult, linear_datamodeling_score, noise_figures, sample_subsets
from whence.evaluation.measure import measure_queries, query_batch
from whence.evaluation.tables import lds_table, read_result, trace_table
from whence.evaluation.trace import TraceMetrics, source_ranks, trace_metrics

__all__ = [
    "EvaluationError",
    "LDSResult",
    "ModelTooLargeError",
    "TraceMetrics",
    "lds_table",
    "linear_datamodeling_score",
    "measure_queries",
    "noise_figures",
    "predicted_change",
    "query_batch",
    "read_result",
    "sample_subsets",
    "source_ranks",
    "trace_metrics",
    "trace_table",
]
