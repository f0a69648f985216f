"""Train LeNet-5 and report its test accuracy: ``python -m numpylenet.train [options]``.

Three recipes (:mod:`numpylenet.recipes`): ``--recipe seed`` is the seed notebook exactly;
``--recipe default`` (the default) reaches >= 99.5% on MNIST in under a minute; ``--recipe
speedrun`` reaches 99% in two epochs. Every other flag overrides one setting of the recipe.

A run writes into its folder (``--out``, default ``runs/<timestamp>``)::

    config.json          every resolved setting, plus the data set actually used and versions
    metrics.jsonl        one JSON line per epoch: losses, validation accuracy, seconds, images/s
    summary.json         test loss and accuracy (of the best-validation weights), per-class accuracy,
                         train_seconds (first step to last, validation and checkpoints included)
    last.npz, best.npz   checkpoints after the latest epoch / the lowest validation loss
    learning_curves.png, predictions.png, confusion_matrix.png, conv1_filters.png

Ctrl-C stops between two steps and saves ``last.npz``; ``--resume RUN/last.npz`` continues
exactly where the run stopped. Exit status: 0 done, 1 training diverged (NaN/inf loss),
2 bad command line, data or checkpoint, 130 interrupted.

Nothing heavy (tqdm, matplotlib, numba, torch) is imported before the command line is parsed, so
``--help`` and flag errors come back at once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .recipes import AUGMENTATIONS, BACKENDS, DATASET_CHOICES, OPTIMIZERS, RECIPES, TrainConfig

if TYPE_CHECKING:  # only for annotations: numpy and friends load after the command line is parsed
    from .loop import Learner, Progress
    from .pipeline import DataSplits

__all__ = ["main", "build_parser", "resolve_config", "OneLineErrorParser", "RunError"]

PROG = "python -m numpylenet.train"
FIGURES = ("learning_curves.png", "predictions.png", "confusion_matrix.png", "conv1_filters.png")
# Settings that define the network's weights: a checkpoint only fits a run with the same ones.
ARCHITECTURE = ("activation", "pool", "dtype")


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``prog: error: message (see --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class RunError(Exception):
    """A problem with the data, a checkpoint or the output folder, reported as one line, exit 2."""


def _number(kind: type, condition: Callable[[float], bool], requirement: str):
    """An argparse ``type=`` converting to ``kind`` and checking ``condition`` (NaN fails)."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not condition(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return convert


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
open_fraction = _number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


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
               "and four PNG figures. Ctrl-C saves last.npz; --resume continues from it.")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                        help="'seed': the seed notebook exactly (about 70%% on MNIST); 'default': "
                             "affine distortions, normalisation, label smoothing, Adam + one-cycle "
                             "(>= 99.5%%); 'speedrun': the fastest way to 99%% (two epochs) "
                             "[default: default]")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_CHOICES, default=None,
                      help="'auto': MNIST from --data-dir, downloaded if missing, else the bundled "
                           "mnist-sample (announced loudly) [default: auto]")
    data.add_argument("--data-dir", default=None, metavar="DIR",
                      help="root folder holding MNIST/raw or FashionMNIST/raw (torchvision layout) "
                           "[default: $NUMPYLENET_DATA or ./data]")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                      help="download missing data files from torchvision's mirrors [default: yes]")
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
    model.add_argument("--activation", choices=("relu", "tanh", "sigmoid"), default=None,
                       help="activation after conv1, conv2, conv3 and fc1 [default: relu]")
    model.add_argument("--pool", choices=("avg", "max"), default=None, help="2x2 pooling [default: avg]")
    model.add_argument("--dtype", choices=("float32", "float64"), default=None,
                       help="floating-point type of weights and activations [default: float32]")
    model.add_argument("--backend", choices=BACKENDS, default=None,
                       help="compute backend [default: $NUMPYLENET_BACKEND, else numba if it imports]")
    model.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="threads for the compute kernels and BLAS [default: leave as is]")
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                              help=f"passes over the training set ({recipe_values('epochs')})")
    optimisation.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                              help=f"images per step ({recipe_values('batch_size')})")
    optimisation.add_argument("--lr", type=positive_float, default=None,
                              help=f"learning rate; the peak of the one-cycle schedule in the default "
                                   f"recipe ({recipe_values('lr')})")
    optimisation.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                              help="torch.optim-exact Adam or SGD [default: adam]")
    optimisation.add_argument("--momentum", type=non_negative_float, default=None,
                              help="SGD momentum (only with --optimizer sgd) [default: 0.9]")
    optimisation.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                              help=f"Nesterov momentum (only with --optimizer sgd) "
                                   f"({recipe_values('nesterov')})")
    optimisation.add_argument("--weight-decay", type=non_negative_float, default=None, metavar="WD",
                              help="L2 penalty added to the gradient, as torch.optim [default: 0]")
    optimisation.add_argument("--label-smoothing", type=non_negative_float, default=None, metavar="EPS",
                              help=f"label smoothing of the training loss, as nn.CrossEntropyLoss "
                                   f"({recipe_values('label_smoothing')})")
    optimisation.add_argument("--seed", type=non_negative_int, default=None,
                              help="seeds initialisation, batch order and augmentation [default: 0]")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="run folder [default: runs/<timestamp>, or the resumed checkpoint's folder]")
    run.add_argument("--resume", default=None, metavar="CHECKPOINT",
                     help="continue the run saved in CHECKPOINT (a last.npz or best.npz) exactly; "
                          "flags given alongside override its settings")
    return parser


SETTING_FLAGS = ("dataset", "data_dir", "download", "valid_size", "augment", "limit_train",
                 "activation", "pool", "dtype", "backend", "threads", "epochs", "batch_size", "lr",
                 "optimizer", "momentum", "weight_decay", "seed", "augmentation", "affine_degrees",
                 "affine_translate", "affine_scale", "affine_shear", "label_smoothing", "nesterov")


def resolve_config(args: argparse.Namespace, saved: dict | None = None) -> TrainConfig:
    """The run's settings: the recipe's (or the resumed checkpoint's ``saved`` config), then flags.

    Raises
    ------
    ValueError
        A flag contradicts the recipe or the checkpoint (e.g. a different architecture).
    """
    from .recipes import make_config

    given = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    if saved is None:
        given.setdefault("data_dir", os.environ.get("NUMPYLENET_DATA", "data"))
        config = make_config(args.recipe or "default", **given)
    else:
        if args.recipe is not None and args.recipe != saved.get("recipe"):
            raise ValueError(f"--recipe {args.recipe} differs from the checkpoint's recipe "
                             f"{saved.get('recipe')!r}; give individual flags to change its settings")
        changed = [f"--{name} {given[name]} (checkpoint: {saved.get(name)})" for name in ARCHITECTURE
                   if name in given and given[name] != saved.get(name)]
        if changed:
            raise ValueError(f"cannot resume with a different network: {', '.join(changed)}")
        config = make_config(saved.get("recipe", "default"), base=saved, **given)
    if args.momentum is not None and config.optimizer != "sgd":
        raise ValueError("--momentum applies only to --optimizer sgd (Adam's momentum is its beta1)")
    if args.nesterov is not None and config.optimizer != "sgd":
        raise ValueError("--nesterov applies only to --optimizer sgd")
    return config


def main(argv: Sequence[str] | None = None, *, make_learner: Callable | None = None,
         prog: str = PROG) -> int:
    """Run ``python -m numpylenet.train``; returns the exit status (errors exit via SystemExit).

    ``make_learner`` builds the learner from the config (default: :class:`numpylenet.loop.NumpyLearner`);
    ``reference.train`` passes its torch learner here.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return _run(args, make_learner, prog)
    except RunError as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{prog}: interrupted\n")


@dataclass
class Session:
    """A run ready to train: its settings, data, learner, folder and (when resumed) saved progress."""

    config: TrainConfig
    splits: DataSplits
    learner: Learner
    folder: Path
    progress: Progress
    history: list[dict]
    resumed: bool


def _run(args: argparse.Namespace, make_learner: Callable | None, prog: str) -> int:
    """Prepare the run (every bad input fails here, as a RunError), train it, report it."""
    from .checkpoint import save_checkpoint
    from .loop import (NonFiniteLossError, NumpyLearner, StopOnInterrupt, TrainingInterrupted,
                       make_checkpoint, train)

    session = _prepare(args, make_learner or NumpyLearner)
    config, folder = session.config, session.folder
    _announce(session, prog)
    started = time.perf_counter()
    try:
        with StopOnInterrupt() as stop:
            if not session.resumed:
                # The state before the first step is the first "last good" checkpoint.
                save_checkpoint(folder / "last.npz", make_checkpoint(
                    session.learner, config, session.progress, session.history))
            train(session.learner, config, session.splits, folder, session.progress,
                  session.history, stop, on_epoch=lambda record: _report_epoch(record, config, folder))
    except NonFiniteLossError as error:
        print(f"{prog}: error: {error}. Training stopped; the last good checkpoint is "
              f"{folder / 'last.npz'}. Try a lower --lr.", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        print(f"{prog}: {error}; saved {folder / 'last.npz'}. Continue with:\n"
              f"  {prog} --resume {folder / 'last.npz'}", file=sys.stderr)
        return 130
    summary = _finish(session, time.perf_counter() - started)
    fallback = "  [mnist-sample, NOT full MNIST]" if session.splits.fallback_reason else ""
    print(f"test loss {summary['test_loss']:.4f}  test accuracy {100 * summary['test_accuracy']:.2f}% "
          f"({summary['test_correct']:,}/{summary['test_images']:,}) with the weights of epoch "
          f"{summary['best_epoch']} (lowest validation loss); {summary['seconds']:.1f} s; "
          f"outputs in {folder}{fallback}", flush=True)
    return 0


def _prepare(args: argparse.Namespace, make_learner: Callable) -> Session:
    """Resolve the settings, load the data, build (or restore) the learner, set up the run folder.

    Raises
    ------
    RunError
        For anything the user can fix: a bad or mismatched checkpoint, contradictory flags,
        missing or malformed data, an unavailable backend, an unusable folder.
    """
    from . import data
    from .checkpoint import CheckpointError, load_checkpoint
    from .loop import Progress
    from .pipeline import load_splits

    checkpoint = None
    if args.resume is not None:
        try:
            checkpoint = load_checkpoint(args.resume)
        except CheckpointError as error:
            raise RunError(error) from None
        if checkpoint.framework != make_learner.framework:
            raise RunError(f"checkpoint {args.resume} was written by a {checkpoint.framework} run; "
                           f"resume it with the trainer that wrote it")
    try:
        config = resolve_config(args, checkpoint.config if checkpoint else None)
    except ValueError as error:
        raise RunError(f"checkpoint {args.resume}: {error}" if checkpoint else error) from None
    folder = _run_folder(args)
    try:
        splits = load_splits(config)
    except (FileNotFoundError, data.DownloadError, ValueError) as error:
        raise RunError(" ".join(str(error).split())) from None
    try:
        learner = make_learner(config)
    except ValueError as error:
        raise RunError(error) from None

    progress, history = Progress(dataset=splits.dataset), []
    if checkpoint is not None:
        try:
            progress = Progress.from_json(checkpoint.progress)
        except TypeError as error:
            raise RunError(f"checkpoint {args.resume} is corrupt: malformed progress ({error})") from None
        if progress.dataset != splits.dataset:
            raise RunError(f"checkpoint {args.resume} was trained on {progress.dataset}, "
                           f"but this run loads {splits.dataset}")
        try:
            learner.load_state(checkpoint.model, checkpoint.optimizer)
        except ValueError as error:
            raise RunError(f"checkpoint {args.resume} does not match this run: {error}") from None
        history = list(checkpoint.history)

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create the run folder {folder}: {error.strerror}") from None
    if checkpoint is not None:
        _carry_over_best(Path(args.resume), folder)
    _write_json(folder / "config.json", _run_description(config, splits, learner, folder))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
    return Session(config, splits, learner, folder, progress, history, resumed=checkpoint is not None)


def _report_epoch(record: dict, config: TrainConfig, folder: Path) -> None:
    """Append the epoch's record to metrics.jsonl and print its one-line summary."""
    with open(folder / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps(record) + "\n")
    print(f"epoch {record['epoch']:>{len(str(config.epochs))}}/{config.epochs}  "
          f"train loss {record['train_loss']:.4f}  valid loss {record['valid_loss']:.4f}  "
          f"valid acc {100 * record['valid_accuracy']:.2f}%  {record['seconds']:.1f} s  "
          f"({record['train_images_per_second']:,.0f} img/s)", flush=True)


def _run_folder(args: argparse.Namespace) -> Path:
    """``--out``, else the resumed checkpoint's folder, else a fresh ``runs/<timestamp>``
    (created later, once the data and the model are ready)."""
    if args.out is not None:
        folder = Path(args.out)
    elif args.resume is not None:
        folder = Path(args.resume).parent
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path("runs") / stamp
        suffix = 1
        while folder.exists():
            folder, suffix = Path("runs") / f"{stamp}-{suffix}", suffix + 1
    if args.resume is None and (folder / "last.npz").exists():
        raise RunError(f"{folder} already holds a run; choose another --out, or continue it with "
                       f"--resume {folder / 'last.npz'}")
    return folder


def _carry_over_best(resumed: Path, folder: Path) -> None:
    """When a run continues in a new folder, bring its best.npz along (model selection needs it)."""
    source = resumed.parent / "best.npz"
    if source.is_file() and source.resolve() != (folder / "best.npz").resolve():
        shutil.copyfile(source, folder / "best.npz")


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _run_description(config: TrainConfig, splits: DataSplits, learner: Learner, folder: Path) -> dict:
    """config.json: every setting, then what they resolved to on this machine."""
    import dataclasses
    import platform

    import numpy as np

    from . import __version__
    from .pipeline import num_batches

    steps = num_batches(len(splits.train_images), config.batch_size)
    return {**dataclasses.asdict(config),
            "resolved": {"dataset": splits.dataset, "dataset_fallback": splits.fallback_reason,
                         "train_images": len(splits.train_images),
                         "valid_images": len(splits.valid_images),
                         "test_images": len(splits.test_images), "steps_per_epoch": steps,
                         "total_steps": steps * config.epochs, "framework": learner.framework,
                         "backend": learner.backend,
                         "compile_seconds": learner.compile_seconds, "run_folder": str(folder),
                         "command": sys.argv, "python": platform.python_version(),
                         "numpy": np.__version__, "numpylenet": __version__,
                         "machine": platform.machine(), "cpus": os.cpu_count()}}


def _announce(session: Session, prog: str) -> None:
    """Say what is about to happen - and, loudly, when the data is only the bundled sample."""
    config, splits, learner = session.config, session.splits, session.learner
    if splits.fallback_reason:
        banner = "!" * 100
        print(f"{banner}\n{prog}: WARNING: full MNIST is not available, so this run trains on the "
              f"BUNDLED mnist-sample ({len(splits.train_images):,} training images), NOT full MNIST.\n"
              f"Its accuracy is not comparable to full-MNIST figures. Reason: {splits.fallback_reason}\n"
              f"Give --data-dir DIR (a folder holding MNIST/raw) or allow --download.\n{banner}",
              file=sys.stderr, flush=True)
    schedule = "one-cycle " if config.schedule == "one-cycle" else ""
    augment = config.augmentation if config.augment else "none"
    print(f"recipe {config.recipe} on {splits.dataset}: {len(splits.train_images):,} train / "
          f"{len(splits.valid_images):,} valid / {len(splits.test_images):,} test images; "
          f"{config.optimizer} {schedule}lr {config.lr:g}, batch {config.batch_size}, "
          f"{config.epochs} epochs, augment {augment}, {config.activation}/{config.pool} "
          f"{config.dtype}, {learner.framework} ({learner.backend}); run folder {session.folder}", flush=True)
    if learner.compile_seconds > 0.5:
        print(f"{learner.backend} kernels ready in {learner.compile_seconds:.1f} s (compiled, or loaded "
              f"from Numba's disk cache)", flush=True)
    if session.resumed:
        print(f"resuming at epoch {session.progress.epoch + 1}, step {session.progress.step + 1}",
              flush=True)


def _finish(session: Session, session_seconds: float) -> dict:
    """Test the best-validation weights, draw the figures, write summary.json; return the summary."""
    import numpy as np

    from . import plots
    from .checkpoint import load_checkpoint
    from .evaluate import confusion_matrix
    from .loop import evaluate
    from .pipeline import Stream, evaluation_batches, generator, transform

    config, splits, learner, folder = session.config, session.splits, session.learner, session.folder
    progress, history = session.progress, session.history
    if (folder / "best.npz").is_file():
        learner.load_state(load_checkpoint(folder / "best.npz").model, None)
    test = evaluate(learner, evaluation_batches(splits.test_images, splits.test_labels, config,
                                                splits.dataset, rng=generator(config.seed, Stream.TEST)))
    matrix = confusion_matrix(splits.test_labels, test.predictions)
    per_class = np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)
    summary = {
        "test_accuracy": test.accuracy, "test_loss": test.loss,
        "test_correct": int(np.trace(matrix)), "test_images": len(splits.test_labels),
        "per_class_accuracy": {str(k): float(v) for k, v in enumerate(per_class)},
        "dataset": splits.dataset, "dataset_fallback": splits.fallback_reason,
        "train_images": len(splits.train_images), "valid_images": len(splits.valid_images),
        "epochs": progress.epoch, "best_epoch": progress.best_epoch,
        "best_valid_loss": progress.to_json()["best_valid_loss"],
        "final_valid_accuracy": history[-1]["valid_accuracy"] if history else None,
        "seconds": progress.seconds, "train_seconds": progress.seconds,
        "seconds_this_session": session_seconds,
        "train_images_per_second": (float(np.mean([r["train_images_per_second"] for r in history]))
                                    if history else None),
        "recipe": config.recipe, "seed": config.seed, "framework": learner.framework,
        "backend": learner.backend,
    }
    _write_json(folder / "summary.json", summary)

    plots.plot_learning_curves(history, folder / "learning_curves.png")
    plots.plot_confusion_matrix(matrix, folder / "confusion_matrix.png",
                                f"{splits.dataset} test set: {100 * test.accuracy:.2f}% correct")
    plots.plot_conv1_filters(learner.model_state()["conv1.weight"], folder / "conv1_filters.png")
    # The notebook's last cell: 25 random test images, freshly transformed, with their predictions.
    chosen = generator(config.seed, Stream.PREVIEW).choice(len(splits.test_images), 25, replace=False)
    x = transform(splits.test_images[chosen], config, splits.dataset, train=False,
                  rng=generator(config.seed, Stream.PREVIEW, 1))
    plots.plot_predictions(x[:, 0], splits.test_labels[chosen], learner.logits(x).argmax(axis=1),
                           folder / "predictions.png")
    return summary


if __name__ == "__main__":
    sys.exit(main())
