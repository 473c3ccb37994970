"""The measurements of `whence bench`, by name: each adds figures (ratios), details (raw numbers) or a pending
reason to `Results`. The in-process ones (1-4) are in flows.bench.kernels, the Ray ones (5-8) in
flows.bench.pipeline, the multi-node one (scale) in flows.bench.scale; each is imported only when a measurement
runs."""

from __future__ import annotations

from dataclasses import dataclass, field

MEASUREMENTS = ("fitting", "scoring", "lissa", "refine", "tfidf", "reduce", "pipeline", "score_memory", "workers",
                "shards", "memory", "index", "index_bundled", "scale")
PIPELINE_MEASUREMENTS = ("pipeline", "score_memory", "workers", "shards", "memory", "index", "index_bundled",
                         "scale")  # need Ray
# Run only when named in --only, whatever the config: about 40 minutes on two cores.
NAMED_ONLY = ("index_bundled",)


@dataclass
class Results:
    """What the measurements found: ratios (figures), raw numbers (details) and what could not be measured."""

    figures: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # measurement -> why it was not measured

    def add(self, name: str, figures: dict, details: dict) -> None:
        self.figures.update(figures)
        self.details[name] = details


def measure_fitting(bench, results: Results) -> None:
    """2. fit_factors (covariance pass + eigendecompositions + correction pass) over training steps."""
    from flows.bench.kernels import fitting_time

    bench.ensure_model()
    figures, details, bench.factors = fitting_time(bench.model, bench.layers, bench.batches,
                                                   bench.config.fit_repeats, bench.device)
    results.add("fitting", figures, details)


def measure_scoring(bench, results: Results) -> None:
    """1. QueryScorer throughput over plain-training throughput, per number of queries and rank."""
    from flows.bench.kernels import prepared_by_rank, scoring_throughput
    from whence.factors import compute_dtype

    bench.ensure_factors()  # scoring alone: factors from one batch are enough to time it
    bench.ensure_tokenizer()
    prepared = prepared_by_rank(bench.model, bench.tokenizer, bench.layers, bench.factors, bench.config.ranks,
                                compute_dtype(bench.dtype))  # the precision QueryScorer keeps queries in
    results.add("scoring", *scoring_throughput(bench.model, bench.layers, prepared, bench.batches[0], bench.config,
                                               bench.device))


def measure_query_preparation(bench, results: Results) -> None:
    """3. LiSSA iterations to EK-FAC's accuracy over EK-FAC preparation, in the micro setting."""
    from flows.bench.kernels import ekfac_vs_lissa
    from flows.bench.micro import micro_setting

    results.add("lissa", *ekfac_vs_lissa(micro_setting(bench.config.micro_sequences), bench.config.repeats))


def measure_refine(bench, results: Results) -> None:
    """ekfac-cg preparation over EK-FAC's, one Fisher-vector product over training, and scoring unchanged."""
    from flows.bench.refine import refine_cost

    results.add("refine", *refine_cost(bench))


def measure_tfidf(bench, results: Results) -> None:
    """4. TF-IDF filtering docs/s and peak memory, corpus 4x over 1x."""
    from flows.bench.fixtures import demo_corpus
    from flows.bench.kernels import tfidf_scaling

    results.add("tfidf", *tfidf_scaling(demo_corpus(), bench.config))


def measure_reduce(bench, results: Results) -> None:
    """The driver's bytes and CPU seconds per sequence, scorers sending every score or their batches' top-k."""
    from flows.bench.reduce import driver_costs

    results.add("reduce", *driver_costs())


def measure_pipeline(name: str):
    """Measurement `name` (5-8) of flows.bench.pipeline: `whence score` or sharded workers, on Ray."""
    function = {"pipeline": "pipeline_overhead", "score_memory": "score_memory", "workers": "worker_scaling",
                "shards": "shard_scaling"}[name]

    def measure(bench, results: Results) -> None:
        try:
            from flows.bench import pipeline

            figures, details = getattr(pipeline, function)(bench)
        except ImportError as error:  # Ray, or flows.score, missing from this installation
            results.pending[name] = f"not measured: {error}"
            return
        results.add(name, figures, details)

    measure.__doc__ = f"flows.bench.pipeline.{function}, or why it could not run."
    return measure


def measure_fit_memory(bench, results: Results) -> None:
    """`whence fit` peak memory per process against the factors' bytes, and the estimate against it."""
    from flows.bench.memory import fit_memory

    results.add("memory", *fit_memory(bench))


def measure_index(bench, results: Results) -> None:
    """`whence index` and `whence query` against `whence score` (flows.bench.index)."""
    from flows.bench.index import index_speed

    results.add("index", *index_speed(bench))


def measure_index_bundled(bench, results: Results) -> None:
    """`whence index` and `whence query` against `whence score` over the whole bundled corpus, 8 new queries, the
    bundled model (flows.bench.index_bundled)."""
    from flows.bench.index_bundled import bundled_index_speed

    results.add("index_bundled", *bundled_index_speed(bench))


def measure_scale(bench, results: Results) -> None:
    """`whence score` on a 3-node Ray cluster and 200,000 sequences (flows.bench.scale): the driver's bytes and
    CPU per sequence with the scorers' top-k against every score, reads of one file against many fragments, and
    the driver's and the actors' peak memory at 4x the corpus over 1x."""
    from flows.bench.scale import scale_costs

    results.add("scale", *scale_costs())


MEASURE = {
    "fitting": measure_fitting,
    "scoring": measure_scoring,
    "lissa": measure_query_preparation,
    "refine": measure_refine,
    "tfidf": measure_tfidf,
    "reduce": measure_reduce,
    **{name: measure_pipeline(name) for name in ("pipeline", "score_memory", "workers", "shards")},
    "memory": measure_fit_memory,
    "index": measure_index,
    "index_bundled": measure_index_bundled,
    "scale": measure_scale,
}
