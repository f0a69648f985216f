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

from .checkpoint import Checkpoint, save_checkpoint
from .loss import softmax_cross_entropy
from .pipeline import (DataSplits, Stream, evaluation_batches, generator, num_batches,
                       training_batches)
from .recipes import TrainConfig
from .schedule import learning_rate

__all__ = ["Learner", "NumpyLearner", "Progress", "Evaluation", "evaluate", "train",
           "NonFiniteLossError", "TrainingInterrupted", "StopOnInterrupt"]


# Each epoch's record carries the training loss averaged over this many equal runs of steps.
TRACE_POINTS = 20


class Learner(Protocol):
    """What the loop needs from a model + optimiser pair (NumPy here, torch in ``reference``)."""

    framework: str
    backend: str
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
            # Compile (or load from Numba's disk cache) before the clock of epoch 1 starts.
            from .backend import NumbaLeNet5

            started = time.perf_counter()
            NumbaLeNet5.compile(self.model.dtype)
            self.compile_seconds = time.perf_counter() - started
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
        loss, grad_logits = softmax_cross_entropy(self.model.forward(x), y,
                                                  label_smoothing=self.label_smoothing)
        self.model.backward(grad_logits, input_grad=False)   # training never needs dL/dx
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
class Progress:
    """Where a run stands; saved in every checkpoint (as JSON) so a resumed run picks up exactly here.

    Attributes
    ----------
    epoch : the epoch in progress, 0-based (== config.epochs once training is over)
    step : the next step within that epoch
    epoch_loss_sum, epoch_images : sum of (batch loss x batch size) and images seen so far this epoch
    step_losses : the loss of every step so far this epoch (for the loss trace of its record)
    best_valid_loss, best_epoch : the lowest validation loss so far and its epoch (1-based; 0: none)
    seconds : wall-clock seconds spent training, validating and writing the checkpoints between
        epochs, summed over sessions (summary.json's ``train_seconds``)
    dataset : the data set the run trains on (what "auto" resolved to)
    """

    epoch: int = 0
    step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    step_losses: list[float] = dataclasses.field(default_factory=list)
    best_valid_loss: float = math.inf
    best_epoch: int = 0
    seconds: float = 0.0
    dataset: str = ""

    def to_json(self) -> dict:
        # JSON has no infinity; a run that has not validated yet stores None.
        record = dataclasses.asdict(self)
        record["best_valid_loss"] = None if math.isinf(self.best_valid_loss) else self.best_valid_loss
        return record

    @classmethod
    def from_json(cls, record: dict) -> Progress:
        record = dict(record)
        if record.get("best_valid_loss") is None:
            record["best_valid_loss"] = math.inf
        return cls(**record)


@dataclass
class Evaluation:
    """Mean loss, accuracy and predicted classes (N,) over one evaluation set."""

    loss: float
    accuracy: float
    predictions: np.ndarray


def evaluate(learner: Learner, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
             label_smoothing: float = 0.0) -> Evaluation:
    """Loss and accuracy of ``learner`` over ``batches`` of (x, y), as means over images; the loss
    is cross-entropy, label-smoothed by ``label_smoothing`` (see :func:`softmax_cross_entropy`)."""
    loss_sum, predictions, labels = 0.0, [], []
    for x, y in batches:
        logits = learner.logits(x)
        loss_sum += softmax_cross_entropy(logits, y, label_smoothing=label_smoothing)[0] * len(y)
        predictions.append(logits.argmax(axis=1))
        labels.append(y)
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    return Evaluation(loss=loss_sum / len(labels), accuracy=float(np.mean(predictions == labels)),
                      predictions=predictions)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where."""


class TrainingInterrupted(Exception):
    """Training stopped at the user's request (Ctrl-C) after saving ``last.npz``."""


class StopOnInterrupt:
    """Context manager turning the first Ctrl-C into a request the loop honours between steps.

    Stopping between steps (never inside one) means the saved weights and optimiser state always
    belong to the same step. A second Ctrl-C gives up waiting and raises KeyboardInterrupt at once.
    """

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving last.npz (press again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self._previous)


def make_checkpoint(learner: Learner, config: TrainConfig, progress: Progress,
                    history: list[dict]) -> Checkpoint:
    """Everything needed to continue the run from this exact point (see :mod:`numpylenet.checkpoint`)."""
    return Checkpoint(framework=learner.framework, config=dataclasses.asdict(config),
                      progress=progress.to_json(), history=list(history),
                      model=learner.model_state(), optimizer=learner.optimizer_state())


def train(learner: Learner, config: TrainConfig, splits: DataSplits, folder: Path,
          progress: Progress, history: list[dict], stop: StopOnInterrupt,
          on_epoch: Callable[[dict], None]) -> None:
    """Run epochs ``progress.epoch .. config.epochs - 1``, resuming mid-epoch at ``progress.step``.

    After each epoch: validate, append the epoch's record to ``history`` (and pass it to
    ``on_epoch``), write ``best.npz`` when the validation loss (the training loss, label smoothing
    included, on the validation images) improved and ``last.npz`` always.
    ``progress`` and ``history`` are updated in place.

    Raises
    ------
    NonFiniteLossError
        A training loss was NaN or inf. Nothing is saved, so ``last.npz`` keeps the last good state.
    TrainingInterrupted
        ``stop`` was requested; ``last.npz`` holds the state after the last completed step.
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
        valid = evaluate(learner, evaluation_batches(
            splits.valid_images, splits.valid_labels, config, splits.dataset,
            rng=generator(config.seed, Stream.VALID, epoch)), label_smoothing=config.label_smoothing)
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_loss": progress.epoch_loss_sum / progress.epoch_images,
                  "valid_loss": valid.loss, "valid_accuracy": valid.accuracy,
                  "lr_end": learning_rate(config.schedule, (epoch + 1) * steps_per_epoch - 1,
                                          config.epochs * steps_per_epoch, config.lr),
                  "seconds": seconds,
                  "train_images_per_second": (progress.epoch_images - images_before) / train_seconds,
                  "train_loss_trace": [float(np.mean(chunk)) for chunk in
                                       np.array_split(progress.step_losses, TRACE_POINTS) if len(chunk)]}
        history.append(record)
        progress.epoch, progress.step, progress.epoch_loss_sum, progress.epoch_images = epoch + 1, 0, 0.0, 0
        progress.step_losses = []
        progress.seconds += seconds
        improved = valid.loss < progress.best_valid_loss
        if improved:
            progress.best_valid_loss, progress.best_epoch = valid.loss, epoch + 1
        checkpoint = make_checkpoint(learner, config, progress, history)
        saving = time.perf_counter()
        if improved:
            save_checkpoint(folder / "best.npz", checkpoint)
        save_checkpoint(folder / "last.npz", checkpoint)
        # The time spent saving counts as training time too (only the saved copy lacks it).
        progress.seconds += time.perf_counter() - saving
        on_epoch(record)
        if stop.requested:
            raise TrainingInterrupted(f"stopped after epoch {epoch + 1}")


def train_epoch(learner: Learner, config: TrainConfig, splits: DataSplits, folder: Path,
                progress: Progress, history: list[dict], stop: StopOnInterrupt) -> None:
    """The optimiser steps of epoch ``progress.epoch`` from step ``progress.step`` on, with a
    progress bar; updates ``progress`` after every step (see :func:`train` for the exceptions)."""
    from tqdm.auto import tqdm

    epoch = progress.epoch
    steps_per_epoch = num_batches(len(splits.train_images), config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    started = time.perf_counter()
    with tqdm(total=len(splits.train_images), initial=progress.epoch_images, unit="img",
              unit_scale=True, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
              dynamic_ncols=True) as bar:
        for step, x, y in training_batches(splits.train_images, splits.train_labels, config,
                                           splits.dataset, epoch, start_step=progress.step):
            lr = learning_rate(config.schedule, epoch * steps_per_epoch + step, total_steps, config.lr)
            loss = learner.train_step(x, y, lr)
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"the training loss became {loss} at epoch {epoch + 1}, "
                                         f"step {step + 1} (learning rate {lr:.3g})")
            progress.step = step + 1
            progress.epoch_loss_sum += loss * len(y)
            progress.epoch_images += len(y)
            progress.step_losses.append(loss)
            bar.update(len(y))
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if stop.requested:
                progress.seconds += time.perf_counter() - started
                save_checkpoint(folder / "last.npz", make_checkpoint(learner, config, progress, history))
                raise TrainingInterrupted(f"stopped at epoch {epoch + 1}, step {step + 1}")
