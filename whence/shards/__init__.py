"""Model shards: a causal LM cut into pipeline stages, each holding a contiguous range of transformer blocks.

Influence is a sum over tracked layers, so a model too large for one device can be split into N stages that each
fit their own layers' statistics and score their own layers; partial results are summed (or, per layer, placed
side by side). Nothing here imports Ray: `actors/stage.py` wraps a `Stage` in an actor and
`actors/sharded_worker.py` drives N of them.

    architecture.py  Architecture, the registry of families (architecture_of), what every family's forward builds
    families/        one module per family (gpt2, gpt_neox, llama: Llama, Mistral, Qwen2, Qwen3) with its parts
                     and its forward; defining the module's Architecture subclass registers it
    planning.py      which blocks each stage holds (balanced by parameter count) and which tracked layers: StageSpec
    stage.py         Stage (the forward/backward protocol, per-stage sums and scores), split_model
    loading.py       load_stage: one stage built from the checkpoint with only its own weights read
    merge.py         queries cut down to a stage's layers; stages' sums and scores merged back (float64)
    schedule.py      micro-batches, the one-forward-one-backward (1F1B) schedule, the LM head's sequence groups
    pipeline.py      ShardedPipeline: all stages in this process (tests, notebooks), and activation checkpointing
                     (ShardedPipeline.checkpointed: a stage per block, each recomputed at its backward), which
                     the fitting actors run with `whence fit --activation-checkpointing`

The names below are this package's public interface; import them from `whence.shards`.
"""

from whence.shards import families  # noqa: F401  (importing the families registers them)
from whence.shards.architecture import ARCHITECTURES, MODEL_TYPES, Architecture, architecture_of
from whence.shards.families.llama import FULL_ATTENTION, SLIDING_ATTENTION
from whence.shards.loading import LoadedStage, load_stage
from whence.shards.merge import (
    concat_scores,
    merge_corrections,
    merge_covariance,
    merge_products,
    merge_scores,
    select_layers,
    sum_coefficients,
)
from whence.shards.pipeline import ShardedPipeline
from whence.shards.planning import StageSpec, balance_blocks, parameter_count, plan_stages, stage_specs
from whence.shards.schedule import (
    BACKWARD,
    FORWARD,
    pipeline_micro_batch,
    pipeline_schedule,
    split_batch,
    stage_order,
)
from whence.shards.stage import (
    BATCH_KEYS,
    HIDDEN_STATES,
    OBJECTIVE,
    OBJECTIVES,
    MicroBatchLost,
    Stage,
    StageStatistics,
    split_model,
)

__all__ = [
    "ARCHITECTURES", "MODEL_TYPES", "Architecture", "architecture_of", "FULL_ATTENTION", "SLIDING_ATTENTION",
    "concat_scores", "merge_corrections", "merge_covariance", "merge_products", "merge_scores", "select_layers",
    "sum_coefficients", "LoadedStage", "load_stage", "ShardedPipeline",
    "StageSpec", "balance_blocks", "parameter_count", "plan_stages", "stage_specs", "BACKWARD", "FORWARD",
    "pipeline_micro_batch", "pipeline_schedule", "split_batch", "stage_order", "BATCH_KEYS", "HIDDEN_STATES", "OBJECTIVE", "OBJECTIVES",
    "MicroBatchLost", "Stage", "StageStatistics", "split_model",
]
