"""What a score means: the first-order change of log p(completion | prompt), in nats, from one more copy.

The Fisher G (and the damped EK-FAC approximation of it) is averaged over the N fitting sequences, so it is the
Gauss-Newton Hessian of the MEAN training loss
    L(theta) = (1/N) sum_n l_n(theta),        l_n = -log p(m_n; theta).
Adding sequence m once more gives N + 1 sequences; the mean over them, (1/(N+1)) (sum_n l_n + l_m), has the same
minimiser as N L + l_m, that is as L + eps l_m with eps = 1/N. At the optimum theta* of L, the implicit
function theorem gives d theta*/d eps = -H^-1 grad l_m = H^-1 grad log p(m), so
    d f(q) / d eps = grad f(q)^T H^-1 grad log p(m) = I(q, m)          (the score, with H ~ G + damping)
and to first order the change of f(q) = log p(completion | prompt) is
    delta f(q) ~= eps I(q, m) = I(q, m) / N    nats.
A score of 4e4 with N = 1e6 fitting sequences thus predicts +0.04 nats (a 4% rise of p(completion | prompt)).
"""

from __future__ import annotations

import numpy as np


def predicted_change(scores, num_sequences: int):
    """Predicted change in nats of log p(completion | prompt) if each scored sequence were added once more to
    the N = `num_sequences` sequences the Fisher was averaged over: score / N (same shape as `scores`)."""
    if int(num_sequences) < 1:
        raise ValueError(f"the number of fitting sequences must be positive, got {num_sequences}")
    return np.asarray(scores, dtype=np.float64) / int(num_sequences)


def fitting_sequence_count(factors) -> int:
    """N, the number of sequences `factors` (whence.factors.Factors) averaged the Fisher over (its manifest's
    "sequences")."""
    count = factors.metadata.get("sequences")
    if not count:
        raise ValueError("these factors do not record how many sequences they were fitted on")
    return int(count)
