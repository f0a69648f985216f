"""The training loop: epochs of optimiser steps, validation, checkpoints, stopping safely.

The loop drives a *learner* - an object that owns a model and its optimiser and can take one
training step, produce logits, and export or import its state as flat NumPy arrays. The NumPy
learner lives here; ``reference.train`` supplies a torch one, so both frameworks run this very
loop on the very same batches (:mod:`numpylenet.pipeline`).

One optimiser step at global step ``t`` (0-based, counting over all epochs)::

    lr     = schedule(t, total_steps, peak_lr)
    loss   = cross_entropy(model(x), y)            mean over the batch (label-smoothed if the
                                                   config says so)
    grads  = d loss / d parameters                 backward pass
    params = optimiser update(params, grads, lr)
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .checkpoint import Checkpoint, Progress, check_weights, save_checkpoint
from .loss import softmax_cross_entropy
from .pipeline import (DataSplits, Stream, evaluation_batches, generator, num_batches,
                       training_batches)
from .recipes import TrainConfig
from .schedule import learning_rate

__all__ = ["Learner", "NumpyLearner", "Progress", "Evaluation", "evaluate_batches", "fit",
           "DivergedError", "TrainingInterrupted", "Terminated", "interruption", "StopOnInterrupt", "make_checkpoint",
           "save_if_finite"]


# Each epoch's record carries the training loss averaged over this many equal runs of steps.
TRACE_POINTS = 20


class Learner(Protocol):
    """What the loop needs from a model + optimiser pair (NumPy here, torch in ``reference``)."""

    framework: str
    backend: str
    threads: int | None       # the threads it computes with (None: unknown)
    compile_seconds: float    # spent preparing kernels before training (0 if nothing to compile)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One optimiser step at learning rate ``lr`` on batch x (B, 1, 32, 32), y (B,); the loss."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass only: x (B, 1, 32, 32) -> logits (B, 10) as a NumPy array."""

    def model_state(self) -> dict[str, np.ndarray]:
        """The weights, keyed by torch's names (conv1.weight ... fc2.bias)."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimiser's state as flat arrays."""

    def load_state(self, model: dict[str, np.ndarray], optimizer: dict[str, np.ndarray] | None) -> None:
        """Restore weights and (unless None) optimiser state; ValueError if they do not fit."""


class NumpyLearner:
    """``numpylenet.LeNet5`` trained by ``numpylenet.Adam`` or ``numpylenet.SGD``."""

    framework = "numpylenet"

    def __init__(self, config: TrainConfig):
        from .backend import set_threads
        from .model import LeNet5
        from .optim import SGD, Adam

        if config.threads is not None:
            set_threads(config.threads)
        self.model = LeNet5(activation=config.activation, pool=config.pool,
                            dtype=np.dtype(config.dtype), seed=config.seed, backend=config.backend)
        self.backend = self.model.backend
        self.compile_seconds = 0.0
        if self.backend == "numba":
            # Compile (or load from Numba's disk cache) what this run uses - its dtype, its
            # optimiser, its augmentation's kernel - before the clock of epoch 1 starts.
            from .engine import NumbaLeNet5

            started = time.perf_counter()
            NumbaLeNet5.compile(self.model.dtype, config.optimizer,
                                affine_augmentation=config.augment and config.augmentation == "affine")
            self.compile_seconds = time.perf_counter() - started
            from .engine import kernel_threads
            self.threads = kernel_threads()
        else:
            from .blas import blas_threads
            self.threads = blas_threads()
        self.label_smoothing = config.label_smoothing
        if config.optimizer == "adam":
            self.optimizer = Adam(self.model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
        else:
            self.optimizer = SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                 weight_decay=config.weight_decay, nesterov=config.nesterov)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        self.optimizer.lr = lr
        self.model.zero_grad()
        loss = self.model.forward_backward(x, y, label_smoothing=self.label_smoothing)
        self.optimizer.step()
        return loss

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.model.forward(x)

    def model_state(self) -> dict[str, np.ndarray]:
        return self.model.state_dict()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self.optimizer.state_dict()

    def load_state(self, model: dict[str, np.ndarray], optimizer: dict[str, np.ndarray] | None) -> None:
        self.model.load_state_dict(model)
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)


@dataclass
class Evaluation:
    """Mean loss, accuracy and predicted classes (N,) over one evaluation set."""

    loss: float
    accuracy: float
    predictions: np.ndarray


def evaluate_batches(learner: Learner, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                     label_smoothing: float = 0.0) -> Evaluation:
    """Loss and accuracy of ``learner`` over ``batches`` of (x, y), as means over images; the loss
    is cross-entropy, label-smoothed by ``label_smoothing`` (see :func:`softmax_cross_entropy`).

    Raises ValueError if the batches hold no image (a mean over nothing is undefined).
    """
    loss_sum, predictions, labels = 0.0, [], []
    for x, y in batches:
        if len(y) == 0:
            continue
        logits = learner.logits(x)
        loss_sum += softmax_cross_entropy(logits, y, label_smoothing=label_smoothing)[0] * len(y)
        predictions.append(logits.argmax(axis=1))
        labels.append(y)
    if not labels:
        raise ValueError("there are no images to evaluate")
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    return Evaluation(loss=loss_sum / len(labels), accuracy=float(np.mean(predictions == labels)),
                      predictions=predictions)


class DivergedError(RuntimeError):
    """Training diverged: the training or validation loss, or a weight, became NaN or infinite.
    The message says where; nothing from that point on was saved."""


class TrainingInterrupted(Exception):
    """Training stopped at the user's request (Ctrl-C or SIGTERM) after saving ``last.npz``.

    ``signal_number`` is the signal that asked (exit status 128 + it, as a shell reports it).
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


class Terminated(BaseException):
    """SIGTERM arrived where it cannot wait for a step to end (a BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` swallows it)."""


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def interruption(signal_number: int) -> BaseException:
    """What a signal raises where it may stop the program at once: KeyboardInterrupt for Ctrl-C
    (SIGINT), :class:`Terminated` for SIGTERM."""
    return KeyboardInterrupt() if signal_number == signal.SIGINT else Terminated()


class StopOnInterrupt:
    """Context manager turning the first Ctrl-C (SIGINT) or SIGTERM into a request the code inside
    honours when it can; ``requested`` is then the signal number (0 while none came).

    The training loop stops between steps (never inside one), so the saved weights and optimiser
    state always belong to the same step. A second signal gives up waiting: it raises
    :func:`interruption` at once. ``when`` completes the line printed at the first signal.
    """

    def __init__(self, when: str = "after this step and saving last.npz"):
        self.requested = 0
        self.when = when

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise interruption(signum)
        self.requested = signum
        print(f"\n{SIGNAL_NAMES[signum]}: stopping {self.when} (send it again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnInterrupt:
        self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNAL_NAMES}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def make_checkpoint(learner: Learner, config: TrainConfig, progress: Progress,
                    history: list[dict]) -> Checkpoint:
    """Everything needed to continue the run from this exact point (see :mod:`numpylenet.checkpoint`)."""
    return Checkpoint(framework=learner.framework, config=dataclasses.asdict(config),
                      progress=progress.to_json(), history=list(history),
                      model=learner.model_state(), optimizer=learner.optimizer_state())


def save_if_finite(path: Path, learner: Learner, config: TrainConfig, progress: Progress,
                   history: list[dict]) -> Checkpoint:
    """Save the learner's state to ``path`` unless a weight is NaN or infinite (DivergedError), so a
    checkpoint the loop writes is always one training can continue from. Returns the checkpoint."""
    checkpoint = make_checkpoint(learner, config, progress, history)
    try:
        check_weights(checkpoint.model)
    except ValueError as error:
        where = (f"after epoch {progress.epoch}" if progress.step == 0
                 else f"at epoch {progress.epoch + 1}, step {progress.step}")
        raise DivergedError(f"the {error} {where}") from None
    save_checkpoint(path, checkpoint)
    return checkpoint


def fit(learner: Learner, config: TrainConfig, splits: DataSplits, folder: Path,
        progress: Progress, history: list[dict], stop: StopOnInterrupt,
        on_epoch: Callable[[dict], None]) -> None:
    """Run epochs ``progress.epoch .. config.epochs - 1``, resuming mid-epoch at ``progress.step``.

    After each epoch: validate, append the epoch's record to ``history``, write ``last.npz`` and
    then, when the validation loss (the training loss, label smoothing included, on the
    validation images) improved, ``best.npz`` (so after a kill between the two,
    ``last.npz`` is itself the best and ``best.npz`` can be rebuilt from it), then pass the record
    to ``on_epoch``. ``progress`` and ``history`` are updated in place.

    Raises
    ------
    DivergedError
        A training loss (checked every step), the validation loss or a weight (checked once an
        epoch, before anything is saved) was NaN or inf. ``last.npz`` keeps the last finite state.
    TrainingInterrupted
        ``stop`` was requested; ``last.npz`` holds the state after the last completed step.
    numpylenet.files.WriteError
        A checkpoint could not be written (disk full, ...); the previous one is intact.
    """
    steps_per_epoch = num_batches(len(splits.train_images), config.batch_size)
    while progress.epoch < config.epochs:
        epoch = progress.epoch
        started = time.perf_counter()
        images_before = progress.epoch_images
        train_epoch(learner, config, splits, folder, progress, history, stop)
        train_seconds = time.perf_counter() - started
        # The validation loss is the training objective (label-smoothed when the recipe smooths).
        # Plain cross-entropy stops tracking accuracy once smoothing caps the model's confidence:
        # in a default-recipe run it was lowest at epoch 7 of 20 (99.05% valid accuracy; 99.50%
        # at the end), and selecting that epoch cost half a point of test accuracy.
        valid = evaluate_batches(learner, evaluation_batches(
            splits.valid_images, splits.valid_labels, config,
            rng=generator(config.seed, Stream.VALID, epoch)), label_smoothing=config.label_smoothing)
        if not math.isfinite(valid.loss):
            raise DivergedError(f"the validation loss became {valid.loss} after epoch {epoch + 1}")
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_loss": progress.epoch_loss_sum / progress.epoch_images,
                  "valid_loss": valid.loss, "valid_accuracy": valid.accuracy,
                  "lr_end": learning_rate(config.schedule, (epoch + 1) * steps_per_epoch - 1,
                                          config.epochs * steps_per_epoch, config.lr),
                  "seconds": seconds,
                  "train_images_per_second": (progress.epoch_images - images_before) / train_seconds,
                  "train_loss_trace": [float(np.mean(chunk)) for chunk in
                                       np.array_split(progress.step_losses, TRACE_POINTS) if len(chunk)]}
        finished = dataclasses.replace(progress, epoch=epoch + 1, step=0, epoch_loss_sum=0.0,
                                       epoch_images=0, step_losses=[], seconds=progress.seconds + seconds)
        improved = valid.loss < progress.best_valid_loss
        if improved:
            finished.best_valid_loss, finished.best_epoch = valid.loss, epoch + 1
        saving = time.perf_counter()
        checkpoint = save_if_finite(folder / "last.npz", learner, config, finished, [*history, record])
        # Only now, with the epoch safely on disk, does the run's state move on.
        history.append(record)
        vars(progress).update(vars(finished))
        if improved:
            save_checkpoint(folder / "best.npz", checkpoint)
        # The time spent saving counts as training time too (only the saved copies lack it).
        progress.seconds += time.perf_counter() - saving
        on_epoch(record)
        if stop.requested:
            raise TrainingInterrupted(f"stopped after epoch {epoch + 1}", stop.requested)


def train_epoch(learner: Learner, config: TrainConfig, splits: DataSplits, folder: Path,
                progress: Progress, history: list[dict], stop: StopOnInterrupt) -> None:
    """The optimiser steps of epoch ``progress.epoch`` from step ``progress.step`` on, with a
    progress bar; updates ``progress`` after every step (see :func:`fit` for the exceptions)."""
    from tqdm.auto import tqdm

    epoch = progress.epoch
    steps_per_epoch = num_batches(len(splits.train_images), config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    started = time.perf_counter()
    with tqdm(total=len(splits.train_images), initial=progress.epoch_images, unit="img",
              unit_scale=True, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
              dynamic_ncols=True) as bar:
        for step, x, y in training_batches(splits.train_images, splits.train_labels, config, epoch,
                                           start_step=progress.step):
            lr = learning_rate(config.schedule, epoch * steps_per_epoch + step, total_steps, config.lr)
            loss = learner.train_step(x, y, lr)
            if not math.isfinite(loss):
                raise DivergedError(f"the training loss became {loss} at epoch {epoch + 1}, "
                                    f"step {step + 1} (learning rate {lr:.3g})")
            progress.step = step + 1
            progress.epoch_loss_sum += loss * len(y)
            progress.epoch_images += len(y)
            progress.step_losses.append(loss)
            bar.update(len(y))
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if stop.requested:
                progress.seconds += time.perf_counter() - started
                save_if_finite(folder / "last.npz", learner, config, progress, history)
                raise TrainingInterrupted(f"stopped at epoch {epoch + 1}, step {step + 1}",
                                          stop.requested)
