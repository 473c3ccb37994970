"""A pipeline stage read alone from the checkpoint (whence.shards.load_stage) equals the stage cut from the whole
model, bit for bit: parameters, buffers (rotary inv_freq, computed, not stored), tied embeddings, the forward pass
chained over the stages, and the model fingerprint hashed from the checkpoint. Checkpoints it cannot read part by
part fall back to the whole model. No Ray: load_stage is what StageActor runs.
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.tiny import TEXTS, make_model
from whence.api import sequence_batches
from whence.errors import NonFiniteError
from whence.model import find_tracked_layers, load_causal_lm, model_fingerprint
from whence.shards import OBJECTIVE, load_stage, split_model
from whence.shards.loading import load_stage_only
from whence.skeleton import PartialLoadUnsupported, model_skeleton
from whence.task import LanguageModelingTask
from whence.text import iter_sequences

# tests.tiny's families, a Llama whose LM head is its token embeddings (GPT-2's is tied to wte by default) and a
# tied Qwen2 with per-block sliding-window attention (the Llama family's stages serve it).
MODELS = ("gpt2", "llama", "neox", "llama-tied", "qwen2-tied")
FLOAT64 = dict(atol=1e-10, rtol=1e-9)


def tiny_causal_lm(name: str, vocab_size: int, layers: int = 3, hidden: int = 16):
    """A float64 model of MODELS: tests.tiny's for its families."""
    if name not in ("llama-tied", "qwen2-tied"):
        return make_model(name, vocab_size, hidden=hidden, layers=layers)
    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0)
    if name == "llama-tied":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, sliding_window=4, use_sliding_window=True, max_window_layers=1))
    return model.to(torch.float64).eval()


def save_model(model, tokenizer, directory, **options):
    model.save_pretrained(directory, **options)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """name -> a saved tiny float64 model of 3 blocks (one model.safetensors)."""
    root = tmp_path_factory.mktemp("stage_loading")
    return {name: save_model(tiny_causal_lm(name, len(tokenizer)), tokenizer, root / name) for name in MODELS}


def whole_model_stages(model_dir: str, num_stages: int, dtype=torch.float64):
    """(the stages split_model cuts from load_causal_lm's model, that model's fingerprint): the reference."""
    model, _ = load_causal_lm(model_dir, device="cpu", dtype=dtype)
    return split_model(model, num_stages, find_tracked_layers(model, "mlp")), model_fingerprint(model)


def assert_same_tensors(actual: dict, expected: dict, what: str):
    assert list(actual) == list(expected), what
    for name, tensor in expected.items():
        assert actual[name].device.type == "cpu" and actual[name].dtype == tensor.dtype, f"{what} {name}"
        assert torch.equal(actual[name], tensor), f"{what} {name} differs"


def assert_same_stage(stage, reference):
    assert (stage.index, stage.block_range, stage.positions) == (reference.index, reference.block_range,
                                                                 reference.positions)
    assert [layer.name for layer in stage.layers] == [layer.name for layer in reference.layers]
    assert_same_tensors(dict(stage.parts.named_parameters()), dict(reference.parts.named_parameters()), "parameter")
    assert_same_tensors(dict(stage.parts.named_buffers()), dict(reference.parts.named_buffers()), "buffer")


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("name", MODELS)
def test_a_stage_read_alone_equals_the_stage_cut_from_the_whole_model(model_dirs, name, num_stages):
    model, _ = load_causal_lm(model_dirs[name], device="cpu", dtype=torch.float64)
    model_layers = [layer.describe() for layer in find_tracked_layers(model, "mlp")]
    references, fingerprint = whole_model_stages(model_dirs[name], num_stages)
    for reference in references:
        loaded = load_stage_only(model_dirs[name], reference.index, num_stages, "mlp", torch.float64)
        assert not loaded.whole_model_loaded
        assert_same_stage(loaded.stage, reference)  # rotary inv_freq too: computed, as from_pretrained computes it
        assert loaded.fingerprint == fingerprint
        assert loaded.model_layers == model_layers


@pytest.mark.parametrize("name", ["gpt2", "llama-tied", "qwen2-tied"])
def test_tied_embeddings_stay_one_tensor_on_a_single_stage(model_dirs, name):
    stage = load_stage_only(model_dirs[name], 0, 1, "mlp", torch.float64).stage
    assert stage.parts["head"].weight is stage.parts["embed"].weight
    (reference,), _ = whole_model_stages(model_dirs[name], 1)
    assert_same_stage(stage, reference)


def chained_log_likelihood(stages, batch) -> torch.Tensor:
    """(B,) log p(m) of each sequence, the batch passed forward through the stages in turn."""
    outputs = batch
    for stage in stages:
        outputs = stage.forward(0, outputs, objective="log_likelihood")
        stage.discard()
    return outputs[OBJECTIVE]


@pytest.mark.parametrize("name", MODELS)
def test_stages_read_alone_chained_give_the_whole_models_forward(model_dirs, tokenizer, name):
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS), 12))
    batches = [batch for _, batch in sequence_batches(tokenizer, sequences, 5)]
    assert any((batch["attention_mask"] == 0).any() for batch in batches), "some batches should be padded"
    model, _ = load_causal_lm(model_dirs[name], device="cpu", dtype=torch.float64)
    task = LanguageModelingTask()
    for num_stages in (2, 3):
        stages = [load_stage(model_dirs[name], k, num_stages, dtype=torch.float64).stage for k in range(num_stages)]
        references, _ = whole_model_stages(model_dirs[name], num_stages)
        for batch in batches:
            actual = chained_log_likelihood(stages, batch)
            assert torch.equal(actual, chained_log_likelihood(references, batch))
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            torch.testing.assert_close(actual, task.sequence_log_likelihood(logits, batch), **FLOAT64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_streamed_fingerprint_is_model_fingerprint_in_every_load_dtype(model_dirs, dtype):
    """Weights cast to float32 or bfloat16 as they load; the fingerprint hashes what the loaded model holds."""
    for name in ("llama-tied", "neox"):
        references, fingerprint = whole_model_stages(model_dirs[name], 2, dtype)
        loaded = load_stage_only(model_dirs[name], 1, 2, "mlp", dtype)
        assert loaded.fingerprint == fingerprint
        assert_same_stage(loaded.stage, references[1])


def test_float64_weights_that_are_not_float32_values_are_hashed_as_float64(tmp_path, tokenizer):
    """model_fingerprint hashes a float64 tensor as float32 only when float32 holds it exactly (tests.tiny's
    weights are float32 values cast up); nudged off float32 here, it differs between float64 and float32 loads."""
    model = tiny_causal_lm("llama", len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1e-12)
    model_dir = save_model(model, tokenizer, tmp_path)
    fingerprints = {}
    for dtype in (torch.float64, torch.float32):
        _, fingerprints[dtype] = whole_model_stages(model_dir, 2, dtype)
        assert load_stage_only(model_dir, 0, 2, "mlp", dtype).fingerprint == fingerprints[dtype]
    assert fingerprints[torch.float64] != fingerprints[torch.float32]


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path, tokenizer):
    model = tiny_causal_lm("llama-tied", len(tokenizer), layers=4)
    model_dir = save_model(model, tokenizer, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    references, fingerprint = whole_model_stages(model_dir, 3)
    for reference in references:
        loaded = load_stage_only(model_dir, reference.index, 3, "mlp", torch.float64)
        assert_same_stage(loaded.stage, reference)
        assert loaded.fingerprint == fingerprint


def test_a_bin_checkpoint_falls_back_to_the_whole_model_logged_once(tmp_path, tokenizer, caplog):
    model = tiny_causal_lm("llama", len(tokenizer))
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(PartialLoadUnsupported, match="no safetensors weights"):
        model_skeleton(str(tmp_path), torch.float64)
    references, fingerprint = whole_model_stages(str(tmp_path), 2)
    with caplog.at_level(logging.WARNING, logger="whence.shards.loading"):
        loaded = [load_stage(str(tmp_path), k, 2, dtype=torch.float64) for k in range(2)]
    assert all(stage.whole_model_loaded and stage.fingerprint == fingerprint for stage in loaded)
    for stage, reference in zip(loaded, references):
        assert_same_stage(stage.stage, reference)
    warnings = [r for r in caplog.records if "loading the whole model" in r.getMessage()]
    assert len(warnings) == 1 and "no safetensors weights" in warnings[0].getMessage()


def test_a_checkpoint_without_a_weight_is_not_read_part_by_part(tmp_path, tokenizer):
    """from_pretrained would initialise the missing weight at random: no stage (or fingerprint) can match it."""
    model = tiny_causal_lm("llama", len(tokenizer))
    save_model(model, tokenizer, tmp_path)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(PartialLoadUnsupported, match="model.layers.1.mlp.up_proj.weight"):
        model_skeleton(str(tmp_path), torch.float64)


# The peak resident memory of building stage 0 of 4 of an 8-block, width-512 Llama (136 MiB of float32 weights,
# 42 MiB of them on stage 0), each way in a fresh process.
PEAK_SCRIPT = """
import sys, torch
from actors.owner import peak_rss, reset_peak_rss
from whence.shards.loading import load_stage_from_whole_model, load_stage_only
load = {"whole": load_stage_from_whole_model, "alone": load_stage_only}[sys.argv[2]]
import transformers.models.llama.modeling_llama  # imported before the baseline: both ways use it
reset_peak_rss()
baseline = peak_rss()
loaded = load(sys.argv[1], 0, 4, "mlp", torch.float32)
weights = sum(p.numel() * p.element_size() for p in loaded.stage.parts.parameters())
print(peak_rss() - baseline, weights)
"""


@pytest.mark.slow
def test_a_stage_read_alone_peaks_below_the_whole_model_load(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_dir = save_model(model, tokenizer, tmp_path / "model")
    del model
    peaks = {}
    for way in ("whole", "alone"):
        result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, model_dir, way], capture_output=True, text=True,
                                check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        peaks[way], stage_bytes = map(int, result.stdout.split()[-2:])
    print(f"whole model {whole_bytes / 2**20:.0f} MiB, stage 0 of 4 {stage_bytes / 2**20:.0f} MiB; peak above "
          f"baseline: whole-model load {peaks['whole'] / 2**20:.0f} MiB, stage alone {peaks['alone'] / 2**20:.0f} MiB")
    # Both ways build the same stage (its weights and its float64 covariance and Lambda sums, 157 MiB): reading it
    # alone saves about the other stages' weights (measured: 230 MiB against 321 MiB, 42 of 136 MiB of weights).
    assert peaks["whole"] - peaks["alone"] > 0.5 * (whole_bytes - stage_bytes)


def test_a_non_finite_weight_of_the_stage_is_named_as_in_the_model(tmp_path, tokenizer):
    model = tiny_causal_lm("llama", len(tokenizer))
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    model_dir = save_model(model, tokenizer, tmp_path)
    load_stage_only(model_dir, 0, 2, "mlp", torch.float64)  # stage 0 does not hold block 2
    with pytest.raises(NonFiniteError, match=r"model\.layers\.2\.mlp\.down_proj\.weight .* 1 NaN"):
        load_stage_only(model_dir, 1, 2, "mlp", torch.float64)
