"""whence.memory_estimate against measured memory: one batch of the covariance pass, in this process (no Ray).

The estimate of a fitting actor's covariance phase is its float64 sums plus one batch's step (the logits and
their gradient, the autograd graph and the captures). We measure the rise of this process's peak resident memory
(Linux: the kernel's high-water mark, reset before the batch) over one covariance step of a Llama with MLP
shapes large enough for the step to dwarf allocator noise, and check the estimate against it, and that doubling
the blocks or the vocabulary moves the estimate as it moves the measurement; likewise a pipeline stage's part of a
batch (its micro-batches in 1F1B order) against the estimate's stage step. Each measurement runs in a fresh process.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from actors.owner import peak_rss, release_free_memory, reset_peak_rss
from tests.tiny import make_model
from whence.fitting import FactorFitter
from whence.memory_estimate import (
    ACTOR_BASELINE,
    CHECK_COPIES,
    TOKENIZER_BYTES_PER_TOKEN,
    FitShape,
    estimate_fit,
    phase_bytes,
    step_bytes,
)
from whence.model import CHECK_CHUNK_BYTES, find_tracked_layers
from whence.shards import ShardedPipeline
from whence.text import collate

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux")

ESTIMATE_TOLERANCE = 0.25  # |estimate - measured| <= 25% of measured
LOWEST_RATIO = 0.8  # the estimate may overshoot, never undershoot by more than this
HIDDEN, BATCH, SEQ_LEN = 256, 8, 256  # 2048 tokens a batch: the step is hundreds of MiB


def shape_of(model, layers, vocab: int) -> FitShape:
    return FitShape([layer.describe() for layer in layers], sum(p.numel() for p in model.parameters()), vocab,
                    "float32", BATCH, SEQ_LEN)


def random_batch(vocab: int) -> dict:
    """BATCH sequences of SEQ_LEN random tokens, with true-Fisher seeds, as whence.text.collate makes them."""
    generator = torch.Generator().manual_seed(0)
    batch = collate([torch.randint(0, vocab, (SEQ_LEN,), generator=generator).tolist() for _ in range(BATCH)], 0)
    batch["seeds"] = torch.arange(BATCH)
    return batch


def start_measuring() -> int:
    """Reset this process's peak resident memory and return it (skip where the kernel cannot reset it)."""
    release_free_memory()  # what earlier steps freed would otherwise absorb the measured step's allocations
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    return peak_rss()


def measured_covariance_step(blocks: int, vocab: int, checkpointing: bool = False) -> tuple[int, int]:
    """(measured, estimated) bytes above the loaded model of one covariance step of a float32 Llama (with
    activation checkpointing: one stage per block, each recomputed at its backward, as a checkpointed actor)."""
    model = make_model("llama", vocab, hidden=HIDDEN, layers=blocks, context=SEQ_LEN, dtype=torch.float32)
    layers = find_tracked_layers(model, "mlp")
    batch = random_batch(vocab)
    shape = shape_of(model, layers, vocab)
    if not checkpointing:
        fitter = FactorFitter(model, layers, "true")
        before = start_measuring()
        fitter.covariance_step(batch)
        return peak_rss() - before, phase_bytes(shape, [], weights=1)["covariance"]
    # Each stage allocates its sums at its first micro-batch, after the last stage's logits (the step's peak)
    # are gone: a first step puts every stage's sums in place, the second is measured against the step alone.
    fitter = ShardedPipeline.checkpointed(model, layers)
    fitter.covariance_step(batch)
    before = start_measuring()
    fitter.covariance_step(batch)
    return peak_rss() - before, step_bytes(dataclasses.replace(shape, checkpointing=True, blocks=blocks,
                                                               hidden=HIDDEN))


SHAPES = ((4, 16384), (8, 16384), (4, 32768))  # (blocks, vocabulary)


def measure_in_this_process(blocks: int, vocab: int, checkpointing: int = 0) -> tuple[int, int]:
    torch.set_num_threads(1)
    measured_covariance_step(1, 1024, bool(checkpointing))  # warm-up: torch's first calls allocate caches once
    return measured_covariance_step(blocks, vocab, bool(checkpointing))


def measured_stage_step(blocks: int, vocab: int, index: int, shards: int = 2) -> tuple[int, int]:
    """(measured, estimated) bytes above the loaded model of stage `index`'s part of one covariance batch: its
    micro-batches in the stage's 1F1B order (whence.shards.schedule.stage_order), the hidden states and their
    gradients from the neighbouring stages random, as a stage actor receives them."""
    from whence.shards import split_model
    from whence.shards.schedule import FORWARD, pipeline_micro_batch, split_batch, stage_order

    model = make_model("llama", vocab, hidden=HIDDEN, layers=blocks, context=SEQ_LEN, dtype=torch.float32)
    stage = split_model(model, shards, find_tracked_layers(model, "mlp"))[index]
    micro = split_batch(random_batch(vocab), pipeline_micro_batch(BATCH, shards))
    hidden = lambda part: torch.randn(part["input_ids"].shape[0], SEQ_LEN, HIDDEN)  # noqa: E731
    before = start_measuring()
    for kind, i in stage_order(range(len(micro)), index, shards):
        if kind == FORWARD:
            stage.forward(i, micro[i] if stage.first else {**micro[i], "hidden_states": hidden(micro[i])})
        else:
            stage.backward(i, None if stage.last else {"hidden_states": hidden(micro[i])})
            stage.accumulate_covariance(i)
    measured = peak_rss() - before
    # As whence.memory_estimate.stage_peaks counts stage k: its layers, (shards - k) micro-batches' graphs at
    # once, the logits on the last stage only.
    part = FitShape([layer.describe() for layer in stage.layers], 1, vocab if stage.last else 0, "float32",
                    (shards - index) * len(micro[0]["input_ids"]), SEQ_LEN)
    return measured, phase_bytes(part, [], weights=1)["covariance"]


def stage_in_this_process(blocks: int, vocab: int, index: int) -> tuple[int, int]:
    torch.set_num_threads(1)
    measured_stage_step(2, 1024, 0)  # warm-up, as measure_in_this_process
    return measured_stage_step(blocks, vocab, index)


def in_fresh_process(function: str, *arguments: int) -> tuple[int, int]:
    """Run this module's `function(*arguments)` in a fresh Python process: in a process that has already run a
    step (an earlier shape, earlier tests), the freed blocks its allocator keeps absorb part of the next step's
    allocations by an amount that varies from run to run (seen: an 8-block step measured 15-30% low after a
    4-block one)."""
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = (f"import json; from tests.test_memory_estimate import {function}; "
             f"print(json.dumps({function}(*{list(arguments)})))")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        if "reset its peak RSS" in done.stdout + done.stderr:
            pytest.skip("this kernel does not let a process reset its peak RSS")
        raise AssertionError(done.stderr[-4000:])
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def steps():
    return {(blocks, vocab): in_fresh_process("measure_in_this_process", blocks, vocab) for blocks, vocab in SHAPES}


def test_the_covariance_step_estimate_is_within_a_quarter_of_the_measurement(steps):
    for (blocks, vocab), (measured, estimated) in steps.items():
        assert abs(estimated - measured) <= ESTIMATE_TOLERANCE * measured, (blocks, vocab, measured, estimated)
        assert estimated >= LOWEST_RATIO * measured


def test_the_estimate_grows_with_blocks_and_vocabulary_as_the_measurement_does(steps):
    base_measured, base_estimated = steps[(4, 16384)]
    for key in ((8, 16384), (4, 32768)):
        measured, estimated = steps[key]
        growth_measured, growth_estimated = measured - base_measured, estimated - base_estimated
        assert growth_measured > 0 and growth_estimated > 0
        assert abs(growth_estimated - growth_measured) <= 0.5 * growth_measured, (key, growth_measured,
                                                                                  growth_estimated)


def test_activation_checkpointing_holds_one_blocks_graph_as_estimated(steps):
    """A stage per block, each block's graph rebuilt at its backward: a step of 16 blocks holds one block's graph
    and captures beside the logits, as estimated, and less than a plain step of 8 blocks (every block's graph)."""
    measured, estimated = in_fresh_process("measure_in_this_process", 16, 16384, 1)
    assert abs(estimated - measured) <= ESTIMATE_TOLERANCE * measured, (measured, estimated)
    assert estimated >= LOWEST_RATIO * measured
    plain_measured, _ = steps[(8, 16384)]
    assert measured < plain_measured, (plain_measured, measured)


@pytest.mark.parametrize("blocks, vocab, index", [(8, 16384, 0), (4, 32768, 1)])
def test_a_pipeline_stage_step_is_estimated_as_measured(blocks, vocab, index):
    """Stage 0 (two micro-batches' graphs at once) and the last stage (its logits), as their actors run them."""
    measured, estimated = in_fresh_process("stage_in_this_process", blocks, vocab, index)
    assert abs(estimated - measured) <= ESTIMATE_TOLERANCE * measured, (blocks, vocab, index, measured, estimated)
    assert estimated >= LOWEST_RATIO * measured


def test_an_actor_needs_its_largest_phase_and_the_driver_the_checkpoint_it_checks():
    layers = [{"name": f"m.{i}", "d_out": 1536, "d_in": 576} for i in range(6)]
    shape = FitShape(layers, 10**8, 49152, batch_size=8, seq_len=256, largest_tensor_bytes=2**27)
    estimate = estimate_fit(shape)
    bigger = estimate_fit(FitShape(layers * 2, 10**8, 49152, batch_size=8, seq_len=256))
    # The checkpoint is checked a chunk at a time: its tensors' size counts up to a chunk, not the file's.
    assert estimate.driver - estimate_fit(FitShape(layers, 10**8, 49152)).driver == CHECK_COPIES * CHECK_CHUNK_BYTES
    small = estimate_fit(FitShape(layers, 10**8, 49152, largest_tensor_bytes=2**20))
    assert small.driver - estimate_fit(FitShape(layers, 10**8, 49152)).driver == CHECK_COPIES * 2**20
    assert bigger.actors[0] > estimate.actors[0]
    phases = phase_bytes(shape, layers, weights=4 * 10**8)
    assert estimate.actors[0] == ACTOR_BASELINE + TOKENIZER_BYTES_PER_TOKEN * 49152 + 4 * 10**8 + max(phases.values())


def test_a_process_peak_is_its_own_not_its_parents():
    """A `whence fit` started from a large process (a notebook, `whence bench`) reports its own peak: getrusage's
    ru_maxrss in a child started by fork and exec holds the parent's resident size at the fork."""
    import os
    import subprocess

    held = torch.ones(2**27, dtype=torch.float64)  # 1 GiB resident in this process while the child starts
    child = "from actors.owner import peak_rss, reset_peak_rss; reset_peak_rss(); print(peak_rss())"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, env=env)
    del held
    assert int(done.stdout.split()[-1]) < 2**29, "the child's peak includes the parent's 1 GiB"


def test_with_shards_each_stage_is_estimated_with_the_layers_and_weights_it_loads(tmp_path):
    """The estimate's stages are whence.shards.planning's (balanced by parameters, so not an even split of the
    layers), each with the parameters its actor reads from the checkpoint (whence.shards.loading)."""
    from flows.cluster import ClusterSettings
    from flows.memory_check import fit_shape
    from tests.tiny import make_tokenizer
    from whence.config import FitConfig
    from whence.memory_estimate import stage_peaks
    from whence.shards.loading import load_stage

    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), hidden=32, layers=5, context=64, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    shape = fit_shape(str(tmp_path), "mlp", FitConfig(seq_len=32), ClusterSettings(shards=3))
    for k, (names, parameters) in enumerate(shape.stages):
        loaded = load_stage(str(tmp_path), k, 3, "mlp", torch.float32)
        assert list(names) == [layer.name for layer in loaded.stage.spec.layers]
        held = {id(p): p for p in loaded.stage.parts.parameters()}  # tied weights once
        assert parameters == sum(p.numel() for p in held.values())
    assert sum(parameters for _, parameters in shape.stages) == shape.parameters
    # Each stage counts its own weights, not the whole model's: the same layers with the whole model's weights
    # cost exactly the other stages' weights more.
    whole = dataclasses.replace(shape, stages=tuple((names, shape.parameters) for names, _ in shape.stages))
    for (_, parameters), own, every in zip(shape.stages, stage_peaks(shape, 4 * shape.parameters),
                                           stage_peaks(whole, 4 * shape.parameters)):
        assert every - own == 4 * (shape.parameters - parameters)


def test_a_fit_too_large_for_its_node_is_offered_activation_checkpointing(tmp_path):
    """fit_shape reads the blocks and width from the model's config; a fit whose batch's graph is what does not fit
    is offered --activation-checkpointing (and a family without stages is refused it before any actor starts)."""
    from flows.cluster import ClusterSettings
    from flows.memory_check import alternatives, fit_shape
    from tests.tiny import make_tokenizer
    from whence.config import FitConfig

    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), hidden=32, layers=6, context=64, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    shape = fit_shape(str(tmp_path), "mlp", FitConfig(seq_len=64, batch_size=4096), ClusterSettings())
    assert (shape.blocks, shape.hidden, shape.checkpointing) == (6, 32, False)
    plain = estimate_fit(shape)
    checkpointed = estimate_fit(dataclasses.replace(shape, checkpointing=True))
    assert checkpointed.largest < plain.largest
    room = (plain.largest + checkpointed.largest) // 2  # a node between the two
    assert "--activation-checkpointing" in alternatives(shape, room, room)
    assert "--activation-checkpointing" not in alternatives(dataclasses.replace(shape, shards=2), room, room)


def freed_blocks_left_resident(fixed_threshold: int) -> list[int]:
    """Bytes still resident after a process frees 192 tensors of 1 MiB (all but the last, which keeps the heap's
    top in use) that it allocated after freeing a 16 MiB tensor, with or without actors.hosting.map_large_blocks."""
    from actors.hosting import map_large_blocks

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    if fixed_threshold:
        assert map_large_blocks()
    torch.ones(2**22)  # 16 MiB, freed at once: glibc then raises a moving mmap threshold to 16 MiB
    before = resident()
    tensors = [torch.ones(2**18) for _ in range(192)]  # 1 MiB each, touched
    del tensors[:-1]
    return [resident() - before]


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="glibc's allocator")
def test_an_actor_hands_freed_tensors_back_to_the_system():
    """Without a fixed mmap threshold the freed 1 MiB blocks stay in glibc's heap (resident); with the actors'
    setting each is its own mapping, unmapped when freed (the fragmentation that made fitting actors peak 0.7 GiB
    above the same work in one process: actors.hosting.MMAP_THRESHOLD_BYTES)."""
    (moving,) = in_fresh_process("freed_blocks_left_resident", 0)
    (fixed,) = in_fresh_process("freed_blocks_left_resident", 1)
    assert moving > 128 * 2**20, f"glibc kept only {moving / 2**20:.0f} MiB: the check below would prove nothing"
    assert fixed < 16 * 2**20, f"{fixed / 2**20:.0f} MiB of freed tensors still resident"
