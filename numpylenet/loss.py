"""Softmax cross-entropy: the loss of a classifier, fused with its gradient."""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["softmax_cross_entropy", "log_softmax", "check_targets"]


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


def check_targets(labels: np.ndarray, n: int, num_classes: int, label_smoothing: float) -> None:
    """ValueError unless ``labels`` are n >= 1 integers in [0, num_classes) and ``label_smoothing``
    lies in [0, 1] (TypeError unless it is a real number): what :func:`softmax_cross_entropy` (and the numba backend's loss) accepts."""
    if n == 0:
        raise ValueError("the loss needs at least one image (N >= 1): a mean over none is undefined")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise ValueError(f"softmax_cross_entropy expected integer labels of shape ({n},), "
                         f"got {labels.dtype} array of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from "
                         f"{labels.min()} to {labels.max()}")
    # A bool or a string would pass or fail the range test below by accident of Python's ordering.
    if isinstance(label_smoothing, (bool, np.bool_)) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a real number, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray, *,
                          label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    Forward, as ``nn.CrossEntropyLoss(label_smoothing=eps)`` (reduction "mean")::

        p = softmax(z)                      (N, K)
        q = (1 - eps) onehot(y) + eps / K   (N, K) the target: mostly the label, a little of each class
        L = -(1/N) sum_n sum_k q[n, k] log p[n, k]
          = -(1/N) sum_n [(1 - eps) log p[n, y_n] + (eps / K) sum_k log p[n, k]]

    Backward: dL/dz = (p - q) / N, since d(-sum_k q_k log p_k)/dz_j = p_j sum_k q_k - q_j and the
    q_k sum to 1. With eps = 0 (the default) that is (p - onehot(y)) / N.

    Smoothing keeps the logits from growing without bound to drive the loss to 0: the best a
    model can do is p = q, a confident but finite answer.

    Numba counterpart: ``kernels.cross_entropy_rows``, on each thread's rows of the batch in a
    training step, writing the gradient into the numba backend's work buffers (see
    :meth:`numpylenet.LeNet5.forward_backward` and ``kernels.loss_images``).

    Parameters
    ----------
    logits : ndarray, shape (N, K), float
    labels : ndarray, shape (N,), integers in [0, K)
    label_smoothing : float in [0, 1], eps above

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
    check_targets(labels, n, num_classes, label_smoothing)
    log_probs = log_softmax(logits)
    rows = np.arange(n)
    loss = -(1 - label_smoothing) * log_probs[rows, labels].mean()
    grad_logits = np.exp(log_probs)           # p
    grad_logits[rows, labels] -= 1 - label_smoothing
    if label_smoothing:
        loss -= label_smoothing / num_classes * log_probs.sum(axis=1).mean()
        grad_logits -= label_smoothing / num_classes          # p - q
    grad_logits /= n                          # the mean over the batch divides by N
    return float(loss), grad_logits
