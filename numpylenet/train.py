"""Train LeNet-5 and report its test accuracy: ``python -m numpylenet.train [options]``.

Three recipes (:mod:`numpylenet.recipes`): ``--recipe seed`` is the seed notebook exactly;
``--recipe default`` (the default) reaches >= 99.5% on MNIST in under a minute; ``--recipe
speedrun`` reaches 99% in two epochs. Every other flag overrides one setting of the recipe.

A run writes into its folder (``--out``, default ``runs/<timestamp>``), which it claims for itself
before loading anything (:mod:`numpylenet.run_folder`: one run per folder, never two mixed)::

    config.json          every setting, then (``resolved``) the data set actually used, backend,
                         threads, versions, the command
    metrics.jsonl        one JSON line per epoch: losses, validation accuracy, seconds, images/s
    summary.json         test loss and accuracy, which weights they are of, per-class accuracy,
                         train_seconds (first step to last, validation and checkpoints included)
    last.npz, best.npz   checkpoints after the latest epoch / the lowest validation loss
    learning_curves.png, predictions.png, confusion_matrix.png, conv1_filters.png

Every output file is written atomically; JSON files write NaN and infinities as ``null``.

Ctrl-C or SIGTERM stops between two steps and saves ``last.npz`` (during the Numba compile it
waits for the compile to end, a second one aborting at once; during the final test it stops, and
``--resume`` tests again; ``summary.json`` is written last); ``--resume RUN/last.npz`` continues
exactly where the run stopped (``last.npz`` is what ``--resume`` wants; ``best.npz`` is for
``numpylenet.evaluate``; a finished run resumed to train further first removes its summary.json
and figures, which are of weights it replaces). On resume only ``--epochs``, ``--lr``, ``--momentum``,
``--weight-decay``, ``--backend``, ``--threads``, ``--data-dir`` and ``--download`` may change
(:data:`numpylenet.recipes.RESUMABLE`); every setting that decides the network, the data order or
the split must stay as saved. A finished run resumed with the same ``--epochs`` is tested again
(``--lr``, ``--momentum`` and ``--weight-decay``, which would train nothing, must then stay as
saved; ``--epochs`` may never fall below the epochs already trained). The test accuracy is
reported for the weights of the epoch with the lowest validation loss (``best.npz``) when the run
can show them, else for the last weights, and the report says which. Exit status: 0 done, 1 training diverged (a NaN/inf loss or weight), 2 bad
command line, data, checkpoint or output folder, 130 Ctrl-C, 143 SIGTERM.

Nothing heavy (tqdm, matplotlib, numba, torch) is imported before the command line is parsed, so
``--help`` and flag errors come back at once.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .backend import thread_limit
from .cli import (OneLineErrorParser, RunError, add_backend_argument, add_data_arguments,
                  available_cores, backend_or_numpy, load_error_text, non_negative_float, non_negative_int,
                  open_fraction, path_argument, positive_float, positive_int, print_note, run_tool)
from .names import ACTIVATION_NAMES, DTYPE_NAMES, POOL_NAMES
from .recipes import AUGMENTATIONS, DATASET_CHOICES, OPTIMIZERS, RECIPES, RESUMABLE, TrainConfig
from .run_folder import FIGURES

if TYPE_CHECKING:  # only for annotations: numpy and friends load after the command line is parsed
    from .checkpoint import Checkpoint
    from .loop import Learner, Progress
    from .pipeline import DataSplits

__all__ = ["main", "build_parser", "resolve_config", "FIGURES"]

PROG = "python -m numpylenet.train"
# The resumable settings that act only on training steps: a resumed run with no step left to
# take must keep them as saved (see _resolve), or config.json would describe no training done.
TRAINING_SETTINGS = ("lr", "momentum", "weight_decay")
# The ranges of the affine augmentation: meaningless, and refused, with any other (see resolve_config).
AFFINE_SETTINGS = ("affine_degrees", "affine_translate", "affine_scale", "affine_shear")


def build_parser(prog: str = PROG, description: str | None = None) -> OneLineErrorParser:
    """The command line of ``numpylenet.train`` (``reference.train`` reuses it unchanged).

    Every setting flag defaults to None, meaning "not given: take the recipe's (or, with --resume,
    the checkpoint's) value"; the help text shows what each recipe uses.
    """
    def recipe_values(name: str) -> str:
        return "recipe " + ", ".join(f"{recipe}: {values[name]}" for recipe, values in RECIPES.items())

    parser = OneLineErrorParser(
        prog=prog, description=description or "Train LeNet-5 (NumPy) on MNIST and report its test accuracy.",
        epilog="Outputs go to --out: config.json, metrics.jsonl, summary.json, last.npz, best.npz "
               "and four PNG figures. Ctrl-C or SIGTERM saves last.npz; --resume RUN/last.npz "
               "continues from it, where only --epochs, --lr, --momentum, --weight-decay, "
               "--backend, --threads, --data-dir and --download may differ from the saved run.")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                        help="'seed': the seed notebook exactly (about 70%% on MNIST); 'default': "
                             "affine distortions, normalisation, label smoothing, SGD + one-cycle "
                             "(>= 99.5%%); 'speedrun': the fastest way to 99%% (two epochs) "
                             "[default: default]")
    data = parser.add_argument_group("data")
    add_data_arguments(
        data, dataset_choices=DATASET_CHOICES, download_default=None,
        dataset_help="'auto': MNIST from --data-dir, downloaded if missing, else the bundled "
                     "mnist-sample (announced loudly) [default: auto]",
        data_dir_help="root folder holding MNIST/raw or FashionMNIST/raw (torchvision layout) "
                      "[default: $NUMPYLENET_DATA or ./data]")
    data.add_argument("--valid-size", type=open_fraction, default=None, metavar="F",
                      help=f"fraction of the training set held out for validation "
                           f"({recipe_values('valid_size')})")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                      help=f"augment training images as --augmentation says ({recipe_values('augment')})")
    data.add_argument("--augmentation", choices=AUGMENTATIONS, default=None,
                      help=f"'crop-flip': the notebook's random crop + horizontal flip; 'shift': "
                           f"random shifts of up to 2 px; 'affine': random rotation, zoom, shear and "
                           f"shift, ranges below ({recipe_values('augmentation')})")
    for name, unit in (("degrees", "rotation in [-D, D] degrees"),
                       ("translate", "shift up to D x the image size"),
                       ("scale", "zoom in [1 - D, 1 + D]"), ("shear", "x-shear in [-D, D] degrees")):
        data.add_argument(f"--affine-{name}", type=non_negative_float, default=None, metavar="D",
                          help=f"'affine' augmentation: {unit} ({recipe_values(f'affine_{name}')})")
    data.add_argument("--limit-train", type=positive_int, default=None, metavar="N",
                      help="train on only the first N training images (quick tests) [default: all]")
    model = parser.add_argument_group("model")
    model.add_argument("--activation", choices=ACTIVATION_NAMES, default=None,
                       help="activation after conv1, conv2, conv3 and fc1 [default: relu]")
    model.add_argument("--pool", choices=POOL_NAMES, default=None, help="2x2 pooling [default: avg]")
    model.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                       help="floating-point type of weights and activations [default: float32]")
    add_backend_argument(model)
    model.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="threads for the compute kernels and BLAS, at most the cores available "
                            "[default: leave as is]")
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                              help=f"passes over the training set ({recipe_values('epochs')})")
    optimisation.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                              help=f"images per step ({recipe_values('batch_size')})")
    optimisation.add_argument("--lr", type=positive_float, default=None,
                              help=f"learning rate; the peak of the one-cycle schedule in the default "
                                   f"recipe ({recipe_values('lr')})")
    optimisation.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                              help=f"torch.optim-exact Adam or SGD ({recipe_values('optimizer')})")
    optimisation.add_argument("--momentum", type=non_negative_float, default=None,
                              help="SGD momentum (only with --optimizer sgd) [default: 0.9]")
    optimisation.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                              help=f"Nesterov momentum (only with --optimizer sgd) "
                                   f"({recipe_values('nesterov')})")
    optimisation.add_argument("--weight-decay", type=non_negative_float, default=None, metavar="WD",
                              help=f"L2 penalty added to the gradient, as torch.optim "
                                   f"({recipe_values('weight_decay')})")
    optimisation.add_argument("--label-smoothing", type=non_negative_float, default=None, metavar="EPS",
                              help=f"label smoothing of the training loss, as nn.CrossEntropyLoss "
                                   f"({recipe_values('label_smoothing')})")
    optimisation.add_argument("--seed", type=non_negative_int, default=None,
                              help="seeds initialisation, batch order and augmentation [default: 0]")
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=path_argument, default=None, metavar="DIR",
                     help="run folder, claimed by this run alone [default: runs/<timestamp>, or the "
                          "resumed checkpoint's folder]")
    run.add_argument("--resume", type=path_argument, default=None, metavar="CHECKPOINT",
                     help="continue the run saved in CHECKPOINT (its last.npz) exactly; flags given "
                          "alongside override its settings where a resumed run allows it")
    return parser


SETTING_FLAGS = ("dataset", "data_dir", "download", "valid_size", "augment", "limit_train",
                 "activation", "pool", "dtype", "backend", "threads", "epochs", "batch_size", "lr",
                 "optimizer", "momentum", "weight_decay", "seed", "augmentation", "affine_degrees",
                 "affine_translate", "affine_scale", "affine_shear", "label_smoothing", "nesterov")


def _flag(name: str, value) -> str:
    """How setting ``name`` = ``value`` is written on the command line."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"


def resolve_config(args: argparse.Namespace, saved: dict | None = None,
                   trained_on: str | None = None) -> TrainConfig:
    """The run's settings: the recipe's (or the resumed checkpoint's ``saved`` config), then flags.

    ``trained_on`` is the data set a resumed run trained on (what its "auto" resolved to): giving
    it as ``--dataset`` is no change.

    Raises
    ------
    ValueError
        A flag contradicts the recipe, or changes on resume a setting that is not RESUMABLE (the
        network, the data order, the split); the message names every such flag.
    """
    from .data import default_data_dir
    from .recipes import make_config

    given = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    if saved is None:
        given.setdefault("data_dir", default_data_dir())
        config = make_config(args.recipe or "default", **given)
    else:
        if args.recipe is not None and args.recipe != saved.get("recipe"):
            raise ValueError(f"--recipe {args.recipe} differs from the checkpoint's recipe "
                             f"{saved.get('recipe')!r}; give individual flags to change its settings")
        if given.get("dataset") is not None and given["dataset"] == trained_on:
            del given["dataset"]
        changed = [f"{_flag(name, value)} (checkpoint: {_flag(name, saved.get(name))})"
                   for name, value in given.items() if name not in RESUMABLE and value != saved.get(name)]
        if changed:
            allowed = ", ".join(sorted(_flag(name, "")[:-1].strip() for name in RESUMABLE))
            raise ValueError(f"cannot resume with {', '.join(changed)}: that is no longer the same "
                             f"run but a different network, data order or split. On resume only "
                             f"{allowed} may differ")
        config = make_config(saved.get("recipe", "default"), base=saved, **given)
    if args.momentum is not None and config.optimizer != "sgd":
        raise ValueError("--momentum applies only to --optimizer sgd (Adam's momentum is its beta1)")
    if args.nesterov is not None and config.optimizer != "sgd":
        raise ValueError("--nesterov applies only to --optimizer sgd")
    ignored = [_flag(name, getattr(args, name)) for name in AFFINE_SETTINGS if getattr(args, name) is not None]
    if ignored and not (config.augment and config.augmentation == "affine"):
        raise ValueError(f"{', '.join(ignored)} applies only to --augmentation affine (with --augment)")
    return config


def main(argv: Sequence[str] | None = None, *, make_learner: Callable | None = None,
         prog: str = PROG, description: str | None = None) -> int:
    """Run ``python -m numpylenet.train``; returns the exit status (errors exit via SystemExit).

    ``make_learner`` builds the learner from the config (default: :class:`numpylenet.loop.NumpyLearner`);
    ``reference.train`` passes its torch learner here, and its own ``--help`` ``description``.
    """
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    # As typed, to run again: config.json records it (sys.argv would name train.py's path).
    args.command = [*prog.split(), *(sys.argv[1:] if argv is None else map(str, argv))]
    return run_tool(parser, prog, lambda: _run(args, make_learner, prog))


@dataclass
class Session:
    """A run ready to train: its settings, data, learner, folder and (when resumed) saved progress.

    ``selection_from`` is the first epoch whose weights can be selected as the best (1, unless a
    resumed run could not show the best weights of its earlier epochs).
    """

    config: TrainConfig
    splits: DataSplits
    learner: Learner
    folder: Path
    progress: Progress
    history: list[dict]
    resumed: bool
    selection_from: int = 1


def _run(args: argparse.Namespace, make_learner: Callable | None, prog: str) -> int:
    """Check the inputs, claim the run folder, prepare the run, train it, report it."""
    from .loop import NumpyLearner
    from .run_folder import claim_run_folder

    make_learner = make_learner or NumpyLearner
    checkpoint = _load_resumed(args, make_learner)
    config = _resolve(args, checkpoint)
    folder = _run_folder_path(args)
    with claim_run_folder(folder, Path(args.resume) if args.resume is not None else None) as claimed:
        if claimed.removed_temporaries:
            print_note(prog, f"removed {len(claimed.removed_temporaries)} temporary files that "
                             f"interrupted writes had left in {folder}")
        session = _prepare(args, config, checkpoint, make_learner, folder, prog)
        _announce(session, prog)
        return _train_and_report(session, prog)


def _load_resumed(args: argparse.Namespace, make_learner: Callable) -> Checkpoint | None:
    """The checkpoint ``--resume`` names (validated), or None."""
    from .checkpoint import CheckpointError, load_checkpoint

    if args.resume is None:
        return None
    try:
        checkpoint = load_checkpoint(args.resume)
    except CheckpointError as error:
        raise RunError(error) from None
    if checkpoint.framework != make_learner.framework:
        raise RunError(f"checkpoint {args.resume} was written by a {checkpoint.framework} run; "
                       f"resume it with the trainer that wrote it")
    return checkpoint


def _resolve(args: argparse.Namespace, checkpoint: Checkpoint | None) -> TrainConfig:
    try:
        config = resolve_config(args, checkpoint.config if checkpoint else None,
                                checkpoint.progress["dataset"] if checkpoint else None)
    except ValueError as error:
        # A setting's own check names its field (weight_decay must be ...): say its flag instead.
        field, _, rest = str(error).partition(" ")
        text = f"{_flag(field, '').strip()} {rest}" if field in SETTING_FLAGS else str(error)
        raise RunError(f"checkpoint {args.resume}: {text}" if checkpoint else text) from None
    if checkpoint is None:
        return config
    done, inside = checkpoint.progress["epoch"], checkpoint.progress["step"] > 0
    if inside and config.epochs <= done:
        raise RunError(f"checkpoint {args.resume} stopped inside epoch {done + 1}; "
                       f"--epochs must be at least {done + 1}")
    if config.epochs < done:
        raise RunError(f"checkpoint {args.resume} has already trained {done} epochs; "
                       f"--epochs must be at least {done}")
    if config.epochs == done and not inside:
        # Nothing left to train: the run is tested again, and config.json must keep describing
        # the training that made its weights.
        changed = [_flag(name, getattr(config, name)) for name in TRAINING_SETTINGS
                   if getattr(config, name) != checkpoint.config.get(name)]
        if changed:
            raise RunError(f"checkpoint {args.resume} has finished its {done} epochs, so "
                           f"{', '.join(changed)} would train nothing; give --epochs N > {done} "
                           f"to train on with it")
    return config


def _run_folder_path(args: argparse.Namespace) -> Path:
    """``--out``, else the resumed checkpoint's folder, else a fresh ``runs/<timestamp>``."""
    if args.out is not None:
        return Path(args.out)
    if args.resume is not None:
        return Path(args.resume).parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, suffix = Path("runs") / stamp, 1
    while folder.exists():
        folder, suffix = Path("runs") / f"{stamp}-{suffix}", suffix + 1
    return folder


def _prepare(args: argparse.Namespace, config: TrainConfig, checkpoint: Checkpoint | None,
             make_learner: Callable, folder: Path, prog: str) -> Session:
    """Load the data, build (or restore) the learner, write the run's description.

    Raises
    ------
    RunError
        For anything the user can fix: missing or malformed data, an empty split, a checkpoint
        that does not fit the data or the learner, an unavailable backend.
    """
    from .checkpoint import Progress
    from .cli import build_with_cache_recovery, compile_announcement
    from .data import DownloadError
    from .loop import NumpyLearner
    from .pipeline import load_splits, num_batches, with_training_statistics

    if config.threads is not None:
        # config.json records the threads the run computes with, not more than it can use.
        limit, what = thread_limit(backend_or_numpy(config.backend)
                                   if make_learner.framework == NumpyLearner.framework else "numpy")
        if config.threads > limit:
            print_note(prog, f"--threads {config.threads} capped at {what}")
            config = replace(config, threads=limit)
    try:
        splits = load_splits(config, checkpoint.progress["dataset"] if checkpoint else None)
        # A resumed run keeps its checkpoint's statistics; a new one measures its training split.
        config = with_training_statistics(config, splits)
    except (OSError, DownloadError, ValueError) as error:
        raise RunError(load_error_text(error)) from None
    try:
        announce = (compile_announcement(config.backend, config.dtype, config.optimizer)
                    if make_learner.framework == NumpyLearner.framework else None)
        learner = build_with_cache_recovery(lambda: make_learner(config), lambda text: print_note(prog, text),
                                            announce)
    except ValueError as error:
        raise RunError(error) from None

    progress, history, selection_from = Progress(dataset=splits.dataset), [], 1
    if checkpoint is not None:
        progress = Progress.from_json(checkpoint.progress)
        steps = num_batches(len(splits.train_images), config.batch_size)
        if progress.dataset != splits.dataset:
            raise RunError(f"checkpoint {args.resume} was trained on {progress.dataset}, "
                           f"but this run loads {splits.dataset}")
        if progress.step > steps or progress.epoch_images > len(splits.train_images):
            raise RunError(f"checkpoint {args.resume} does not fit this data: it stopped at step "
                           f"{progress.step} of an epoch, but an epoch of {len(splits.train_images):,} "
                           f"images has {steps} steps")
        try:
            learner.load_state(checkpoint.model, checkpoint.optimizer)
        except (ValueError, TypeError) as error:
            raise RunError(f"checkpoint {args.resume} does not match this run: {error}") from None
        history = list(checkpoint.history)
        selection_from = _restore_best(Path(args.resume), checkpoint, progress, folder, prog)
    _write_description(config, splits, learner, folder, history, args.command)
    return Session(config, splits, learner, folder, progress, history, resumed=checkpoint is not None,
                   selection_from=selection_from)


def _best_matches(path: Path, progress: Progress, config: dict) -> bool:
    """Whether ``path`` holds this run's best weights: a readable checkpoint of the same run (the
    settings a resume keeps) saved at the end of ``progress.best_epoch`` with its validation loss."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .recipes import fixed_on_resume

    try:
        best = load_checkpoint(path, training_state=False)
    except CheckpointError:
        return False
    saved = best.progress
    return (saved["epoch"] == progress.best_epoch and saved["step"] == 0
            and saved["best_valid_loss"] == progress.best_valid_loss
            and fixed_on_resume(best.config) == fixed_on_resume(config))


def _restore_best(resumed: Path, checkpoint: Checkpoint, progress: Progress, folder: Path,
                  prog: str) -> int:
    """Put the resumed run's best.npz in place in ``folder``; returns the first epoch the final
    model selection may pick from.

    The best weights are the resumed checkpoint itself when it was saved at the end of the best
    epoch (``last.npz`` is written before ``best.npz``, so after a kill between the two this is how
    best.npz comes back), else the ``best.npz`` beside it when that is the run's best. When neither
    shows them, the run forgets its best (so it claims none it cannot show) and selects among the
    epochs still to come, saying so.
    """
    from .checkpoint import save_checkpoint
    from .files import atomic_write

    target = folder / "best.npz"
    if progress.best_epoch == 0:
        return 1
    if progress.best_epoch == progress.epoch and progress.step == 0:
        if not _best_matches(target, progress, checkpoint.config):
            save_checkpoint(target, checkpoint)
        return 1
    source = resumed.parent / "best.npz"
    if _best_matches(source, progress, checkpoint.config):
        if not (target.exists() and os.path.samefile(source, target)):
            with atomic_write(target) as file:
                file.write(source.read_bytes())
        return 1
    print_note(prog, f"{source} does not hold the best weights of this run (epoch {progress.best_epoch}); "
                     f"the test will use the best of epoch {progress.epoch + 1} on instead")
    progress.best_valid_loss, progress.best_epoch = math.inf, 0
    return progress.epoch + 1


def _write_description(config: TrainConfig, splits: DataSplits, learner: Learner, folder: Path,
                       history: list[dict], command: list[str]) -> None:
    """config.json (every setting, then what they resolved to on this machine) and metrics.jsonl."""
    import dataclasses
    import platform

    import numpy as np

    from . import __version__
    from .files import json_text, write_text
    from .pipeline import num_batches

    steps = num_batches(len(splits.train_images), config.batch_size)
    description = {**dataclasses.asdict(config),
                   "resolved": {"dataset": splits.dataset, "dataset_fallback": splits.fallback_reason,
                                "train_images": len(splits.train_images),
                                "valid_images": len(splits.valid_images),
                                "test_images": len(splits.test_images), "steps_per_epoch": steps,
                                "total_steps": steps * config.epochs, "framework": learner.framework,
                                "backend": learner.backend, "threads": learner.threads,
                                "compile_seconds": learner.compile_seconds, "run_folder": str(folder),
                                "command": command, "python": platform.python_version(),
                                "numpy": np.__version__, "numpylenet": __version__,
                                "numba": sys.modules["numba"].__version__ if learner.backend == "numba" else None,
                                "machine": platform.machine(), "cpus": available_cores()}}
    write_text(folder / "config.json", json_text(description) + "\n")
    _write_metrics(folder, history)


def _write_metrics(folder: Path, history: list[dict]) -> None:
    from .files import json_text, write_text

    write_text(folder / "metrics.jsonl", "".join(json_text(record, indent=None) + "\n" for record in history))


def _report_epoch(record: dict, session: Session) -> None:
    """Rewrite metrics.jsonl with the epoch's record and print its one-line summary."""
    config = session.config
    _write_metrics(session.folder, session.history)
    print(f"epoch {record['epoch']:>{len(str(config.epochs))}}/{config.epochs}  "
          f"train loss {record['train_loss']:.4f}  valid loss {record['valid_loss']:.4f}  "
          f"valid acc {100 * record['valid_accuracy']:.2f}%  {record['seconds']:.1f} s  "
          f"({record['train_images_per_second']:,.0f} img/s)", flush=True)


def _announce(session: Session, prog: str) -> None:
    """Say what is about to happen - and, loudly, when the data is only the bundled sample or the
    run has too few steps to train anything."""
    from .pipeline import normalisation_text, num_batches
    from .schedule import too_few_steps

    config, splits, learner, progress = session.config, session.splits, session.learner, session.progress
    if splits.fallback_reason:
        banner = "!" * 100
        print(f"{banner}\n{prog}: WARNING: full MNIST is not available, so this run trains on the "
              f"BUNDLED mnist-sample ({len(splits.train_images):,} training images), NOT full MNIST.\n"
              f"Its accuracy is not comparable to full-MNIST figures. Reason: {splits.fallback_reason}\n"
              f"Give --data-dir DIR (a folder holding MNIST/raw){'' if config.download else ' or allow --download'}."
              f"\n{banner}",
              file=sys.stderr, flush=True)
    schedule = "one-cycle " if config.schedule == "one-cycle" else ""
    augment = config.augmentation if config.augment else "none"
    # The validation loss picks the best epoch, so it is the training criterion; the test loss is
    # plain cross-entropy, comparable across recipes.
    smoothing = (f", label smoothing {config.label_smoothing:g} (train and valid losses; not the test loss)"
                 if config.label_smoothing else "")
    print(f"recipe {config.recipe} on {splits.dataset}: {len(splits.train_images):,} train / "
          f"{len(splits.valid_images):,} valid / {len(splits.test_images):,} test images; "
          f"{config.optimizer} {schedule}lr {config.lr:g}, batch {config.batch_size}, "
          f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}, augment {augment}{smoothing}"
          f"{normalisation_text(config)}, "
          f"{config.activation}/{config.pool} {config.dtype}, {learner.framework} ({learner.backend}); "
          f"run folder {session.folder}", flush=True)
    if learner.compile_seconds > 0.5:
        print(f"{learner.backend} kernels ready in {learner.compile_seconds:.1f} s (compiled, or loaded "
              f"from Numba's disk cache)", flush=True)
    steps = num_batches(len(splits.train_images), config.batch_size)
    warnings = [too_few_steps(config.schedule, steps * config.epochs)]
    ranges = (config.affine_degrees, config.affine_translate, config.affine_scale, config.affine_shear)
    if config.augment and config.augmentation == "affine" and not any(ranges):
        warnings.append("--augmentation affine with all four ranges 0 distorts nothing: give "
                        "--affine-degrees, --affine-translate, --affine-scale or --affine-shear")
    if config.batch_size > len(splits.train_images):
        warnings.append(f"--batch-size {config.batch_size} exceeds the {len(splits.train_images):,} "
                        f"training images: every epoch is a single step")
    for warning in filter(None, warnings):
        print(f"{prog}: WARNING: {warning}", file=sys.stderr, flush=True)
    if progress.epoch >= config.epochs:
        print(f"this run has already finished its {progress.epoch} of {config.epochs} epochs: nothing "
              f"to train, testing it again (give --epochs N > {progress.epoch} to train further)",
              flush=True)
    elif session.resumed:
        at = (f"step {progress.step + 1}" if progress.step < steps
              else "its end (all its steps taken: validating it)")
        print(f"resuming at epoch {progress.epoch + 1}, {at}", flush=True)


def _train_and_report(session: Session, prog: str) -> int:
    """Train from where the session stands, then test and report; the exit status."""
    from .files import WriteError
    from .loop import (SIGNAL_NAMES, DivergedError, StopOnInterrupt, Terminated, TrainingInterrupted, fit,
                       save_if_finite)

    config, folder, progress = session.config, session.folder, session.progress
    last = folder / "last.npz"
    started = time.perf_counter()
    try:
        with StopOnInterrupt() as stop:
            if progress.epoch < config.epochs:
                # The state before this session's first step is its first "last good" checkpoint.
                save_if_finite(last, session.learner, config, progress, session.history)
                _remove_test_results(folder)
                fit(session.learner, config, session.splits, folder, progress, session.history, stop,
                    on_epoch=lambda record: _report_epoch(record, session))
    except DivergedError as error:
        print(f"{prog}: error: {error}. Training stopped; the last good checkpoint is {last} "
              f"({_saved_state(last)}). Try a lower --lr{_momentum_hint(config)}.", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        print(f"{prog}: {error}; saved {last}. Continue with:\n"
              f"  {prog} --resume {shlex.quote(str(last))}", file=sys.stderr)
        return 128 + error.signal_number
    except (KeyboardInterrupt, Terminated) as error:    # a second signal: stopped at once, unsaved
        stopped_by = signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM
        print(f"{prog}: {SIGNAL_NAMES[stopped_by]} again: stopped at once; {last} holds the last state "
              f"saved ({_saved_state(last)}). Continue with:\n  {prog} --resume {shlex.quote(str(last))}",
              file=sys.stderr)
        return 128 + stopped_by
    except WriteError as error:
        raise RunError(f"{error}; training stopped, {last} holds the last saved state "
                       f"({_saved_state(last)})") from None
    # A signal after the last step (too late for the loop to stop on), or during the test and the
    # figures: the trained run is in last.npz, and --resume tests it again.
    stopped_by = stop.requested
    if not stopped_by:
        try:
            summary = _finish(session, time.perf_counter() - started)
        except KeyboardInterrupt:
            stopped_by = signal.SIGINT
        except Terminated:
            stopped_by = signal.SIGTERM
    if stopped_by:
        print(f"{prog}: {SIGNAL_NAMES[stopped_by]}: stopped before the test was done; {last} holds the "
              f"trained run ({_saved_state(last)}). Test it with:\n  {prog} --resume {shlex.quote(str(last))}",
              file=sys.stderr)
        return 128 + stopped_by
    fallback = "  [mnist-sample, NOT full MNIST]" if session.splits.fallback_reason else ""
    print(f"test loss {summary['test_loss']:.4f}  test accuracy {100 * summary['test_accuracy']:.2f}% "
          f"({summary['test_correct']:,}/{summary['test_images']:,}) with {summary['weights_used']}; "
          f"{summary['seconds']:.1f} s; outputs in {folder}{fallback}", flush=True)
    return 0


def _momentum_hint(config: TrainConfig) -> str:
    """SGD's momentum buffer grows without bound at momentum >= 1, whatever the rate: say so."""
    if config.optimizer == "sgd" and config.momentum >= 1:
        return f", or a --momentum below 1 (at {config.momentum:g} SGD's steps grow without bound)"
    return ""


def _remove_test_results(folder: Path) -> None:
    """Remove what the test of a finished run left in ``folder`` (resumed to train further): those
    figures are of weights this session replaces. summary.json goes first, so that a folder
    holding one still holds every output of one model."""
    for name in ("summary.json", *FIGURES):
        (folder / name).unlink(missing_ok=True)


def _saved_state(path: Path) -> str:
    """Which state the checkpoint at ``path`` holds, in words."""
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        progress = load_checkpoint(path, training_state=False).progress
    except CheckpointError as error:
        return f"unreadable: {error}"
    if progress["step"]:
        return f"epoch {progress['epoch'] + 1}, step {progress['step']}"
    return f"after epoch {progress['epoch']}" if progress["epoch"] else "before the first step"


def _test_weights(session: Session) -> tuple[str, int | None]:
    """Load the weights to test into the learner: the best epoch's when best.npz shows them, else
    the current (last) ones. Returns the phrase saying which, and the best epoch used (or None)."""
    from .checkpoint import load_checkpoint

    progress, best = session.progress, session.folder / "best.npz"
    if progress.best_epoch and _best_matches(best, progress, _config_dict(session.config)):
        session.learner.load_state(load_checkpoint(best, training_state=False).model, None)
        since = f" of epochs {session.selection_from}-{progress.epoch}" if session.selection_from > 1 else ""
        return f"the weights of epoch {progress.best_epoch} (lowest validation loss{since}, best.npz)", \
            progress.best_epoch
    reason = ("best.npz is missing or not this run's" if progress.best_epoch
              else "no epoch of this session has been validated")
    return f"the last weights, after epoch {progress.epoch} ({reason})", None


def _config_dict(config: TrainConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(config)


def _finish(session: Session, session_seconds: float) -> dict:
    """Test the selected weights, draw the figures, write summary.json; return the summary."""
    import numpy as np

    from . import plots
    from .cli import confusion_matrix, per_class_accuracy
    from .files import json_text, write_text
    from .loop import evaluate_batches
    from .pipeline import Stream, evaluation_batches, generator, transform

    config, splits, learner, folder = session.config, session.splits, session.learner, session.folder
    progress, history = session.progress, session.history
    weights_used, best_epoch = _test_weights(session)
    test = evaluate_batches(learner, evaluation_batches(splits.test_images, splits.test_labels, config,
                                                        rng=generator(config.seed, Stream.TEST)))
    matrix = confusion_matrix(splits.test_labels, test.predictions)
    speeds = [r["train_images_per_second"] for r in history if r.get("train_images_per_second") is not None]
    summary = {
        "test_accuracy": test.accuracy, "test_loss": test.loss,
        "test_correct": int(np.trace(matrix)), "test_images": len(splits.test_labels),
        "weights_used": weights_used, "weights_epoch": best_epoch or progress.epoch,
        "per_class_accuracy": per_class_accuracy(matrix),
        "dataset": splits.dataset, "dataset_fallback": splits.fallback_reason,
        "train_images": len(splits.train_images), "valid_images": len(splits.valid_images),
        "epochs": progress.epoch, "best_epoch": best_epoch,
        "best_valid_loss": progress.best_valid_loss if best_epoch else None,
        "final_valid_accuracy": history[-1]["valid_accuracy"] if history else None,
        "seconds": progress.seconds, "train_seconds": progress.seconds,
        "seconds_this_session": session_seconds,
        "train_images_per_second": float(np.mean(speeds)) if speeds else None,
        "recipe": config.recipe, "seed": config.seed, "framework": learner.framework,
        "backend": learner.backend,
    }
    plots.plot_learning_curves(history, folder / "learning_curves.png")
    plots.plot_confusion_matrix(matrix, folder / "confusion_matrix.png",
                                f"{splits.dataset} test set: {100 * test.accuracy:.2f}% correct")
    plots.plot_conv1_filters(learner.model_state()["conv1.weight"], folder / "conv1_filters.png")
    # The notebook's last cell: 25 random test images, freshly transformed, with their predictions.
    chosen = generator(config.seed, Stream.PREVIEW).choice(len(splits.test_images),
                                                            min(25, len(splits.test_images)), replace=False)
    x = transform(splits.test_images[chosen], config, train=False,
                  rng=generator(config.seed, Stream.PREVIEW, 1))
    plots.plot_predictions(x[:, 0], splits.test_labels[chosen], learner.logits(x).argmax(axis=1),
                           folder / "predictions.png")
    # Written last: a run folder with a summary.json holds every output.
    write_text(folder / "summary.json", json_text(summary) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
