"""`whence score`'s prepare pass: a Ray task loads the model and factors where the model can live (a GPU worker on
a cluster, not the driver), checks they belong together, and writes the queries' gradients preconditioned by the
run's method to RESULTS_DIR/queries.safetensors, then by each baseline's to RESULTS_DIR/baselines/METHOD/ (each
with its checksum; whence.queries owns the file)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.score import ScoringRun

LISSA_SEQUENCES = 256  # LiSSA's Fisher-vector products come from the corpus's first sequences




def prepare_remotely(run: ScoringRun, factors_dir: str) -> None:
    """Query preparation runs where the model can live (a GPU worker on a cluster), not on the driver."""
    import ray

    from flows.cluster import cluster_gpus, gpu_share

    # With products on the stages, the task and its stage actors share the GPUs (one each when there are enough).
    gpus = gpu_share(run.cluster.shards + 1) if products_on_stages(run) else (1 if cluster_gpus() else 0)
    task = ray.remote(prepare_queries_task).options(num_gpus=gpus, num_cpus=1, max_retries=1)
    ray.get(task.remote(run, str(factors_dir)))


def products_on_stages(run: ScoringRun) -> bool:
    """ekfac-cg with --shards: its Fisher-vector products run over the run's pipeline stages."""
    return run.config.method == "ekfac-cg" and run.cluster.shards > 1


def prepare_queries_task(run: ScoringRun, factors_dir: str) -> None:
    """Write run.queries_files that are missing: the queries' gradients preconditioned by run.config.method
    (whence.queries), then by each baseline method, the model and factors loaded once."""
    from actors.hosting import host_model
    from whence.factors import Factors
    from whence.model import model_fingerprint
    from whence.queries import HostedModel, prepare_queries

    config = run.config
    hosted = HostedModel(*host_model(run.spec))
    factors = Factors.load(factors_dir)
    factors.check_compatible(model_fingerprint(hosted.model), [layer.describe() for layer in hosted.layers])
    main, *baselines = run.queries_files
    if not main.exists():
        _prepare_method(run, hosted, factors)
    for method, path in zip(config.baselines, baselines):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_prepared(prepare_queries(hosted, factors, run.queries, config.query_rank, config.damping, method),
                           path)


def _save_prepared(prepared, path: Path) -> None:
    """Prepared queries checked finite, written, and their checksum (a resume verifies it: flows.score_checks)."""
    from whence.checksums import write_checksum
    from whence.scoring import check_finite_queries

    check_finite_queries(prepared)
    prepared.save(path)
    write_checksum(path)


def _prepare_method(run: ScoringRun, hosted, factors) -> None:
    """run.queries_file by run.config.method; ekfac-cg's residuals beside it (whence.refine.REFINE_FILE)."""
    from flows.refine_source import refinement
    from whence.queries import prepare_queries
    from whence.refine import REFINE_FILE

    config = run.config
    if config.method == "lissa":
        from whence.lissa import lissa_prepare_queries

        prepared = lissa_prepare_queries(hosted, factors, run.queries, _lissa_batches(hosted.tokenizer, run),
                                         config.query_rank, config.damping)
    else:  # ekfac-cg streams the fitting sequences (flows.refine_source) for its Fisher-vector products
        batches, refine, notes = refinement(hosted.tokenizer, run, factors)
        if products_on_stages(run):
            prepared = _refined_on_stages(run, hosted, factors, batches, refine)
            notes["product_stages"] = run.cluster.shards
        else:
            prepared = prepare_queries(hosted, factors, run.queries, config.query_rank, config.damping,
                                       config.method, batches, refine)
    if prepared.diagnostics:
        run.state.write_json(REFINE_FILE, {**notes, **prepared.diagnostics})
    _save_prepared(prepared, run.queries_file)


def _refined_on_stages(run: ScoringRun, hosted, factors, batches, refine):
    """ekfac-cg's prepared queries with each Fisher-vector product summed over --shards pipeline stages
    (actors.sharded_worker.ShardedWorker.fisher_vector_product: each stage its own layers' part), the query
    gradients and the conjugate-gradient state here. The stages go when the solve is done."""
    from actors.sharded_worker import ShardedWorker, ShardOptions
    from flows.cluster import gpu_share
    from whence.queries import refined_queries
    from whence.refine import fitted_fisher

    config = run.config
    options = ShardOptions(stage_gpus=gpu_share(run.cluster.shards + 1))
    worker = ShardedWorker(run.spec, run.cluster.shards, fisher=fitted_fisher(factors)[0],
                           batch_size=config.batch_size, options=options)

    def product(v: dict) -> dict:  # G V from the stages (CPU, float64), on the device the solve runs on
        return {name: t.to(v[name].device) for name, t in worker.fisher_vector_product(batches, v).items()}

    try:
        return refined_queries(hosted, factors, run.queries, product, config.query_rank, config.damping, refine)
    finally:
        worker.shutdown()


def _lissa_batches(tokenizer, run: ScoringRun) -> list[dict]:
    """The corpus's first LISSA_SEQUENCES sequences, collated: LiSSA's Fisher-vector products come from them."""
    from itertools import islice

    from flows.corpus_pipeline import fragment_sequences
    from whence.api import sequence_batches

    def sequences():
        for fragment in run.fragments:
            yield from fragment_sequences(fragment, run.settings)

    return [batch for _, batch in sequence_batches(tokenizer, islice(sequences(), LISSA_SEQUENCES),
                                                   run.config.batch_size)]
