"""How much memory each process of a fit will need at its peak: pure arithmetic over layer shapes and settings.

Bytes per process (flows.memory_check compares them with the cluster's memory before any work). N = B T tokens
of a batch, V the vocabulary, C = sum_l layer_sum_bytes (every tracked layer's float64 A and S blocks, packed):

    driver          DRIVER_BASELINE (Python, torch, Ray, Ray Data's executor: plans, counts and ObjectRefs only)
                    + CHECK_COPIES chunks of a tensor (whence.model.check_finite_checkpoint reads the checkpoint a
                    chunk at a time)
    fitting actor   ACTOR_BASELINE + its tokenizer (TOKENIZER_BYTES_PER_TOKEN x V) + the model's weights + the
                    largest of its phases:
      covariance    C (its partial sums, float64) + a batch's step
      finish        what is left of C + the parts it exports to other owners (object store, C (W - 1) / W)
                    + one reduced layer + eigh's copies of its largest block (normalised, symmetrised,
                    eigenvectors, workspace: 4 x 8 d^2)
      correction    every layer's bases in the compute dtype (the object store's pages, which the actor reads in
                    place) + the Lambda sums (float64, d_out d_in per layer) + a batch's step + one layer's rotations
                    (B, d_out, d_in) and rotated captures (N (d_in + d_out)), compute dtype
      step          the logits (N, V) that the log-likelihood saves and their gradient, model dtype: LOGIT_COPIES N V
                    (with the LM head run a group of sequences at a time, as pipeline stages and checkpointed actors
                    do: one group's (g T, V))
                    + the autograd graph and the captures: GRAPH_FACTOR x N sum_l (d_in + d_out), model dtype;
                    with activation checkpointing (one stage per block, each rebuilt at its backward) one block's
                    share of that graph, plus the hidden states entering every block and the gradient passed
                    back: (blocks + 1) N H
    pipeline (--shards N): each stage owns its layers' sums and finishes them, as a fitting actor over those
                    layers holding its own blocks' weights (the stages planned as whence.shards.planning plans
                    them, balanced by parameters), whose step is the micro-batches it keeps at once (N - k of B / N sequences on stage k; logits on the
                    last stage only); the pipeline's worker process holds no sums and no bases (each stage fetches
                    its layers' from the object store: actors.stage.StageActor.fetch_bases).

The constants are measured on CPU (SmolLM2-135M's layer shapes at 6 and 12 blocks, batch 8 x 256 tokens:
tests/test_memory_estimate.py checks the step against a measured peak; `whence bench --only memory` prints the
estimate beside the peaks of whole fits, and `whence fit` records both in the factors manifest).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, replace

from whence.factors import block_slices
from whence.fit_plan import FLOAT64_BYTES, layer_sum_bytes, plan_owners
from whence.model import CHECK_CHUNK_BYTES
from whence.shards.schedule import head_group_sequences, pipeline_micro_batch

DRIVER_BASELINE = 450 * 2**20  # the driver before it reads the checkpoint: Python, torch, Ray, Ray Data
# Checking a checkpoint holds one chunk of a tensor, isfinite's copy of its magnitudes and its masks: measured
# +50 MiB with 16 MiB chunks of SmolLM2-135M's float32 tensors (the whole file mapped was +532 MiB).
CHECK_COPIES = 3
ACTOR_BASELINE = 540 * 2**20  # a fitting actor before its model: Python, torch, transformers, Ray (measured)
# The tokenizer each actor loads beside its model (a fast tokenizer's vocabulary, merges and caches): measured
# 150 MiB for SmolLM2's 49,152 tokens, about 3 KiB a token; 4 KiB keeps a margin.
TOKENIZER_BYTES_PER_TOKEN = 4 * 2**10
# The autograd graph of a batch (what the blocks save for the backward pass: norms' inputs, the attention's
# q, k, v and output, the MLP's pre-activations) plus the captured inputs and output gradients, per token, as a
# multiple of the tracked layers' sum_l (d_in + d_out). A Llama block with frozen weights saves about 8 d + 4 d_ff
# floats a token, and its three MLP layers have sum (d_in + d_out) = 3 (d + d_ff): 1.7 to 1.8 x; measured 100 MiB
# per SmolLM2-shaped block (d 576, d_ff 1536) at N = 2048 float32 tokens: 100 MiB / (2048 x 4 x 6336) = 2.0.
GRAPH_FACTOR = 2.0
# The (N, V) logits saved for the backward pass and their gradient (whence.task._LabelLogProbs), and what the
# vocabulary-sized steps around them leave: measured 953 MiB for 2 x 384 MiB (N = 2048, V = 49,152).
LOGIT_COPIES = 2.25
EIGH_COPIES = 4  # a block unpacked and normalised, eigh's copy of it, its eigenvectors and LAPACK's workspace, float64
# The correction pass's bases, in the compute dtype, count once in an actor's resident memory: the object store's
# pages, which the actor reads in place (actors.fitter.fetch_bases; stages too). Measured on the 30-block bench
# fit: the correction phase exceeds the covariance phase by the bases once, plus Lambda less the sums. (It was
# twice while glibc's arenas kept the freed copies resident, and stages were sent the bases as pickled tensors.)
BASES_COPIES = 1
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class FitShape:
    """What the estimate needs to know about a fit. layers: TrackedLayer.describe() dicts (name, d_out, d_in)."""

    layers: list[dict]
    parameters: int  # the model's parameter count
    vocab_size: int
    model_dtype: str = "float32"  # as loaded in the actors
    batch_size: int = 8
    seq_len: int = 512
    num_blocks: int = 1
    factor_dtype: str = "float64"
    workers: int = 1
    shards: int = 1
    largest_tensor_bytes: int = 0  # a local checkpoint's largest tensor, as stored (0: none to check)
    # With shards: each stage's tracked layers (names) and parameter count, as whence.shards.planning balances
    # the model (by parameters, so stage 0 with the embeddings holds fewer blocks); None: an even split of the
    # layers, each stage counting the whole model's weights.
    stages: tuple[tuple[tuple[str, ...], int], ...] | None = None
    _: KW_ONLY  # the fields below by keyword only: added later, a positional call would shift them silently
    checkpointing: bool = False  # activation checkpointing in the fitting actors
    # Pipeline stages (and checkpointed actors, which run one) apply the LM head a group of sequences at a time
    # (whence.shards.stage.head_group_sequences): their logits are one group's. Not so when the head is tracked,
    # which the estimate does not model (its factors would dwarf the logits anyway).
    head_in_groups: bool = False
    blocks: int = 0  # transformer blocks (for checkpointing: the tracked layers are spread over them)
    hidden: int = 0  # H, the width of the hidden states between blocks


@dataclass
class MemoryEstimate:
    """Peak bytes per process: the driver, each fitting actor (or pipeline worker), each stage (with shards)."""

    driver: int
    actors: list[int]
    stages: list[int] = field(default_factory=list)
    factors: int = 0  # bytes of the factors written

    @property
    def total(self) -> int:
        return self.driver + sum(self.actors) + sum(self.stages)

    @property
    def largest(self) -> int:
        return max([self.driver, *self.actors, *self.stages])

    def describe(self) -> str:
        stages = f"; stages {', '.join(map(_size, self.stages))}" if self.stages else ""
        return (f"driver {_size(self.driver)}; fitting actors {', '.join(map(_size, self.actors))}{stages}; total "
                f"{_size(self.total)} for {_size(self.factors)} of factors")


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _basis_bytes(layer: dict, num_blocks: int, element: int) -> int:
    """One layer's eigenvectors (blocks of Q_A and Q_S) in `element`-byte floats, and its eigenvalues."""
    squares = sum((s.stop - s.start) ** 2 for s in block_slices(layer["d_in"], num_blocks))
    squares += sum((s.stop - s.start) ** 2 for s in block_slices(layer["d_out"], num_blocks))
    return element * (squares + layer["d_in"] + layer["d_out"])


def _largest_block(layer: dict, num_blocks: int) -> int:
    return max(s.stop - s.start for d in (layer["d_in"], layer["d_out"]) for s in block_slices(d, num_blocks))


def _sum_bytes(layer: dict, num_blocks: int) -> int:
    return layer_sum_bytes(layer["d_out"], layer["d_in"], num_blocks)


def step_bytes(shape: FitShape) -> int:
    """One batch's forward and backward pass at its peak (the start of the backward pass): the logits and their
    gradient (N, V), and the graph with the captures, GRAPH_FACTOR x N sum_l (d_in + d_out), model dtype. With
    activation checkpointing the last block's graph is the only one alive beside the logits (the tracked layers
    taken as spread evenly over the blocks), and every block's input hidden states wait for their recomputation,
    with the gradient passed back between blocks: (blocks + 1) N H."""
    element = DTYPE_BYTES.get(shape.model_dtype, 4)
    tokens = shape.batch_size * shape.seq_len  # N
    logits = LOGIT_COPIES * tokens * shape.vocab_size * element
    graph = GRAPH_FACTOR * tokens * sum(layer["d_in"] + layer["d_out"] for layer in shape.layers) * element
    if shape.head_in_groups or shape.checkpointing:
        logits *= min(1.0, head_group_sequences(shape.seq_len, shape.vocab_size, element) / shape.batch_size)
    if shape.checkpointing and shape.blocks:
        # (blocks + 1) hidden states waiting and passed back, and the final norm's output with its gradient.
        boundaries = (shape.blocks + 3) * tokens * shape.hidden * element
        return int(logits + graph / shape.blocks + boundaries)
    return int(logits + graph)


def phase_bytes(shape: FitShape, owned: list[dict], weights: int) -> dict[str, int]:
    """Bytes beyond the baseline and weights of one fitting actor in each phase (weights 0: a pipeline's worker
    process, which runs no batches itself)."""
    compute = 8 if shape.model_dtype == "float64" else 4
    sums = sum(_sum_bytes(layer, shape.num_blocks) for layer in shape.layers)  # C
    step = step_bytes(shape) if weights else 0
    exported = sums * (shape.workers - 1) // shape.workers  # the other owners' layers, through the object store
    eigh = max((_sum_bytes(layer, shape.num_blocks) * min(shape.workers, 2)
                + EIGH_COPIES * FLOAT64_BYTES * _largest_block(layer, shape.num_blocks) ** 2 for layer in owned),
               default=0)
    bases = BASES_COPIES * sum(_basis_bytes(layer, shape.num_blocks, compute) for layer in shape.layers)
    lambdas = sum(FLOAT64_BYTES * layer["d_out"] * layer["d_in"] for layer in shape.layers)
    tokens = shape.batch_size * shape.seq_len
    rotations = max((compute * (2 * shape.batch_size * layer["d_out"] * layer["d_in"]
                                + tokens * (layer["d_in"] + layer["d_out"])) for layer in shape.layers), default=0)
    return {"covariance": sums + step, "finish": sums + exported + eigh,
            "correction": bases + lambdas + (step + rotations if weights else 0)}


def owner_peak(shape: FitShape, owned: list[dict], weights: int) -> int:
    """Peak bytes of one fitting actor (weights: its model's bytes; 0 for a pipeline's worker process)."""
    tokenizer = TOKENIZER_BYTES_PER_TOKEN * shape.vocab_size if weights else 0
    return ACTOR_BASELINE + tokenizer + weights + max(phase_bytes(shape, owned, weights).values())


def stage_peaks(shape: FitShape, weights: int) -> list[int]:
    """--shards N: each stage of a pipeline owns its tracked layers' sums: as a fitting actor over those layers
    with its own blocks' weights (a stage reads only those from the checkpoint: whence.shards.loading). Its step
    is that of the micro-batches it keeps at once: stage k holds N - k micro-batches of ceil(B / N) sequences
    (1F1B, whence.shards.pipeline_micro_batch), and only the last stage computes logits. The stages are
    shape.stages when known (whence.shards.planning's plan), else an even split of the layers, each stage
    counting the whole model's `weights`."""
    by_name = {layer["name"]: layer for layer in shape.layers}
    if shape.stages is not None:
        element = weights // max(shape.parameters, 1)
        plan = [([by_name[name] for name in names], parameters * element) for names, parameters in shape.stages]
    else:
        per_stage = -(-len(shape.layers) // shape.shards)
        plan = [(shape.layers[k * per_stage : (k + 1) * per_stage], weights) for k in range(shape.shards)]
    micro = pipeline_micro_batch(shape.batch_size, shape.shards)
    peaks = []
    for k, (own, held) in enumerate(plan):
        last = k == shape.shards - 1
        part = replace(shape, layers=own, batch_size=(shape.shards - k) * micro,
                       vocab_size=shape.vocab_size if last else 0, head_in_groups=True)
        peaks.append(ACTOR_BASELINE + held + max(phase_bytes(part, own, held).values()))
    return peaks


def driver_peak(shape: FitShape) -> int:
    """The driver: its baseline, and the chunk of a tensor whence.model.check_finite_checkpoint holds at a time
    with isfinite's temporaries (CHECK_COPIES)."""
    return DRIVER_BASELINE + CHECK_COPIES * min(shape.largest_tensor_bytes, CHECK_CHUNK_BYTES)


def estimate_fit(shape: FitShape) -> MemoryEstimate:
    """The peak of every process of the fit `shape` describes."""
    weights = shape.parameters * DTYPE_BYTES.get(shape.model_dtype, 4)
    owners = plan_owners(shape.layers, shape.workers, shape.num_blocks)
    by_name = {layer["name"]: layer for layer in shape.layers}
    stored = DTYPE_BYTES[shape.factor_dtype]
    factors = sum(_basis_bytes(layer, shape.num_blocks, stored) + stored * layer["d_out"] * layer["d_in"]
                  for layer in shape.layers)
    if shape.shards > 1:
        # A pipeline's worker process holds no sums and no bases: its stages fetch theirs from the object store.
        worker = ACTOR_BASELINE + TOKENIZER_BYTES_PER_TOKEN * shape.vocab_size
        return MemoryEstimate(driver_peak(shape), [worker] * shape.workers, stage_peaks(shape, weights) * shape.workers,
                              factors)
    actors = [owner_peak(shape, [by_name[n] for n in names], weights) for names in owners]
    return MemoryEstimate(driver_peak(shape), actors, [], factors)
