"""The PNG figures of a training run, drawn with matplotlib's object API on the Agg canvas.

Figures are built on ``matplotlib.figure.Figure`` directly rather than through ``pyplot``, so nothing
here needs a display, touches global plotting state, or depends on the user's chosen backend.
matplotlib is imported inside each function: ``--help`` and the tests that draw nothing stay fast.
Every figure is written atomically (:func:`numpylenet.files.atomic_write`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .files import atomic_write

__all__ = ["trace", "plot_learning_curves", "plot_predictions", "plot_confusion_matrix", "plot_conv1_filters"]


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: str | os.PathLike) -> None:
    """Write ``figure`` as a PNG to ``path``, atomically (WriteError if the storage refuses)."""
    with atomic_write(path) as file:
        figure.savefig(file, format="png", dpi=100)


def plot_learning_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss (train and validation) and validation accuracy against the epoch.

    ``history`` is the run's list of per-epoch records, each with ``epoch`` (1-based),
    ``train_loss``, ``valid_loss``, ``valid_accuracy`` (a fraction) and ``train_loss_trace`` (the
    training loss over equal runs of steps within the epoch, drawn as a thin line).
    """
    epochs = [record["epoch"] for record in history]
    figure = _new_figure(10, 4)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    trace_x, trace_y = trace(history)
    loss_axes.plot(trace_x, trace_y, "-", color="C0", alpha=0.4, linewidth=1, label="train (within epochs)")
    loss_axes.plot(epochs, [r["train_loss"] for r in history], "o-", color="C0", label="train (epoch mean)")
    loss_axes.plot(epochs, [r["valid_loss"] for r in history], "s-", color="C1", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="Loss")
    loss_axes.legend()
    accuracy_axes.plot(epochs, [100 * r["valid_accuracy"] for r in history], "s-", color="C1")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    _save(figure, path)


def trace(history: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The within-epoch training-loss trace of a run as (x, loss), x in epochs from 0 to the last.

    A point averaging the k-th of n equal runs of steps in epoch e sits at x = e - 1 + (k + 0.5) / n.
    """
    xs, ys = [], []
    for record in history:
        points = record.get("train_loss_trace", [])
        xs.extend(record["epoch"] - 1 + (k + 0.5) / len(points) for k in range(len(points)))
        ys.extend(points)
    return np.array(xs), np.array(ys)


def plot_predictions(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                     path: str | os.PathLike) -> None:
    """A 5x5 grid of test images titled with the prediction, as the notebook's last cell draws it.

    Wrong predictions get a red title "pred P (true T)" and a red frame.

    Parameters
    ----------
    images : ndarray, shape (25, H, W), the images as the model saw them
    labels, predictions : ndarray, shape (25,), integers
    """
    figure = _new_figure(8, 9)
    for axes, image, label, prediction in zip(figure.subplots(5, 5).ravel(), images, labels,
                                              predictions):
        axes.imshow(image, cmap="inferno")
        axes.set_xticks([])
        axes.set_yticks([])
        wrong = prediction != label
        axes.set_title(f"pred {prediction} (true {label})" if wrong else f"{prediction}",
                       color="red" if wrong else "black", fontsize=10)
        for spine in axes.spines.values():
            spine.set(visible=wrong, color="red", linewidth=3)
    errors = int(np.sum(predictions != labels))
    figure.suptitle(f"Test predictions: {len(labels) - errors} of {len(labels)} right "
                    f"(wrong ones in red)")
    _save(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
    """The confusion matrix as a heat map with every count written in its cell.

    ``matrix[true, predicted]`` counts the test images of class ``true`` predicted as ``predicted``.
    The colour scale is logarithmic so that the few errors stay visible beside the large diagonal.
    """
    from matplotlib.colors import LogNorm

    num_classes = matrix.shape[0]
    figure = _new_figure(7, 6)
    axes = figure.subplots()
    image = axes.imshow(np.maximum(matrix, 0.5), cmap="Blues", norm=LogNorm(vmin=0.5))
    figure.colorbar(image, ax=axes, label="images")
    for true in range(num_classes):
        for predicted in range(num_classes):
            count = int(matrix[true, predicted])
            if count:
                on_dark = count > np.sqrt(matrix.max())
                axes.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                          color="white" if on_dark else "black")
    axes.set(xticks=range(num_classes), yticks=range(num_classes), xlabel="predicted class",
             ylabel="true class", title=title or "Confusion matrix")
    _save(figure, path)


def plot_conv1_filters(weight: np.ndarray, path: str | os.PathLike) -> None:
    """The first convolution's filters, one 5x5 image each, on a shared grey scale centred at 0.

    ``weight`` has shape (out_channels, 1, kh, kw) - (6, 1, 5, 5) for LeNet-5.
    """
    filters = weight[:, 0]
    limit = float(np.abs(filters).max()) or 1.0
    figure = _new_figure(2 * len(filters), 2.4)
    image = None
    for index, (axes, kernel) in enumerate(zip(np.atleast_1d(figure.subplots(1, len(filters))),
                                               filters)):
        image = axes.imshow(kernel, cmap="gray", vmin=-limit, vmax=limit)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(f"filter {index}")
    figure.colorbar(image, ax=figure.axes, shrink=0.8, label="weight")
    figure.suptitle("conv1 filters")
    _save(figure, path)
