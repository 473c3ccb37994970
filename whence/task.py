"""The task contract: how a training sequence's log-likelihood and a query's measurement are computed.

Everything Whence differentiates is a SUM of token log-probabilities over a batch's `target_mask`:
    training sequence m:  log p(m) = sum_{t in targets} log p(x_t | x_<t)      (t >= 2 in 1-based counting)
    query q:              f(q)     = log p(completion | prompt), the same sum over completion tokens
Scores are bilinear in the two gradients, so using log-likelihoods (not losses) for both fixes the sign: a
positive score means that adding m to the training data raises log p(completion | prompt).

For the Fisher, the labels of a training sequence are either the data's ("empirical") or sampled from the
model's own predictive distribution ("true", the default): G = E[g g^T] with g the gradient of log p(sampled).
Sampling uses one generator per sequence seeded from the batch's `seeds`, so factors do not depend on how
sequences are grouped into batches or workers.
"""

from __future__ import annotations

import torch

FISHER_MODES = ("true", "empirical")


# How many elements of the (B*T, V) logits the vocabulary-sized passes handle at once. On a CPU, a chunk small
# enough to stay in cache between the passes over it (16 rows of a 32k vocabulary: 2 MiB); on a GPU, where
# each chunk costs a few kernel launches, chunks as large as memory comfortably allows (256 MiB of float32).
LOG_PROB_CHUNK_ELEMENTS = {"cpu": 2**19, "gpu": 2**26}


def chunk_rows(device: torch.device, vocab: int) -> int:
    """Rows of `vocab` logits per chunk on `device`."""
    return max(1, LOG_PROB_CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "gpu"] // vocab)


class _LabelLogProbs(torch.autograd.Function):
    """log softmax(z)_y per position, with the vocabulary-sized work done in cache-sized chunks.

    torch.log_softmax followed by gather writes a (B, T, V) output in the forward pass, and its backward
    zero-fills a (B, T, V) buffer, scatters into it and runs the softmax backward over it: six passes over a
    tensor as large as the logits. Here the forward only reads z (max, then sum of exp), and the backward writes
    d/dz = g (onehot(y) - softmax(z)) once. On the medium benchmark model this is a tenth of a scoring pass.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Float32 at least: bfloat16 logits lose the small probabilities that matter here. float64 stays float64.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        flat = logits.reshape(-1, logits.shape[-1])  # (N, V), a view
        lse = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)  # (N,) log sum exp z
        step = chunk_rows(logits.device, flat.shape[1])
        for start in range(0, flat.shape[0], step):
            chunk = flat[start : start + step].to(dtype)
            peak = chunk.amax(dim=-1, keepdim=True)  # (n, 1): exp never overflows
            lse[start : start + step] = (chunk - peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
        picked = logits.gather(-1, labels[..., None]).squeeze(-1).to(dtype)  # (B, T) z_y
        ctx.save_for_backward(logits, labels, lse)
        return picked - lse.view(labels.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        weights = grad.reshape(-1, 1).to(lse.dtype)  # (N, 1)
        out = torch.empty_like(flat)  # (N, V) in the logits' dtype
        step = chunk_rows(logits.device, flat.shape[1])
        for start in range(0, flat.shape[0], step):
            end = start + step
            if out.dtype == lse.dtype:  # float32 and float64 logits: every pass in place in the output rows
                chunk = torch.sub(flat[start:end], lse[start:end, None], out=out[start:end])
                chunk.exp_().mul_(-weights[start:end])  # -g softmax(z)
            else:  # bfloat16 and float16 logits: reduced in float32, written back in their dtype
                chunk = flat[start:end].to(lse.dtype) - lse[start:end, None]
                out[start:end] = chunk.exp_().mul_(-weights[start:end])
        out.scatter_add_(-1, labels.reshape(-1, 1), weights.to(out.dtype))  # + g at the label
        return out.view_as(logits), None


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) log softmax(logits[b, t])[labels[b, t]] in float32 (float64 for float64 logits), differentiable
    in the logits."""
    if logits.device.type != "cpu":
        # On a GPU, torch's fused softmax kernels beat the chunked passes, which cost kernel launches.
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return log_probs.gather(-1, labels[..., None]).squeeze(-1)
    return _LabelLogProbs.apply(logits, labels)


class LanguageModelingTask:
    """Causal language modelling. Subclass and override to change what is measured."""

    def forward(self, model, batch: dict) -> torch.Tensor:
        """Logits (B, T, V)."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def token_log_probs(self, logits: torch.Tensor, labels: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log p(labels_t | x_<t), zero off-target. Position t is predicted by the logits at t - 1."""
        # All T positions go through label_log_probs (the last predicts nothing and is dropped below) rather
        # than logits[:, :-1]: that slice would copy the (B, T, V) logits.
        following = torch.nn.functional.pad(labels[:, 1:], (0, 1))  # (B, T): the token after each position
        picked = label_log_probs(logits, following)  # (B, T): log p(x_{t+1} | x_<=t)
        return torch.nn.functional.pad(picked[:, :-1], (1, 0)) * target_mask  # shift to the predicted position

    def sequence_log_likelihood(self, logits: torch.Tensor, batch: dict, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) log p(m) summed over target positions; labels default to the data's tokens."""
        labels = batch["input_ids"] if labels is None else labels
        return self.token_log_probs(logits, labels, batch["target_mask"]).sum(dim=1)

    def measurement(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """(B,) f(q) = log p(completion | prompt): the batch's target_mask marks the completion tokens."""
        return self.sequence_log_likelihood(logits, batch)

    @torch.no_grad()
    def sample_labels(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """(B, T) labels sampled from the model at target positions (the true Fisher); the data's elsewhere.

        Inverse-CDF sampling: per position a uniform u from a CPU generator seeded by batch["seeds"][b], and the
        first token whose cumulative (unnormalised) probability exceeds u times the total. A sequence gets the
        same labels whatever batch, worker or device it lands on (only the float32 cumulative sums' rounding
        differs between devices, which moves a sample with probability ~1e-7 per token), and it costs one
        cumulative sum over the vocabulary where torch.multinomial draws V exponential variates per position.
        """
        labels = batch["input_ids"].clone()
        seeds = batch.get("seeds")
        if seeds is None:
            raise ValueError("true-Fisher sampling needs batch['seeds'] (one int per sequence)")
        positions, vocab = labels.shape[1] - 1, logits.shape[-1]
        step = chunk_rows(logits.device, vocab)
        # Every row's uniforms drawn on the CPU, then moved in one copy (a copy per row would wait for the GPU's
        # queue each time); the seeds are read once for the same reason.
        uniforms = torch.stack([torch.rand(positions, 1, generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64) for seed in seeds.tolist()]).to(logits.device)
        for row in range(labels.shape[0]):
            sampled = torch.empty(positions, dtype=torch.long, device=logits.device)  # (T-1,)
            # Chunks of one row's positions (logits[row] is contiguous; logits[:, :-1] is not). exp(z - max)
            # needs no normalisation: u is scaled by the chunk rows' totals instead.
            for start in range(0, positions, step):
                end = min(start + step, positions)
                chunk = logits[row, start:end].float()  # (n, V)
                cumulative = (chunk - chunk.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)
                thresholds = (uniforms[row, start:end] * cumulative[:, -1:].double()).float()  # (n, 1)
                found = torch.searchsorted(cumulative, thresholds, right=True).squeeze(-1)  # first cdf > u
                sampled[start:end] = found.clamp_(max=vocab - 1)  # u * total rounding up to the total
            mask = batch["target_mask"][row, 1:]
            labels[row, 1:] = torch.where(mask, sampled, labels[row, 1:])
        return labels

    def fisher_objective(self, logits: torch.Tensor, batch: dict, fisher: str) -> torch.Tensor:
        """(B,) the per-sequence log-likelihood whose gradients' second moment is the Fisher."""
        if fisher == "true":
            return self.sequence_log_likelihood(logits, batch, self.sample_labels(logits, batch))
        if fisher == "empirical":
            return self.sequence_log_likelihood(logits, batch)
        raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")


def sequence_seed(seed: int, doc_id: str, chunk: int) -> int:
    """A stable 63-bit seed for one sequence's sampled labels, independent of batching and process."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}\x1f{doc_id}\x1f{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
