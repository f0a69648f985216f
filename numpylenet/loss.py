"""Softmax cross-entropy: the loss of a classifier, fused with its gradient."""
from __future__ import annotations

import numpy as np

__all__ = ["softmax_cross_entropy", "log_softmax"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p[n, k] = z[n, k] - log sum_j exp(z[n, j]), computed stably.

    Subtracting the row maximum m first (log sum_j exp(z_j) = m + log sum_j exp(z_j - m)) keeps
    every exponent <= 0, so nothing overflows even for logits of size 1e4.

    Parameters
    ----------
    logits : ndarray, shape (N, K)

    Returns
    -------
    log_probs : ndarray, shape (N, K)
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    Forward, as ``nn.CrossEntropyLoss()`` (reduction "mean")::

        p = softmax(z)                      (N, K)
        L = -(1/N) sum_n log p[n, y_n]

    Backward: dL/dz = (p - onehot(y)) / N, since d(-log p_y)/dz_k = p_k - [k == y].

    Parameters
    ----------
    logits : ndarray, shape (N, K), float
    labels : ndarray, shape (N,), integers in [0, K)

    Returns
    -------
    loss : float
    grad_logits : ndarray, shape (N, K), same dtype as ``logits``
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if not np.issubdtype(logits.dtype, np.floating) or logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"softmax_cross_entropy expected float logits of shape (N, K) with N >= 1, "
                         f"got {logits.dtype} array of shape {logits.shape}")
    n, num_classes = logits.shape
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise ValueError(f"softmax_cross_entropy expected integer labels of shape ({n},), "
                         f"got {labels.dtype} array of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from "
                         f"{labels.min()} to {labels.max()}")
    log_probs = log_softmax(logits)
    rows = np.arange(n)
    loss = -log_probs[rows, labels].mean()
    grad_logits = np.exp(log_probs)           # p
    grad_logits[rows, labels] -= 1            # p - onehot(y)
    grad_logits /= n                          # the mean over the batch divides by N
    return float(loss), grad_logits
