"""Hook-based per-sequence gradients equal per-example autograd gradients (float64, every family)."""

import torch

from tests.tiny import TEXTS
from whence.api import sequence_batches
from whence.model import find_tracked_layers
from whence.task import LanguageModelingTask
from whence.text import iter_sequences
from whence.tracking import LayerTracker

TOLERANCE = 1e-10


def autograd_gradient(model, layer, tokens, task):
    """d log p(m) / dW for one unpadded sequence, in the (d_out, d_in) + bias-column convention."""
    model.zero_grad()
    batch = {"input_ids": torch.tensor([tokens]), "attention_mask": torch.ones(1, len(tokens), dtype=torch.long),
             "target_mask": torch.ones(1, len(tokens), dtype=torch.bool)}
    batch["target_mask"][0, 0] = False
    logits = task.forward(model, batch)
    task.sequence_log_likelihood(logits, batch).sum().backward()
    weight = layer.module.weight.grad.t() if layer.transposed else layer.module.weight.grad
    if layer.has_bias:
        weight = torch.cat([weight, layer.module.bias.grad[:, None]], dim=1)
    return weight.clone()


def test_hook_gradients_equal_autograd(tiny_model, tokenizer):
    task = LanguageModelingTask()
    layers = find_tracked_layers(tiny_model, "all")
    # Sequences of different lengths in one batch: the shorter ones are padded.
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS[:4]), seq_len=24))[:5]
    (_, batch), = list(sequence_batches(tokenizer, sequences, batch_size=5))
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    captures = LayerTracker(layers).capture(tiny_model, batch, task.sequence_log_likelihood, task.forward)
    for layer, capture in zip(layers, captures):
        hooked = capture.per_sequence_gradients()
        for row, sequence in enumerate(sequences):
            expected = autograd_gradient(tiny_model, layer, list(sequence.input_ids), task)
            torch.testing.assert_close(hooked[row], expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_tracking_leaves_parameters_untouched(tiny_model, tokenizer):
    task = LanguageModelingTask()
    layers = find_tracked_layers(tiny_model, "mlp")
    sequences = list(iter_sequences(tokenizer, enumerate(TEXTS[:2]), seq_len=16))
    (_, batch), = list(sequence_batches(tokenizer, sequences, batch_size=len(sequences)))
    LayerTracker(layers).capture(tiny_model, batch, task.sequence_log_likelihood, task.forward)
    assert all(p.grad is None for p in tiny_model.parameters()), "scoring must not compute weight gradients"
    assert all(p.requires_grad for p in tiny_model.parameters()), "requires_grad is restored"
