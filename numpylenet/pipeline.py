"""The data side of a run: which images, how they are split, transformed and batched.

``numpylenet.train`` and ``reference.train`` both draw their batches from here, so for the same
config and seed the NumPy and the torch model see identical pixels in an identical order.

Randomness
----------
Every random draw comes from a generator keyed by the run's seed, a stream and counters::

    shuffle order of epoch e          generator(seed, Stream.SHUFFLE, e)
    augmentation of step s of epoch e generator(seed, Stream.AUGMENT, e, s)
    validation crops after epoch e    generator(seed, Stream.VALID, e)
    test crops                        generator(seed, Stream.TEST)

so any step can be reproduced on its own: a run resumed at (epoch, step) needs no saved generator
state and still draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from . import augment, data
from .recipes import TrainConfig

__all__ = ["Stream", "generator", "DataSplits", "load_dataset", "load_splits", "with_training_statistics",
           "normalisation_text",
           "transform", "affine_ranges", "training_batches", "evaluation_batches", "num_batches",
           "EVAL_BATCH_SIZE", "SPLIT_SEED"]

EVAL_BATCH_SIZE = 1000
SPLIT_SEED = 0          # the notebook's split_train_valid_data(random_seed=0)


class Stream(enum.IntEnum):
    """The independent random streams of a run."""

    SHUFFLE = 0
    AUGMENT = 1
    VALID = 2
    TEST = 3
    PREVIEW = 4


def generator(seed: int, stream: Stream, *counters: int) -> np.random.Generator:
    """A PCG64 generator keyed by ``(seed, stream, *counters)`` (distinct keys, independent streams)."""
    return np.random.default_rng([seed, int(stream), *counters])


@dataclass
class DataSplits:
    """The images of a run, uint8 (N, 28, 28), with int64 labels (N,).

    Attributes
    ----------
    dataset : the data set actually used ("mnist", "fashion-mnist" or "mnist-sample")
    fallback_reason : why ``--dataset auto`` fell back to mnist-sample, or None
    """

    dataset: str
    train_images: np.ndarray
    train_labels: np.ndarray
    valid_images: np.ndarray
    valid_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    fallback_reason: str | None = None


def load_dataset(dataset: str, data_dir: str, download: bool, *,
                 train: bool) -> tuple[np.ndarray, np.ndarray, str, str | None]:
    """The training or test images of ``dataset``, resolving "auto".

    "auto" means full MNIST from ``data_dir`` (downloaded if ``download``); when that is missing
    and cannot be downloaded, the bundled mnist-sample.

    Returns
    -------
    images : uint8 (N, 28, 28)
    labels : int64 (N,)
    dataset : the data set actually loaded
    fallback_reason : why "auto" fell back to mnist-sample, or None

    Raises
    ------
    FileNotFoundError, data.DownloadError
        An explicitly named data set is missing (and could not be downloaded).
    ValueError
        The data files are malformed.
    """
    if dataset == "auto":
        try:
            return (*data.load_mnist(data_dir, train=train, dataset="mnist", download=download),
                    "mnist", None)
        except (FileNotFoundError, data.DownloadError) as error:
            dataset, fallback_reason = "mnist-sample", " ".join(str(error).split())
    else:
        fallback_reason = None
    return (*data.load_mnist(data_dir, train=train, dataset=dataset, download=download),
            dataset, fallback_reason)


def load_splits(config: TrainConfig, trained_on: str | None = None) -> DataSplits:
    """Load the data set (see :func:`load_dataset`), split off validation exactly as the notebook
    does, and keep only the first ``config.limit_train`` training images if set.

    ``trained_on`` is the data set a resumed run trained on: its "auto" then loads that very set,
    not what "auto" finds today (a run that fell back to mnist-sample continues on it, and is
    still said to have fallen back, when full MNIST has appeared in its data folder since).

    Raises ValueError (besides :func:`load_dataset`'s errors) if the training, validation or test
    set would be empty: a run needs images to train on, to select its weights by and to test.
    """
    if config.dataset == "auto" and trained_on is not None:
        images, labels, dataset, _ = load_dataset(trained_on, config.data_dir, config.download, train=True)
        fallback_reason = ("the run resumed here trained on it, its --dataset auto having found no full MNIST"
                           if dataset == "mnist-sample" else None)
    else:
        images, labels, dataset, fallback_reason = load_dataset(
            config.dataset, config.data_dir, config.download, train=True)
    test_images, test_labels, _, _ = load_dataset(dataset, config.data_dir, config.download, train=False)
    train_indices, valid_indices = data.split_train_valid(len(images), config.valid_size, seed=SPLIT_SEED)
    if len(train_indices) == 0 or len(valid_indices) == 0:
        least = f"; valid_size must be at least {1 / len(images):.2g}" if len(images) > 1 else ""
        raise ValueError(f"{dataset}: valid_size {config.valid_size} splits its {len(images):,} training "
                         f"images into {len(train_indices):,} to train on and {len(valid_indices):,} to "
                         f"validate on: both need at least one{least}")
    if len(test_images) == 0:
        raise ValueError(f"{dataset}: the test set holds no image")
    if config.limit_train is not None:
        train_indices = train_indices[:config.limit_train]
    return DataSplits(dataset=dataset,
                      train_images=images[train_indices], train_labels=labels[train_indices],
                      valid_images=images[valid_indices], valid_labels=labels[valid_indices],
                      test_images=test_images, test_labels=test_labels,
                      fallback_reason=fallback_reason)


def with_training_statistics(config: TrainConfig, splits: DataSplits) -> TrainConfig:
    """``config`` with the statistics its normalisation uses: those it holds (set by the user, or
    saved in the checkpoint a run resumes or evaluates), else the mean and std of the pixels of
    ``splits``' training images (:func:`data.pixel_mean_std`). A config without normalisation is
    returned as it is. No recipe knows its data set's statistics: each run measures its own.
    """
    if not config.normalize or config.normalize_mean is not None:
        return config
    mean, std = data.pixel_mean_std(splits.train_images)
    if std == 0:
        raise ValueError(f"the {len(splits.train_images):,} training images are one flat colour "
                         f"(std 0 at 4 decimals): nothing to normalise by")
    return replace(config, normalize_mean=mean, normalize_std=std)


def _mean_std(config: TrainConfig) -> tuple[float, float] | None:
    """The (mean, std) that normalises the config's images, or None when it does not normalise."""
    if not config.normalize:
        return None
    if config.normalize_mean is None:
        raise ValueError("the config normalises but holds no statistics yet: "
                         "pass it through with_training_statistics(config, splits) first")
    return config.normalize_mean, config.normalize_std


def normalisation_text(config: TrainConfig) -> str:
    """", normalised by mean M std S" for a config that normalises, else "": the statistics a run
    or an evaluation says it uses."""
    return f", normalised by mean {config.normalize_mean} std {config.normalize_std}" if config.normalize else ""


def transform(images: np.ndarray, config: TrainConfig, *, train: bool,
              rng: np.random.Generator | None) -> np.ndarray:
    """uint8 images (N, 28, 28) -> the model's float input (N, 1, 32, 32), as the recipe says.

    Training images (when ``config.augment``): for "shift" and "crop-flip" a random 32x32 crop of
    the image zero-padded by 4 (a shift of up to 2 pixels), then for "crop-flip" a random
    horizontal flip; for "affine" the image centred in 32x32, then (after ``x / 255``) a random
    affine distortion (:func:`numpylenet.augment.random_affine` with the config's ranges).
    Evaluation images: centred in 32x32, or for ``eval_crop="random"`` the same random crop.
    Then ``x / 255`` and, when ``config.normalize``, ``(x - mean) / std`` with the config's
    ``normalize_mean`` and ``normalize_std`` (see :func:`with_training_statistics`; for uint8 pixels
    both steps at once, by looking each value up in :func:`data.pixel_table`).
    ``rng`` may be None when nothing is random (no augmentation, centred evaluation).
    """
    if images.dtype != np.uint8:
        raise ValueError(f"transform takes the loaders' uint8 images (N, 28, 28), got {images.dtype}: "
                         "it scales them by 1/255 itself")
    if train and config.augment and config.augmentation == "affine":
        x = data.to_float(data.pad_to(images, 32), dtype=np.dtype(config.dtype))
        x = augment.random_affine(x, affine_ranges(config), rng)
        return data.normalize(x, *_mean_std(config)) if config.normalize else x
    if train and config.augment:
        images = data.random_crop(images, size=32, padding=4, rng=rng)
        if config.augmentation == "crop-flip":
            images = data.random_horizontal_flip(images, p=0.5, rng=rng)
    elif not train and config.eval_crop == "random":
        images = data.random_crop(images, size=32, padding=4, rng=rng)
    else:
        images = data.pad_to(images, 32)
    table = data.pixel_table(np.dtype(config.dtype), _mean_std(config))
    return np.take(table, images)[:, np.newaxis]


def affine_ranges(config: TrainConfig) -> augment.AffineRanges:
    """The ranges of the config's "affine" augmentation."""
    return augment.AffineRanges(degrees=config.affine_degrees, translate=config.affine_translate,
                                scale=config.affine_scale, shear=config.affine_shear)


def num_batches(num_items: int, batch_size: int) -> int:
    """Batches per epoch, the last partial batch included."""
    if batch_size < 1 or num_items < 0:
        raise ValueError(f"need num_items >= 0 and batch_size >= 1, got {num_items} and {batch_size}")
    return -(-num_items // batch_size)


def training_batches(images: np.ndarray, labels: np.ndarray, config: TrainConfig,
                     epoch: int, start_step: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(step, x, y)`` for epoch ``epoch`` (0-based), from step ``start_step`` on.

    Each epoch visits every training image once, in a fresh seeded order; ``x`` is
    (B, 1, 32, 32) in the config's dtype and ``y`` int64 (B,), the last batch possibly shorter.
    """
    order = data.batch_indices(len(images), config.batch_size,
                               rng=generator(config.seed, Stream.SHUFFLE, epoch))
    for step, indices in enumerate(order):
        if step < start_step:
            continue
        # Without augmentation the transform draws nothing: skip making its generator (~13 us a step).
        rng = generator(config.seed, Stream.AUGMENT, epoch, step) if config.augment else None
        x = transform(images[indices], config, train=True, rng=rng)
        yield step, x, labels[indices]


def evaluation_batches(images: np.ndarray, labels: np.ndarray, config: TrainConfig,
                       rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x, y)`` batches of up to EVAL_BATCH_SIZE images in order, transformed for evaluation.

    ``rng`` is used only by the seed recipe's random evaluation crops.
    """
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        chunk = slice(start, start + EVAL_BATCH_SIZE)
        yield transform(images[chunk], config, train=False, rng=rng), labels[chunk]
