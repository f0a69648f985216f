"""Evaluate trained weights on a test set: ``python -m numpylenet.evaluate CHECKPOINT [options]``.

CHECKPOINT is a ``.npz`` checkpoint written by ``numpylenet.train`` (or ``reference.train``), or a
torch ``state_dict`` file (``.pt``/``.pth``, any case) saved from the seed notebook's ``LeNet`` with
``torch.save(model.state_dict(), path)``; the latter is read through ``reference`` (needs torch;
loaded with ``weights_only=True``, so nothing is unpickled but tensors). Only the members needed
are read from a checkpoint, each within a size bound, and weights must be float32 or float64 and
finite.

The test images are prepared as the model was trained to see them: a checkpoint's recipe settings
(normalisation, centred or random crops - the random ones drawn exactly as ``numpylenet.train`` drew
them, so its reported accuracy is reproduced), or for a notebook ``state_dict`` the notebook's own
settings. Prints the test loss, the accuracy and the accuracy of every class, and writes the
confusion matrix (PNG) and the figures (JSON; NaN written as ``null``) next to the checkpoint or
into ``--out``, as ``eval-<checkpoint name>-<data set>[-random-crops]`` .json and
-confusion_matrix.png; where that report is another checkpoint's (two runs' ``best.npz`` into one
``--out``), it is kept and this one numbered -2, -3, ... The output folder is checked to be
writable before anything is computed.
Exit status: 0 done, 2 bad command line, checkpoint, data or output folder, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import (OneLineErrorParser, RunError, add_backend_argument, add_data_arguments,
                  confusion_matrix, load_error_text, path_argument, per_class_accuracy, run_tool)
from .files import describe_path, open_regular
from .recipes import DATASET_CHOICES, EVAL_CROPS

__all__ = ["main", "load_weights", "confusion_matrix"]

PROG = "python -m numpylenet.evaluate"
TORCH_SUFFIXES = (".pt", ".pth")


def load_weights(path: Path) -> tuple[dict, dict, str]:
    """The weights in ``path``, the settings they were trained with, and the data set.

    Returns
    -------
    weights : dict of str to ndarray, torch's names (conv1.weight ... fc2.bias), float32 or float64
    settings : dict, a ``TrainConfig`` as a dict (for a notebook state_dict: the seed recipe)
    dataset : the data set trained on ("auto" when unknown)

    Raises
    ------
    RunError
        Unreadable file, weights that are not finite float32/float64, or a torch file without torch
        installed; one line.
    """
    return _load(path)[:3]


def _load(path: Path) -> tuple[dict, dict, str, dict | None]:
    """:func:`load_weights`'s three, and the checkpoint's progress (epoch, step, ...; None for a
    torch file)."""
    import dataclasses
    from .checkpoint import CheckpointError, load_checkpoint
    from .data import default_data_dir
    from .recipes import make_config

    if path.suffix.lower() in TORCH_SUFFIXES:
        try:
            from reference.notebook_weights import load_notebook_state_dict
        except ImportError as error:
            raise RunError(f"{path} is a torch file; reading it needs torch and the reference "
                           f"package (pip install -e '.[reference]'): {error}") from None
        try:
            weights = load_notebook_state_dict(path)
        except ValueError as error:
            raise RunError(error) from None
        notebook = make_config("seed", data_dir=default_data_dir())
        return weights, dataclasses.asdict(notebook), "auto", None
    try:
        checkpoint = load_checkpoint(path, training_state=False)
    except CheckpointError as error:
        raise RunError(error) from None
    progress = checkpoint.progress
    return checkpoint.model, checkpoint.config, progress.get("dataset") or "auto", progress


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", type=path_argument,
                        help="a .npz checkpoint of numpylenet.train, or a torch state_dict (.pt/.pth) "
                             "of the notebook's LeNet")
    add_data_arguments(
        parser, dataset_choices=DATASET_CHOICES, download_default=True,
        dataset_help="test set [default: the one the checkpoint was trained on; auto for torch files]",
        data_dir_help="root holding MNIST/raw [default: the checkpoint's; for a torch file "
                      "$NUMPYLENET_DATA or ./data]")
    parser.add_argument("--eval-crop", choices=EVAL_CROPS, default=None,
                        help="centred test images, or the seed notebook's random crops "
                             "[default: as the model was trained]")
    add_backend_argument(parser, "compute backend")
    parser.add_argument("--out", type=path_argument, default=None, metavar="DIR",
                        help="where to write the confusion matrix and JSON [default: the checkpoint's folder]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_tool(parser, PROG, lambda: _evaluate(args))


def _output_folder(out: Path) -> Path:
    """``out``, created if needed and shown to be writable, so that no result is computed (and
    printed) only to fail at writing it."""
    from .files import writable_folder

    try:
        return writable_folder(out)
    except OSError as error:
        raise RunError(f"cannot write into {out}: {error.strerror}") from None


def _report_stem(out: Path, name: str, checkpoint: Path) -> str:
    """The name, without suffix, of the report of ``checkpoint`` in ``out``: ``name``, or if that
    report is another checkpoint's, ``name-2``, ``name-3``... the first that is free or this
    checkpoint's own. So two runs' ``best.npz`` evaluated into one folder keep both reports, and
    evaluating one checkpoint again replaces its own."""
    stem, number = name, 1
    while describe_path(out / f"{stem}.json")[0] and not _is_report_of(out / f"{stem}.json", checkpoint):
        number += 1
        stem = f"{name}-{number}"
    return stem


def _is_report_of(report: Path, checkpoint: Path) -> bool:
    """Whether ``report`` is an evaluation report naming ``checkpoint`` (the same file, however the
    paths are spelled); one that cannot be read is not."""
    try:
        with open_regular(report) as file:
            return Path(json.loads(file.read(1 << 20))["checkpoint"]).resolve() == checkpoint.resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from . import data
    from .cli import build_with_cache_recovery, compile_announcement, print_note
    from .files import json_text, write_text
    from .loop import Evaluation, NumpyLearner, evaluate_batches
    from .pipeline import (Stream, evaluation_batches, generator, load_dataset, load_splits, normalisation_text,
                           with_training_statistics)
    from .plots import plot_confusion_matrix
    from .recipes import make_config

    path = Path(args.checkpoint)
    weights, settings, trained_on, progress = _load(path)
    data_dir = args.data_dir or settings.get("data_dir", "data")
    try:
        config = make_config(settings.get("recipe", "default"), base=settings, backend=args.backend,
                             eval_crop=args.eval_crop, data_dir=data_dir, download=args.download)
    except ValueError as error:
        raise RunError(f"{path}: {error}") from None
    wanted = args.dataset or trained_on
    try:
        images, labels, dataset, fallback = load_dataset(wanted, data_dir, args.download, train=False)
        if config.normalize and config.normalize_mean is None:
            # A checkpoint from before runs saved their statistics: measure its training split again.
            config = with_training_statistics(config, load_splits(config, trained_on))
    except (OSError, data.DownloadError, ValueError) as error:
        raise RunError(load_error_text(error)) from None
    if len(labels) == 0:
        raise RunError(f"the {dataset} test set in {data_dir} holds no image")
    if fallback:
        print(f"{PROG}: WARNING: full MNIST is not available, evaluating on the BUNDLED mnist-sample "
              f"({len(labels):,} test images). Reason: {fallback}", file=sys.stderr)
    try:
        learner = build_with_cache_recovery(lambda: NumpyLearner(config), lambda text: print_note(PROG, text),
                                            compile_announcement(config.backend, config.dtype, config.optimizer))
    except ValueError as error:         # the backend (flag or $NUMPYLENET_BACKEND), not the file
        raise RunError(error) from None
    try:
        learner.load_state(weights, None)
    except ValueError as error:
        raise RunError(f"{path} does not hold LeNet-5 weights: {error}") from None
    out = _output_folder(Path(args.out) if args.out else path.parent)
    test: Evaluation = evaluate_batches(learner, evaluation_batches(
        images, labels, config, rng=generator(config.seed, Stream.TEST)))
    matrix = confusion_matrix(labels, test.predictions)
    totals = matrix.sum(axis=1)
    per_class = per_class_accuracy(matrix)

    when = ("" if progress is None else f" (after epoch {progress['epoch']})" if progress["step"] == 0
            else f" (epoch {progress['epoch'] + 1}, after step {progress['step']})")
    print(f"{path}{when} on the {dataset} test set ({len(labels):,} images, {config.eval_crop} crops"
          f"{normalisation_text(config)}):")
    print(f"test loss {test.loss:.4f}  accuracy {100 * test.accuracy:.2f}% "
          f"({int(np.trace(matrix)):,}/{len(labels):,})")
    for label, accuracy in per_class.items():
        shown = f"{100 * accuracy:6.2f}%" if accuracy is not None else "     - "
        print(f"  class {label}: {shown}  ({matrix[int(label), int(label)]:,}/{totals[int(label)]:,})")
    # Named by what was evaluated: the checkpoint, the data set and, if not centred, the crops.
    stem = _report_stem(out, f"eval-{path.stem}-{dataset}" + ("" if config.eval_crop == "center"
                                                              else f"-{config.eval_crop}-crops"), path)
    plot_confusion_matrix(matrix, out / f"{stem}-confusion_matrix.png",
                          f"{path.name} on {dataset}: {100 * test.accuracy:.2f}% correct")
    # The checkpoint's point in its run: a later evaluation of a file of the same name (a run
    # trained on, or extended) shows that the weights differ.
    trained = {"epoch": progress["epoch"], "step": progress["step"]} if progress else None
    report = {"checkpoint": str(path), "trained": trained, "dataset": dataset, "dataset_fallback": fallback,
              "test_images": len(labels), "test_loss": test.loss, "test_accuracy": test.accuracy,
              "per_class_accuracy": per_class, "confusion_matrix": matrix.tolist(),
              "eval_crop": config.eval_crop, "normalize": config.normalize,
              "normalize_mean": config.normalize_mean, "normalize_std": config.normalize_std}
    write_text(out / f"{stem}.json", json_text(report) + "\n")
    print(f"wrote {out / (stem + '-confusion_matrix.png')} and {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
