"""Evaluate trained weights on a test set: ``python -m numpylenet.evaluate CHECKPOINT [options]``.

CHECKPOINT is a ``.npz`` checkpoint written by ``numpylenet.train`` (or ``reference.train``), or a
torch ``state_dict`` file (``.pt``/``.pth``) saved from the seed notebook's ``LeNet`` with
``torch.save(model.state_dict(), path)``; the latter is read through ``reference`` (needs torch;
loaded with ``weights_only=True``, so nothing is unpickled but tensors).

The test images are prepared as the model was trained to see them: a checkpoint's recipe settings
(normalisation, centred or random crops - the random ones drawn exactly as ``numpylenet.train`` drew
them, so its reported accuracy is reproduced), or for a notebook ``state_dict`` the notebook's own
settings. Prints the test loss, the accuracy and the accuracy of every class, and writes the
confusion matrix (PNG) and the figures (JSON) next to the checkpoint or into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .recipes import BACKENDS, DATASET_CHOICES, EVAL_CROPS
from .train import OneLineErrorParser, RunError

__all__ = ["main", "confusion_matrix", "load_weights"]

PROG = "python -m numpylenet.evaluate"
TORCH_SUFFIXES = (".pt", ".pth")


def confusion_matrix(labels, predictions, num_classes: int = 10):
    """Counts ``matrix[t, p]`` of images of true class t predicted as p; shape (K, K), int64."""
    import numpy as np

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return np.bincount(labels * num_classes + predictions,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def load_weights(path: Path) -> tuple[dict, dict, str]:
    """The weights in ``path``, the settings they were trained with, and the data set.

    Returns
    -------
    weights : dict of str to ndarray, torch's names (conv1.weight ... fc2.bias)
    settings : dict, a ``TrainConfig`` as a dict (for a notebook state_dict: the seed recipe)
    dataset : the data set trained on ("auto" when unknown)

    Raises
    ------
    RunError
        Unreadable file, or a torch file without torch installed.
    """
    import dataclasses
    import os

    from .checkpoint import CheckpointError, load_checkpoint
    from .recipes import make_config

    if path.suffix in TORCH_SUFFIXES:
        try:
            from reference.notebook_weights import load_notebook_state_dict
        except ImportError as error:
            raise RunError(f"{path} is a torch file; reading it needs torch and the reference "
                           f"package (pip install -e '.[reference]'): {error}") from None
        try:
            weights = load_notebook_state_dict(path)
        except ValueError as error:
            raise RunError(error) from None
        notebook = make_config("seed", data_dir=os.environ.get("NUMPYLENET_DATA", "data"))
        return weights, dataclasses.asdict(notebook), "auto"
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise RunError(error) from None
    return checkpoint.model, checkpoint.config, checkpoint.progress.get("dataset") or "auto"


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a .npz checkpoint of numpylenet.train, or a torch state_dict (.pt/.pth) "
                             "of the notebook's LeNet")
    parser.add_argument("--dataset", choices=DATASET_CHOICES, default=None,
                        help="test set [default: the one the checkpoint was trained on; auto for torch files]")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="root holding MNIST/raw [default: the checkpoint's; for a torch file "
                             "$NUMPYLENET_DATA or ./data]")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                        help="download missing data files")
    parser.add_argument("--eval-crop", choices=EVAL_CROPS, default=None,
                        help="centred test images, or the seed notebook's random crops "
                             "[default: as the model was trained]")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="compute backend")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where to write the confusion matrix and JSON [default: the checkpoint's folder]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _evaluate(args)
    except RunError as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    return 0


def _evaluate(args: argparse.Namespace) -> None:
    import numpy as np

    from . import data
    from .loop import Evaluation, NumpyLearner, evaluate
    from .pipeline import Stream, evaluation_batches, generator, load_dataset
    from .plots import plot_confusion_matrix
    from .recipes import make_config

    path = Path(args.checkpoint)
    weights, settings, trained_on = load_weights(path)
    data_dir = args.data_dir or settings.get("data_dir", "data")
    try:
        config = make_config(settings.get("recipe", "default"), base=settings, backend=args.backend,
                             eval_crop=args.eval_crop, data_dir=data_dir, download=args.download)
    except ValueError as error:
        raise RunError(f"{path}: {error}") from None
    wanted = args.dataset or trained_on
    try:
        images, labels, dataset, fallback = load_dataset(wanted, data_dir, args.download, train=False)
    except (FileNotFoundError, data.DownloadError, ValueError) as error:
        raise RunError(" ".join(str(error).split())) from None
    if fallback:
        print(f"{PROG}: WARNING: full MNIST is not available, evaluating on the BUNDLED mnist-sample "
              f"({len(labels):,} test images). Reason: {fallback}", file=sys.stderr)
    learner = NumpyLearner(config)
    try:
        learner.load_state(weights, None)
    except ValueError as error:
        raise RunError(f"{path} does not hold LeNet-5 weights: {error}") from None
    test: Evaluation = evaluate(learner, evaluation_batches(
        images, labels, config, dataset, rng=generator(config.seed, Stream.TEST)))
    matrix = confusion_matrix(labels, test.predictions)
    totals = matrix.sum(axis=1)
    per_class = np.diag(matrix) / np.maximum(totals, 1)

    print(f"{path} on the {dataset} test set ({len(labels):,} images, {config.eval_crop} crops"
          f"{', normalised' if config.normalize else ''}):")
    print(f"test loss {test.loss:.4f}  accuracy {100 * test.accuracy:.2f}% "
          f"({int(np.trace(matrix)):,}/{len(labels):,})")
    for label in range(len(matrix)):
        print(f"  class {label}: {100 * per_class[label]:6.2f}%  ({matrix[label, label]:,}/{totals[label]:,})")
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{path.stem}-{dataset}"
    plot_confusion_matrix(matrix, out / f"{stem}-confusion_matrix.png",
                          f"{path.name} on {dataset}: {100 * test.accuracy:.2f}% correct")
    report = {"checkpoint": str(path), "dataset": dataset, "dataset_fallback": fallback,
              "test_images": len(labels), "test_loss": test.loss, "test_accuracy": test.accuracy,
              "per_class_accuracy": {str(k): float(v) for k, v in enumerate(per_class)},
              "confusion_matrix": matrix.tolist(), "eval_crop": config.eval_crop,
              "normalize": config.normalize}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / (stem + '-confusion_matrix.png')} and {out / (stem + '.json')}")


if __name__ == "__main__":
    sys.exit(main())
