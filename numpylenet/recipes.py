"""Training recipes: every setting of a run in one frozen dataclass, and the three named recipes.

``seed``
    The seed notebook, exactly: random 32x32 crops of the zero-padded image (shifts of up to 2
    pixels) plus random horizontal flips for training, random crops for validation and test too,
    pixels in [0, 1] without normalisation, batch 32, Adam at a constant 1e-4, one epoch.
``default``
    The most accurate LeNet-5 we can train in under a minute on two cores: LeCun's distortions,
    modern optimisation. Every training image gets its own random affine distortion (rotation up
    to 8 degrees, shift up to 8% of the size, zoom within 8%, x-shear up to 8 degrees; no flips: a
    mirrored 2, 3, 4, 5, 7 or 9 is not a digit), validation and test images are centred and
    unaugmented, inputs are normalised by the training set's mean and standard deviation, the
    loss is label-smoothed (0.1), and SGD with Nesterov momentum 0.9 and weight decay 5e-4 runs a
    one-cycle schedule peaking at 0.1 over 20 epochs of batch 64 (1.08 million images).
``speedrun``
    The fastest way to 99% on MNIST: two epochs (108,000 images) of batch 128 without
    augmentation, normalised inputs, label smoothing 0.1, Adam under a one-cycle schedule peaking
    at 1.2e-2.

None of them knows it is MNIST beyond the normalisation statistics of its training set, so each
runs unchanged on Fashion-MNIST. How the values were chosen (full MNIST, numba backend, validation
accuracy first, the test set only reported) is in ``docs/recipes.md``.

A run's settings are the recipe's values with any explicitly given flag on top (see
:func:`make_config`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .names import ACTIVATION_NAMES, BACKEND_NAMES, DTYPE_NAMES, OPTIMIZER_NAMES, POOL_NAMES
from .schedule import SCHEDULES

__all__ = ["TrainConfig", "RECIPES", "make_config", "DATASET_CHOICES", "OPTIMIZERS",
           "AUGMENTATIONS", "EVAL_CROPS", "RESUMABLE", "fixed_on_resume"]

DATASET_CHOICES = ("auto", "mnist", "fashion-mnist", "mnist-sample")
OPTIMIZERS = OPTIMIZER_NAMES
AUGMENTATIONS = ("crop-flip", "shift", "affine")
EVAL_CROPS = ("center", "random")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; ``config.json`` is ``dataclasses.asdict`` of this.

    Attributes
    ----------
    recipe : "seed" or "default", where the values not given as flags came from
    dataset : one of DATASET_CHOICES; "auto" is full MNIST with a loud fallback to mnist-sample
    data_dir : root folder holding ``MNIST/raw`` (torchvision's layout)
    download : fetch missing data files from torchvision's mirrors
    valid_size : fraction of the training set held out for validation (the notebook's split)
    augment : augment training images (the kind is ``augmentation``)
    augmentation : "crop-flip" (the notebook's RandomCrop(32, padding=4) + RandomHorizontalFlip),
        "shift" (the same crop alone: shifts of up to 2 pixels) or "affine" (the image centred in
        32 x 32, then a random rotation, zoom, shear and shift: ``transforms.v2.RandomAffine``
        with the four ``affine_*`` ranges, bilinear; see :mod:`numpylenet.augment`)
    eval_crop : "center" (zero-pad 28 -> 32) or "random" (the notebook's random crop, also applied
        to validation and test images)
    normalize : subtract the training set's mean pixel and divide by its standard deviation
        (``normalize_mean`` and ``normalize_std``)
    activation, pool, dtype : the LeNet5 configuration
    backend : compute backend of LeNet5, or None for the library's default
    threads : threads for the compute kernels and BLAS, or None to leave them alone
    epochs, batch_size, optimizer, lr, schedule, momentum, weight_decay : the optimisation;
        ``lr`` is the peak rate of the schedule ("constant" or "one-cycle"); ``momentum`` is SGD's;
        ``weight_decay`` is torch.optim's L2 penalty added to the gradient
    seed : seeds initialisation, batch order and augmentation (the split always uses the
        notebook's seed 0, so every run validates on the same images)
    limit_train : train on only the first N training images (for quick tests), or None for all
    label_smoothing : eps of ``nn.CrossEntropyLoss(label_smoothing=eps)``, for the training loss and
        the validation loss that picks the best epoch (the test loss stays plain cross-entropy)
    affine_degrees, affine_translate, affine_scale, affine_shear : the ranges of the "affine"
        augmentation: rotation in [-degrees, degrees], shift up to ``translate`` x the image size,
        zoom in [1 - scale, 1 + scale], x-shear in [-shear, shear] degrees
    nesterov : Nesterov momentum for SGD (``torch.optim.SGD(nesterov=True)``); like ``momentum``,
        ignored by Adam
    normalize_mean, normalize_std : the statistics ``normalize`` uses, on the [0, 1] pixel scale;
        None (both): the run computes them from its own training split
        (:func:`numpylenet.pipeline.with_training_statistics`) and its checkpoints keep them, so
        a checkpoint is evaluated and resumed with the statistics it was trained with

    The fields from ``label_smoothing`` on were added after the first release; their defaults
    are the behaviour before them, so older ``config.json`` files and checkpoints still load.
    """

    recipe: str
    dataset: str
    data_dir: str
    download: bool
    valid_size: float
    augment: bool
    augmentation: str
    eval_crop: str
    normalize: bool
    activation: str
    pool: str
    dtype: str
    backend: str | None
    threads: int | None
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    schedule: str
    momentum: float
    weight_decay: float
    seed: int
    limit_train: int | None
    label_smoothing: float = 0.0
    affine_degrees: float = 0.0
    affine_translate: float = 0.0
    affine_scale: float = 0.0
    affine_shear: float = 0.0
    nesterov: bool = False
    normalize_mean: float | None = None
    normalize_std: float | None = None


# The settings a resumed run may change (``--resume ... --epochs 30``): they change neither which
# images are trained on in which order and with which augmentation, nor which are held out, nor the
# shape of the weights and optimiser state. Every other setting must equal the checkpoint's, or the
# resumed run would no longer continue the saved one (a different batch size re-orders the epoch,
# a different validation size trains on validation images). A new setting is fixed on resume
# unless it is added here.
#   epochs: the run is extended or cut short; a one-cycle schedule is stretched to the new total
#   lr, momentum, weight_decay: the optimisation from here on (the schedule's peak for lr)
#   backend, threads: how the same arithmetic is computed
#   data_dir, download: where the same data set is found
RESUMABLE = frozenset({"epochs", "lr", "momentum", "weight_decay", "backend", "threads", "data_dir",
                       "download"})


def fixed_on_resume(settings: dict) -> dict:
    """The settings (a config as a dict) that a resumed run must keep: all but RESUMABLE."""
    return {name: value for name, value in settings.items() if name not in RESUMABLE}


# Settings that do not belong to a recipe: where the data is and how the machine runs.
RUN_DEFAULTS = dict(dataset="auto", data_dir="data", download=True, backend=None, threads=None,
                    seed=0, limit_train=None)

RECIPES: dict[str, dict] = {
    "seed": dict(valid_size=0.1, augment=True, augmentation="crop-flip", eval_crop="random",
                 normalize=False, activation="relu", pool="avg", dtype="float32", epochs=1,
                 batch_size=32, optimizer="adam", lr=1e-4, schedule="constant", momentum=0.9,
                 nesterov=False, weight_decay=0.0, label_smoothing=0.0, affine_degrees=0.0,
                 affine_translate=0.0, affine_scale=0.0, affine_shear=0.0),
    "default": dict(valid_size=0.1, augment=True, augmentation="affine", eval_crop="center",
                    normalize=True, activation="relu", pool="avg", dtype="float32", epochs=20,
                    batch_size=64, optimizer="sgd", lr=0.1, schedule="one-cycle", momentum=0.9,
                    nesterov=True, weight_decay=5e-4, label_smoothing=0.1, affine_degrees=8.0,
                    affine_translate=0.08, affine_scale=0.08, affine_shear=8.0),
    "speedrun": dict(valid_size=0.1, augment=False, augmentation="shift", eval_crop="center",
                     normalize=True, activation="relu", pool="avg", dtype="float32", epochs=2,
                     batch_size=128, optimizer="adam", lr=1.2e-2, schedule="one-cycle", momentum=0.9,
                     nesterov=False, weight_decay=0.0, label_smoothing=0.1, affine_degrees=0.0,
                     affine_translate=0.0, affine_scale=0.0, affine_shear=0.0),
}


def make_config(recipe: str = "default", base: dict | None = None, **overrides) -> TrainConfig:
    """The settings of a run: ``base`` (a recipe's values by default) with non-None overrides on top.

    Parameters
    ----------
    recipe : a key of RECIPES
    base : settings to start from instead of the recipe's, e.g. a checkpoint's saved config
    **overrides : setting name -> value; None means "not given" and keeps the base value

    Raises
    ------
    ValueError
        Unknown recipe or setting name, or a value of the wrong type, outside its allowed range
        or choices (the message names the first such setting).
    """
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    settings = dict(base) if base is not None else {**RUN_DEFAULTS, **RECIPES[recipe], "recipe": recipe}
    fields = dataclasses.fields(TrainConfig)
    names = {f.name for f in fields}
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    unknown = sorted((settings.keys() | overrides.keys()) - names)
    missing = sorted(required - settings.keys())
    if unknown or missing:
        raise ValueError(f"settings do not fit TrainConfig: unknown {unknown}, missing {missing}")
    settings.update({name: value for name, value in overrides.items() if value is not None})
    config = TrainConfig(**{name: _typed(name, value) for name, value in settings.items()})
    _check(config)
    return config


# The type of each setting, from TrainConfig's annotations: "int", "float", "str" or "bool",
# with or without "| None".
_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _typed(name: str, value):
    """``value`` if it has the setting's type (ints accepted for floats, as float; never a bool
    for a number), else ValueError. Settings read from JSON (a checkpoint) arrive unchecked."""
    kind, _, nullable = _TYPES[name].partition(" | ")
    if kind not in _KINDS or (value is None and nullable):
        return value
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool)}[kind]
    if not ok:
        raise ValueError(f"{name} must be {_KINDS[kind]}{' or null' if nullable else ''}, got {value!r}")
    if kind == "float":
        try:
            value = float(value)
        except OverflowError:   # an integer beyond float's range
            value = math.inf
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _check(config: TrainConfig) -> None:
    """Raise ValueError naming the first setting outside its allowed values."""
    choices = {"recipe": tuple(RECIPES), "dataset": DATASET_CHOICES, "augmentation": AUGMENTATIONS,
               "eval_crop": EVAL_CROPS, "activation": ACTIVATION_NAMES, "pool": POOL_NAMES,
               "dtype": DTYPE_NAMES, "optimizer": OPTIMIZERS, "schedule": tuple(SCHEDULES)}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    if config.backend is not None and config.backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {config.backend!r}")
    rules = {"epochs": (lambda v: v >= 1, ">= 1"),
             "batch_size": (lambda v: v >= 1, ">= 1"),
             "lr": (lambda v: v > 0, "> 0"),
             "momentum": (lambda v: v >= 0, ">= 0"),
             "weight_decay": (lambda v: v >= 0, ">= 0"),
             "valid_size": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
             "seed": (lambda v: 0 <= v < 2**63, ">= 0 and < 2**63"),
             "threads": (lambda v: v is None or v >= 1, ">= 1"),
             "limit_train": (lambda v: v is None or v >= 1, ">= 1"),
             "label_smoothing": (lambda v: 0 <= v <= 1, "in [0, 1]"),
             "affine_degrees": (lambda v: 0 <= v <= 180, "in [0, 180]"),
             "affine_translate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
             "affine_scale": (lambda v: 0 <= v < 1, "in [0, 1)"),
             "affine_shear": (lambda v: 0 <= v < 90, "in [0, 90)"),
             "normalize_mean": (lambda v: v is None or math.isfinite(v), "a finite number"),
             "normalize_std": (lambda v: v is None or 0 < v < math.inf, "> 0 and finite")}
    for name, (ok, requirement) in rules.items():
        if not ok(getattr(config, name)):
            raise ValueError(f"{name} must be {requirement}, got {getattr(config, name)!r}")
    if (config.normalize_mean is None) != (config.normalize_std is None):
        raise ValueError("normalize_mean and normalize_std must be set together, or both left None "
                         f"(computed from the training split), got {config.normalize_mean!r} and "
                         f"{config.normalize_std!r}")
