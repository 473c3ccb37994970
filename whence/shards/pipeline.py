"""All stages of one model in this process (tests, notebooks): whence.fitting.FactorFitter's and
whence.scoring.QueryScorer's methods over the stages, run micro-batch by micro-batch in the 1F1B schedule."""

from __future__ import annotations

import torch
from torch import nn

from whence.factors import CovarianceSums, LambdaSums, LayerBasis
from whence.model import TrackedLayer
from whence.queries import PreparedQueries
from whence.scoring import BatchScores
from whence.shards.merge import (
    concat_scores,
    merge_corrections,
    merge_covariance,
    merge_products,
    merge_scores,
    sum_coefficients,
)
from whence.shards.schedule import FORWARD, pipeline_schedule, split_batch
from whence.shards.stage import split_model
from whence.task import LanguageModelingTask


class ShardedPipeline:
    """All stages of one model in this process, run micro-batch by micro-batch in the 1F1B schedule.

    Exposes whence.fitting.FactorFitter's methods (covariance_step, set_bases, correction_step, take_covariance,
    take_corrections) and whence.scoring.QueryScorer's `score` (after set_queries), with results equal to theirs.
    """

    def __init__(self, model: nn.Module, layers: list[TrackedLayer], num_stages: int, fisher: str = "true",
                 num_blocks: int = 1, task: LanguageModelingTask | None = None, micro_batch_size: int | None = None):
        self.stages = split_model(model, num_stages, layers, fisher=fisher, num_blocks=num_blocks, task=task)
        self.layers = list(layers)
        self.layer_names = [layer.name for layer in self.layers]
        self.micro_batch_size = micro_batch_size
        self._next_id = 0

    def _run(self, batch: dict, objective: str, consume) -> list:
        """Forward and backward every micro-batch of `batch`; consume(stage, id) after each stage's backward."""
        micro = {}
        for part in split_batch(batch, self.micro_batch_size):
            micro[self._next_id] = part
            self._next_id += 1
        outputs: dict[tuple[int, int], dict] = {}  # (stage, id) -> forward outputs
        grads: dict[tuple[int, int], dict] = {}  # (stage, id) -> backward outputs
        results: dict[int, list] = {mb: [None] * len(self.stages) for mb in micro}
        last = len(self.stages) - 1
        for kind, k, mb in pipeline_schedule(list(micro), len(self.stages)):
            stage = self.stages[k]
            if kind == FORWARD:
                outputs[k, mb] = stage.forward(mb, micro[mb] if k == 0 else outputs.pop((k - 1, mb)), objective)
            else:
                grads[k, mb] = stage.backward(mb, None if k == last else grads.pop((k + 1, mb)))
                results[mb][k] = consume(stage, mb)
        return [results[mb] for mb in micro]

    def covariance_step(self, batch: dict) -> None:
        self._run(batch, "fisher", lambda stage, mb: stage.accumulate_covariance(mb))

    def set_bases(self, bases: dict[str, LayerBasis | None]) -> None:
        for stage in self.stages:
            stage.set_bases(bases)

    def correction_step(self, batch: dict) -> None:
        self._run(batch, "fisher", lambda stage, mb: stage.accumulate_corrections(mb))

    def take_covariance(self) -> CovarianceSums:
        return merge_covariance([stage.take_covariance() for stage in self.stages], self.layer_names)

    def take_corrections(self) -> LambdaSums:
        return merge_corrections([stage.take_corrections() for stage in self.stages], self.layer_names)

    def set_queries(self, queries: PreparedQueries, path: str = "auto") -> None:
        if queries.layer_names != self.layer_names:
            raise ValueError("prepared queries were made for other tracked layers")
        for stage in self.stages:
            stage.set_queries(queries, path)

    def score(self, batch: dict, per_token: bool = False) -> BatchScores:
        """Scores of every query against every sequence of `batch`, as QueryScorer.score."""
        micro = self._run(batch, "log_likelihood", lambda stage, mb: stage.score(mb, per_token))
        positions = [stage.positions for stage in self.stages]
        return concat_scores([merge_scores(parts, positions, len(self.layers)) for parts in micro])

    def fisher_vector_product(self, batches, directions: dict[str, torch.Tensor], path: str = "auto"
                              ) -> dict[str, torch.Tensor]:
        """ekfac-cg's G V over the stages, as whence.refine.FisherVectorProduct: batches() a fresh iterable of
        fitting batches (with seeds), directions layer -> (Q, d_out, d_in). Per micro-batch each stage gives its
        layers' part of the coefficients c (B, Q); their sum over the stages goes back to every stage, which adds
        its layers' products."""
        for stage in self.stages:
            stage.set_directions(directions, path)
        for batch in batches():
            for per_stage in self._run(batch, "fisher", lambda stage, mb: (mb, stage.product_coefficients(mb))):
                mb, c = per_stage[0][0], sum_coefficients([part for _, part in per_stage])
                for stage in self.stages:
                    stage.accumulate_products(mb, c)
        return merge_products([stage.take_products() for stage in self.stages])

    def memory_report(self) -> list[dict]:
        return [stage.memory_report() for stage in self.stages]
