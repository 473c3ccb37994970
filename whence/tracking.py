"""Capture each tracked layer's per-token inputs a_t and output gradients s_t with module hooks.

For a linear layer y_t = W a_t, the gradient of a sequence's objective with respect to W is
    dW = sum_t s_t a_t^T,   s_t = d objective / d y_t   (d_out, d_in)
so (a, s) per token is all that covariances, eigenvalue corrections and scores need. We backpropagate to the
layers' outputs only: parameters are frozen while tracking, so autograd never computes a weight gradient.
Padded positions are zeroed in both a and s, so they contribute nothing.

Every capture is checked for NaN and inf (`check_finite_captures`): one reduction per layer and a single device
sync per batch. A bfloat16 forward pass that overflows, or a model with a non-finite weight, stops with a
NonFiniteError naming the layer and the batch rows instead of filling sums, factors or scores with NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from whence.errors import NonFiniteError
from whence.model import TrackedLayer


@dataclass
class LayerCapture:
    """One layer's view of a batch."""

    activations: torch.Tensor  # (B, T, d_in), bias column of ones appended, zero at padding
    output_grads: torch.Tensor  # (B, T, d_out), zero at padding

    def per_sequence_gradients(self) -> torch.Tensor:
        """(B, d_out, d_in): dW_b = sum_t s_bt a_bt^T, in the captured dtype."""
        return torch.bmm(self.output_grads.transpose(1, 2), self.activations)


@contextmanager
def frozen_parameters(model: torch.nn.Module):
    """Parameters stop requiring grad; the input embeddings' output requires it instead, so the graph reaches
    every block but autograd has no weight gradients to compute. Restored on exit."""
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    try:
        yield model
    finally:
        handle.remove()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(previous[name])


@contextmanager
def recorded_layers(layers: Sequence[TrackedLayer]):
    """Forward hooks on `layers` while the block runs: yields (inputs, outputs), two lists that the forward
    pass fills with each layer's input (detached) and output (in the graph); None for a layer not called."""
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    outputs: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(index: int):
        def hook(_module, args, output):
            inputs[index] = args[0].detach()
            outputs[index] = output

        return hook

    handles = [layer.module.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


def layer_capture(layer: TrackedLayer, a: torch.Tensor, s: torch.Tensor | None, out: torch.Tensor,
                  mask: torch.Tensor, padded: bool | None = None) -> LayerCapture:
    """One layer's (a, s) per token from its recorded input `a`, the gradient `s` at its output `out` (None: the
    layer does not influence the objective) and the batch's attention mask (B, T): bias column of ones appended
    to a, padding zeroed in both. padded: whether the mask has zeros, if the caller knows (reading it from a GPU
    waits for the GPU)."""
    mask = mask[..., None]  # (B, T, 1)
    if s is None:
        s = torch.zeros_like(out)
    a = a.reshape(mask.shape[0], mask.shape[1], -1)  # (B, T, d_in)
    if layer.has_bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    s = s.reshape(mask.shape[0], mask.shape[1], -1).detach()  # (B, T, d_out)
    # Masking is a pass over every captured tensor; a batch without padding (full-length windows, the usual
    # case) skips it, as multiplying by ones changes nothing.
    if not (padded if padded is not None else not bool(mask.all())):
        return LayerCapture(a, s)
    return LayerCapture(a * mask.to(a.dtype), s * mask.to(s.dtype))


class LayerTracker:
    """Hooks on the tracked layers; `capture` runs one batch and returns a LayerCapture per layer."""

    def __init__(self, layers: Sequence[TrackedLayer]):
        self.layers = list(layers)

    def capture(
        self,
        model: torch.nn.Module,
        batch: dict,
        objective: Callable[[torch.Tensor, dict], torch.Tensor],
        forward: Callable[[torch.nn.Module, dict], torch.Tensor],
    ) -> list[LayerCapture]:
        """Forward `batch`, backpropagate sum_b objective(logits, batch)[b] to the tracked layers' outputs.

        Sequences in a batch do not interact, so the gradient of the sum at sequence b's tokens is the gradient
        of sequence b's own objective.
        """
        with recorded_layers(self.layers) as (inputs, outputs):
            with frozen_parameters(model), torch.enable_grad():
                logits = forward(model, batch)
                total = objective(logits, batch).sum()
                missing = [self.layers[i].name for i, out in enumerate(outputs) if out is None]
                if missing:
                    raise RuntimeError(f"tracked layers not called in the forward pass: {', '.join(missing)}")
                grads = torch.autograd.grad(total, outputs, allow_unused=True)
        mask = batch["attention_mask"].to(inputs[0].device)  # (B, T)
        padded = not bool(mask.all())
        grads, captures = list(grads), []
        for i, layer in enumerate(self.layers):
            captures.append(layer_capture(layer, inputs[i], grads[i], outputs[i], mask, padded))
            # A padded batch's captures are masked copies: drop each layer's originals as soon as its copy
            # exists, so the batch never holds two copies of every layer's (B, T, d_in + d_out) (measured: a
            # third of a SmolLM2-shaped fitting actor's peak).
            inputs[i] = grads[i] = outputs[i] = None
        check_finite_captures(self.layers, captures)
        return captures


def check_finite_captures(layers: Sequence[TrackedLayer], captures: Sequence[LayerCapture]) -> None:
    """NonFiniteError naming where NaN or inf first appears, and the batch rows where it does (`rows`; callers
    that know the sequences name them with NonFiniteError.naming): the first layer, in forward order, whose
    activations hold one, else the last whose output gradients do (where the backward pass went wrong)."""
    if not captures:  # a pipeline stage without tracked layers
        return
    # A tensor's sum is finite only if every value is (inf or NaN anywhere makes it inf or NaN), and one summing
    # pass costs a fraction of isfinite's mask (measured: the masks were 9% of an index build's time). A sum
    # can also overflow from finite values; the exact check below then decides.
    sums = torch.stack([torch.stack([c.activations.sum(), c.output_grads.sum()]) for c in captures])  # (L, 2)
    if bool(torch.isfinite(sums).all()):
        return
    finite = torch.stack([torch.stack([torch.isfinite(c.activations).all(), torch.isfinite(c.output_grads).all()])
                          for c in captures])  # (L, 2) on the captures' device: one sync below
    if bool(finite.all()):
        return
    finite = finite.cpu()
    bad_activations = torch.nonzero(~finite[:, 0]).flatten().tolist()
    index = bad_activations[0] if bad_activations else torch.nonzero(~finite[:, 1]).flatten().tolist()[-1]
    where = "activations" if bad_activations else "output gradients"
    values = captures[index].activations if bad_activations else captures[index].output_grads
    rows = torch.nonzero(~torch.isfinite(values).flatten(1).all(dim=1)).flatten().tolist()  # batch rows
    raise NonFiniteError(
        f"NaN or inf in the {where} of layer {layers[index].name} (batch rows {rows[:8]}): a non-finite weight, "
        "or a forward pass that overflows its dtype (bfloat16: try --dtype float32)", layer=layers[index].name,
        rows=rows)
