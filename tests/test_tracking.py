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


def test_true_fisher_labels_follow_the_model_and_not_the_batching():
    """Sampled labels are distributed as softmax(logits) (chi-square over positions of known, skewed
    distributions), keep the data's tokens off-target, and depend on each sequence's seed alone."""
    from scipy.stats import chisquare

    task = LanguageModelingTask()
    vocab, positions = 6, 4001
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])).expand(3, positions, vocab).contiguous()
    batch = {"input_ids": torch.full((3, positions), 5), "target_mask": torch.ones(3, positions, dtype=torch.bool),
             "seeds": torch.tensor([11, 12, 13])}
    batch["target_mask"][2, 100:] = False
    labels = task.sample_labels(logits, batch)
    observed = torch.bincount(labels[:2, 1:].flatten(), minlength=vocab).double()
    assert observed[5] == 0  # a zero-probability token is never drawn
    expected = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) * observed.sum()
    assert chisquare(observed[:5].numpy(), expected.numpy()).pvalue > 1e-4
    assert (labels[2, 101:] == 5).all() and (labels[2, 1:100] != 5).all()  # the data's tokens off-target
    alone = task.sample_labels(logits[1:2], {k: v[1:2] for k, v in batch.items()})
    assert torch.equal(alone[0], labels[1])


def test_label_log_probs_equal_log_softmax_and_gradcheck():
    """The chunked log-probability (forward and backward) against torch.log_softmax, across chunk edges."""
    from whence import task as task_module

    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 11, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 7))
    previous = dict(task_module.LOG_PROB_CHUNK_ELEMENTS)
    task_module.LOG_PROB_CHUNK_ELEMENTS["cpu"] = 4 * 11  # 4 rows per chunk: 21 rows end in a partial chunk
    try:
        values = task_module.label_log_probs(logits, labels)
        expected = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
        torch.testing.assert_close(values, expected, atol=1e-12, rtol=1e-12)
        weights = torch.randn(3, 7, dtype=torch.float64)
        (grad,) = torch.autograd.grad((values * weights).sum(), logits)
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-12)
        bfloat16 = task_module.label_log_probs(logits.detach().to(torch.bfloat16), labels)
        assert bfloat16.dtype == torch.float32  # bfloat16 logits are reduced in float32
    finally:
        task_module.LOG_PROB_CHUNK_ELEMENTS.update(previous)
