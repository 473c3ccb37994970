"""All stages of one model in this process (tests, notebooks): whence.fitting.FactorFitter's and
whence.scoring.QueryScorer's methods over the stages, run micro-batch by micro-batch in the 1F1B schedule, or with
activation checkpointing (`ShardedPipeline.checkpointed`: one stage per transformer block, each stage's graph
rebuilt when its backward comes, so a batch holds one block's graph and captures at a time)."""

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
                 num_blocks: int = 1, task: LanguageModelingTask | None = None, micro_batch_size: int | None = None,
                 recompute: bool = False):
        self.stages = split_model(model, num_stages, layers, fisher=fisher, num_blocks=num_blocks, task=task)
        self.layers = list(layers)
        self.layer_names = [layer.name for layer in self.layers]
        self.micro_batch_size = micro_batch_size
        self.recompute = recompute
        self._next_id = 0

    @classmethod
    def checkpointed(cls, model: nn.Module, layers: list[TrackedLayer], fisher: str = "true", num_blocks: int = 1,
                     task: LanguageModelingTask | None = None, micro_batch_size: int | None = None) -> ShardedPipeline:
        """Activation checkpointing: one stage per transformer block, run in the recomputing order (_recomputed).
        A batch then holds its boundary hidden states (blocks x (B, T, H)) and one block's graph and captures at a
        time, not every block's: the same sums and scores for about one more forward pass of compute."""
        from whence.shards.architecture import architecture_of

        blocks = len(architecture_of(model).blocks_of(model))
        return cls(model, layers, blocks, fisher, num_blocks, task, micro_batch_size, recompute=True)

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    def _run(self, batch: dict, objective: str, consume) -> list:
        """Forward and backward every micro-batch of `batch`; consume(stage, id) after each stage's backward."""
        micro = {}
        for part in split_batch(batch, self.micro_batch_size):
            micro[self._next_id] = part
            self._next_id += 1
        if self.recompute:
            return [self._recomputed(mb, part, objective, consume) for mb, part in micro.items()]
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

    def _recomputed(self, mb: int, batch: dict, objective: str, consume) -> list:
        """One micro-batch with activation checkpointing: a forward pass without graphs that keeps only what enters
        each stage, then from the last stage back to the first, each stage's forward run again with its graph and
        its backward straight after (then consume(stage, mb)). Recomputing a stage gives the same activations as
        its first forward (the model is in eval mode: no dropout), so the sums are those of the 1F1B schedule."""
        received = [batch]  # received[k]: what stage k takes in
        for stage in self.stages[:-1]:
            received.append(stage.forward(mb, received[-1], objective, keep=False))
        results: list = [None] * len(self.stages)
        grads = None
        for k in range(len(self.stages) - 1, -1, -1):
            stage = self.stages[k]
            stage.forward(mb, received.pop(), objective)  # received[k]: dropped once its stage has run
            grads = stage.backward(mb, grads)
            results[k] = consume(stage, mb)
        return results

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
