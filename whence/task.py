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


class LanguageModelingTask:
    """Causal language modelling. Subclass and override to change what is measured."""

    def forward(self, model, batch: dict) -> torch.Tensor:
        """Logits (B, T, V)."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def token_log_probs(self, logits: torch.Tensor, labels: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log p(labels_t | x_<t), zero off-target. Position t is predicted by the logits at t - 1."""
        # log_softmax in float32 at least: bfloat16 logits lose the small probabilities that matter here.
        # It runs over all T positions (the last one predicts nothing and is dropped below) rather than on
        # logits[:, :-1]: that slice would copy the (B, T, V) logits, and its backward would allocate, zero and
        # fill another (B, T, V) buffer; the vocabulary-sized passes cost as much as the output layer's matmuls.
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        following = torch.nn.functional.pad(labels[:, 1:], (0, 1))  # (B, T): the token after each position
        picked = log_probs.gather(-1, following[..., None]).squeeze(-1)  # (B, T): log p(x_{t+1} | x_<=t)
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

        One torch.Generator per sequence, seeded by batch["seeds"][b], so a sequence gets the same labels
        whatever batch or worker it lands in.
        """
        labels = batch["input_ids"].clone()
        seeds = batch.get("seeds")
        if seeds is None:
            raise ValueError("true-Fisher sampling needs batch['seeds'] (one int per sequence)")
        for row in range(labels.shape[0]):
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(int(seeds[row]))
            # One row at a time: logits[row, :-1] is contiguous where logits[:, :-1] is not, so softmax reads it
            # in place instead of copying all (B, T-1, V) logits first, and memory stays at one (T-1, V) row.
            probs = torch.softmax(logits[row, :-1].float(), dim=-1)  # (T-1, V)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (T-1,)
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
