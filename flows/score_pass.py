"""`whence score`'s scoring pass over the corpus, one query group at a time: Ray Data streams the (filtered)
sequences through an actor pool of scorers (actors.scorer), which send each batch's per-query top-k (and with
--save-all-scores write every score to parts/ themselves, whence.fragment_parts.ScoresPieces); the driver keeps a
per-query top-k per corpus fragment and writes the fragment's parts when it is complete. flows.score plans the
run and reduces the parts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flows.corpus_pipeline import FragmentPlan
    from flows.query_groups import QueryGroup
    from flows.score import ScoringRun
    from whence.corpus import Fragment
    from whence.fragment_parts import FragmentResults, ScoresPieces

log = logging.getLogger("whence.score")


def scoring_dataset(run: ScoringRun, fragments: list[Fragment], plan: FragmentPlan, group: QueryGroup,
                    per_token: bool = False):
    """The sequences of `fragments` (those `plan` lets through) streamed through an actor pool of scorers holding
    the queries of `group`; the per-token pass runs unsharded. The run's actor_env goes to the scoring actors
    (CUDA or fault-injection settings)."""
    import ray.data

    from actors.scorer import SequenceScorer
    from flows.cluster import actor_resources, gpu_share, torch_threads
    from flows.corpus_pipeline import sequences_dataset

    config, workers = run.config, run.cluster.workers
    shards = 1 if per_token else run.cluster.shards
    resources = actor_resources(workers)
    # The scoring pass scores the run's queries and its baselines' side by side; the per-token pass the run's only.
    queries = str(run.queries_file) if per_token else [str(path) for path in run.queries_files]
    # Scorers send their batches' top-k only, unless the driver needs every score (--top-k all: it is the top-k)
    # or the rows themselves (the per-token pass); with --save-all-scores they write every score themselves.
    reduced_top_k = None if per_token else config.top_k
    pieces = None if per_token else scores_pieces(run, group)
    scorer_class, constructor = SequenceScorer, {"spec": run.spec, "queries_path": queries,
                                                  "per_token": per_token, "batch_size": config.batch_size,
                                                  "num_threads": torch_threads(resources.get("num_cpus", 1)),
                                                  "skip_non_finite": config.skip_non_finite,
                                                  "top_k": reduced_top_k, "query_range": group.range,
                                                  "scores": pieces}
    if shards > 1:
        from actors.scorer import ShardedSequenceScorer
        from actors.sharded_worker import ShardOptions

        scorer_class = ShardedSequenceScorer
        options = ShardOptions(stage_gpus=gpu_share(workers * shards))
        constructor = {"spec": run.spec, "queries_path": queries, "per_token": per_token,
                       "shards": shards, "batch_size": config.batch_size, "options": options,
                       "skip_non_finite": config.skip_non_finite, "top_k": reduced_top_k,
                       "query_range": group.range, "scores": pieces}
        resources = {"num_cpus": 0.1}
    # batch_size=None: each block the reader made is one batch, so which sequences are scored together (and so
    # the floating-point result) does not depend on the number of workers or on scheduling. Ray Data refuses
    # None for actors that hold GPUs; there, batches of several scoring batches' rows, which may span blocks (the
    # rows carry their fragment, and GPU arithmetic is not bit-reproducible across batchings anyway).
    ray_batch = 4 * config.batch_size if resources.get("num_gpus") else None
    return sequences_dataset(fragments, run.settings, plan).map_batches(
        scorer_class,
        batch_size=ray_batch,
        fn_constructor_kwargs=constructor,
        # Ray Data's actor pools restart a dead actor and rerun its lost batches (max_restarts=-1 and
        # max_task_retries=-1 are its defaults in Ray 2.60), so a killed scorer costs time, not results.
        compute=ray.data.ActorPoolStrategy(size=workers),
        runtime_env={"env_vars": run.cluster.actor_env} if run.cluster.actor_env else None,
        **resources,
    )


def scores_pieces(run: ScoringRun, group: QueryGroup) -> ScoresPieces | None:
    """Where `group`'s scorers write every score themselves (--save-all-scores), so the driver receives only each
    batch's top-k; None without the option, or with --top-k all, where every score reaches the driver anyway (it
    is the top-k) and the driver writes the fragments' scores parts from the rows it holds."""
    from whence.fragment_parts import ScoresPieces

    if not run.config.save_all_scores or run.config.top_k is None:
        return None
    return ScoresPieces(str(group.directory(run.state.path)), tuple(run.query_ids[group.start : group.stop]))


def score_fragments(run: ScoringRun, plan: FragmentPlan, num_layers: int, expected: int, group: QueryGroup
                     ) -> tuple[int, tuple[int, float]]:
    """Stream every fragment `group` has not finished through the scorers; write each fragment's parts when it
    completes. Returns the sequences scored in all (resumed parts included) and Progress.steady() of this pass."""
    from flows.progress import Progress
    from whence.errors import WhenceError
    from whence.fragment_parts import part_sequences

    part_path, pieces = group.part_path(run.state.path), scores_pieces(run, group)
    done, pending = _unfinished_fragments(run, group, pieces)
    already = sum(part_sequences(path) for path in done.values())
    queries = "" if group.only else f" queries {group.start + 1}-{group.stop} of {len(run.queries)}:"
    if not pending:
        log.info("resuming:%s all %d fragments already scored", queries, len(run.fragments))
        return already, (0, 0.0)
    if done:
        log.info("resuming:%s %d of %d fragments already scored", queries, len(done), len(run.fragments))
    progress = Progress(f"scoring{queries}", max(expected - already, 0) or None)
    open_fragments: dict[int, FragmentResults] = {}
    unfinished = []  # fragments whose scores pieces were missing or damaged: left for a rerun
    for batch in scoring_dataset(run, pending, plan, group).iter_batches(batch_size=None, batch_format="numpy"):
        for fragment in np.unique(batch["fragment"]).tolist():
            rows = batch["fragment"] == fragment
            if fragment not in open_fragments:
                open_fragments[fragment] = _fragment_results(run, group, fragment, num_layers, pieces)
            results = open_fragments[fragment]
            scored = results.add({name: values[rows] for name, values in batch.items()})
            progress.advance(scored, int(batch["num_tokens"][rows].sum()))
            if results.complete:
                if (problem := results.write(part_path, pieces)) is not None:
                    log.warning("%s; fragment %d is left unfinished", problem, fragment)
                    unfinished.append(fragment)
                del open_fragments[fragment]
    if open_fragments or unfinished:
        raise WhenceError(f"fragments {sorted([*open_fragments, *unfinished])} did not complete; rerun the same "
                          "command to score them again")
    progress.finish()
    return already + progress.done, progress.steady()


def _unfinished_fragments(run: ScoringRun, group: QueryGroup, pieces: ScoresPieces | None
                          ) -> tuple[dict[int, Path], list[Fragment]]:
    """(fragment -> verified top-k part, the fragments to score): those with a part that is missing or damaged
    (verified_parts) are scored again, their scores pieces from an earlier attempt removed first, so that no
    piece of it is ever joined with this attempt's."""
    from whence.fragment_parts import TOPK_PART, verified_parts

    config = run.config
    done = verified_parts(group.finished_parts(run.state.path, TOPK_PART), group.part_path(run.state.path),
                          config.save_all_scores, config.baselines)
    pending = [f for f in run.fragments if f.index not in done]
    if pieces is not None:
        for fragment in pending:
            pieces.remove(fragment.index)
    return done, pending


def _fragment_results(run: ScoringRun, group: QueryGroup, fragment: int, num_layers: int,
                      pieces: ScoresPieces | None) -> FragmentResults:
    """The driver's collector of one fragment's scored batches: every score kept only with --save-all-scores when
    the scorers do not write them (--top-k all); batches in corpus order (run.order)."""
    from whence.fragment_parts import FragmentResults

    config = run.config
    return FragmentResults(fragment, run.query_ids[group.start : group.stop], config.top_k, num_layers,
                           keep_all=config.save_all_scores and pieces is None, baselines=config.baselines,
                           order=run.order)
