"""One epoch of the seed recipe end to end: numpylenet against the notebook's own torch pipeline.

    python -m benchmarks.epoch [--backends numba numpy] [--data-dir DIR] [--threads 2] [--repeats 3]
                               [--quick] [--out DIR]

Each contender does everything one epoch of ``--recipe seed`` does, from reading the IDX files to
the test accuracy: load and split the data, augment every training batch (random crop + flip), train
one epoch (batch 32, Adam 1e-4), validate, evaluate the test set. The contenders:

* ``numpylenet (<backend>)``: ``numpylenet.train``'s own pieces - :func:`numpylenet.pipeline.load_splits`,
  :class:`numpylenet.loop.NumpyLearner`, :func:`numpylenet.loop.fit` (which also writes its
  checkpoints), :func:`numpylenet.loop.evaluate_batches` - once per backend in ``--backends``;
* ``torch, numpylenet's pipeline``: the same loop and data with ``reference.train``'s torch learner,
  i.e. what the torch model costs when fed numpylenet's vectorised data pipeline;
* ``torch, notebook's DataLoader pipeline``: ``reference.seed_notebook.main``, the notebook's code
  unchanged - torchvision transforms image by image and a DataLoader with 4 worker processes.

The contenders run round-robin, ``--repeats`` times (default 3: an epoch is a long measurement),
after a warm-up on a few batches; the table shows the median. ``--quick`` uses the bundled
mnist-sample with a few hundred training images (the notebook's pipeline has no such limit, so in
quick mode it trains on all 5,400 sample images: that row is not comparable then).
Writes ``epoch.json``.
"""
from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from benchmarks import common
from numpylenet.names import BACKEND_NAMES

NAME = "epoch"
NOTEBOOK = "torch, notebook's DataLoader pipeline"
TORCH_OURS = "torch, numpylenet's pipeline"
QUICK_TRAIN_IMAGES = 320
WARMUP_TRAIN_IMAGES = 64
PHASES = ("load", "setup", "train", "validate", "test")


def numpylenet_pipeline_epoch(make_learner: Callable, config) -> dict:
    """One epoch of ``config`` through numpylenet's data pipeline and training loop.

    Returns the seconds of each phase - load (read and split the data), setup (build the learner),
    train, validate (with the loop's end-of-epoch checkpoints), test - their total and the test
    accuracy. The loop's progress bar is silenced.
    """
    from numpylenet.loop import Progress, StopOnInterrupt, evaluate_batches, fit
    from numpylenet.pipeline import Stream, evaluation_batches, generator, load_splits, with_training_statistics

    started = time.perf_counter()
    splits = load_splits(config)
    config = with_training_statistics(config, splits)
    loaded = time.perf_counter()
    learner = make_learner(config)
    ready = time.perf_counter()
    history: list[dict] = []
    with tempfile.TemporaryDirectory() as folder, StopOnInterrupt() as stop, \
            contextlib.redirect_stderr(io.StringIO()):
        fit(learner, config, splits, Path(folder), Progress(dataset=splits.dataset), history, stop,
            on_epoch=lambda record: None)
    trained = time.perf_counter()
    test = evaluate_batches(learner, evaluation_batches(splits.test_images, splits.test_labels, config,
                                                        rng=generator(config.seed, Stream.TEST)))
    finished = time.perf_counter()
    record = history[-1]
    train_seconds = len(splits.train_images) / record["train_images_per_second"]
    return {"load": loaded - started, "setup": ready - loaded, "train": train_seconds,
            "validate": (trained - ready) - train_seconds, "test": finished - trained,
            "total": finished - started, "test_accuracy": test.accuracy,
            "train_images": len(splits.train_images), "dataset": splits.dataset}


def notebook_epoch(root: Path, cache: Path, seed: int) -> dict:
    """One epoch of the seed notebook's own code (``reference.seed_notebook``), its output silenced."""
    from reference import seed_notebook

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # The notebook asks for 4 DataLoader workers on 2 cores; torch warns, the notebook ran so.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        result = seed_notebook.main(["--data-dir", str(root), "--cache-dir", str(cache),
                                     "--seed", str(seed), "--epochs", "1"])
    return {"total": result["seconds"], "test_accuracy": result["test_accuracy"]}


def contenders(args, scratch: Path) -> dict[str, Callable[[], dict]]:
    """Name -> a function running one full epoch and returning its figures (warmed up already)."""
    from numpylenet.loop import NumpyLearner
    from numpylenet.recipes import make_config
    from reference.train import TorchLearner

    def config(backend: str | None, limit: int | None):
        return make_config("seed", dataset="mnist-sample" if args.quick else "mnist",
                           data_dir=str(common.data_dir(args.data_dir)), download=False,
                           backend=backend, threads=args.threads, seed=0, limit_train=limit)

    limit = QUICK_TRAIN_IMAGES if args.quick else None
    learners = {f"numpylenet ({backend})": (NumpyLearner, backend) for backend in args.backends}
    learners[TORCH_OURS] = (TorchLearner, None)
    runs = {name: (lambda learner=learner, backend=backend:
                   numpylenet_pipeline_epoch(learner, config(backend, limit)))
            for name, (learner, backend) in learners.items()}
    # Warm-up: a few batches each, so imports, JIT (or its disk cache) and the data files are hot.
    for learner, backend in learners.values():
        numpylenet_pipeline_epoch(learner, config(backend, WARMUP_TRAIN_IMAGES))
    if not args.no_notebook:
        root, cache = notebook_root(args, scratch)
        runs[NOTEBOOK] = lambda: notebook_epoch(root, cache, seed=0)
    return runs


def notebook_root(args, scratch: Path) -> tuple[Path, Path]:
    """A root whose ``MNIST/raw`` torchvision can read, and where to decompress the IDX files.

    Normally the data folder and a cache shared by every run (``reference.seed_notebook``'s own
    default); in quick mode a scratch folder pointing at the bundled sample, and a scratch cache.
    """
    if not args.quick:
        return common.data_dir(args.data_dir), Path(tempfile.gettempdir()) / "numpylenet-torchvision"
    from numpylenet import data

    sample = Path(data.__file__).parent / "datasets" / "MNIST-sample" / "raw"
    (scratch / "MNIST").mkdir(parents=True, exist_ok=True)
    (scratch / "MNIST" / "raw").symlink_to(sample, target_is_directory=True)
    return scratch, scratch / "torchvision-cache"


def summarise(figures: dict[str, list[dict]]) -> dict[str, dict]:
    """Per contender: the median of each phase and of the total, and every run's figures."""
    summary = {}
    for name, runs in figures.items():
        entry = {"median_seconds": statistics.median(run["total"] for run in runs),
                 "test_accuracy": [run["test_accuracy"] for run in runs], "runs": runs,
                 "phases": {phase: statistics.median(run[phase] for run in runs)
                            for phase in PHASES if phase in runs[0]}}
        if "train_images" in runs[0]:
            entry["train_images"] = runs[0]["train_images"]
        summary[name] = entry
    return summary


def markdown(summary: dict[str, dict], comparable: bool = True) -> str:
    """The table; without ``comparable`` (quick runs, where the notebook trains on more images)
    the speed column stays empty."""
    baseline = summary.get(NOTEBOOK, {}).get("median_seconds") if comparable else None
    headers = ["pipeline", "epoch total (s)", *(f"{phase} (s)" for phase in PHASES), "test accuracy",
               "speed vs notebook"]
    rows = []
    for name, entry in summary.items():
        phases = [f"{entry['phases'][phase]:.2f}" if phase in entry["phases"] else "" for phase in PHASES]
        accuracy = statistics.mean(entry["test_accuracy"])
        speed = f"{baseline / entry['median_seconds']:.2f}x" if baseline else ""
        rows.append([name, f"{entry['median_seconds']:.2f}", *phases, f"{100 * accuracy:.2f}%", speed])
    return common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = common.make_parser(NAME, __doc__.splitlines()[0], repeats=3)
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKEND_NAMES,
                        help="numpylenet backends to time (default: numba and numpy; numpy only "
                             "when numba cannot run)")
    parser.add_argument("--data-dir", default=None,
                        help="root holding MNIST/raw (default $NUMPYLENET_DATA, else ../shared/data)")
    parser.add_argument("--no-notebook", action="store_true",
                        help="leave out the notebook's own pipeline")
    args = parser.parse_args(argv)
    if args.backends is None:
        from numpylenet.backend import numba_unavailable_reason

        args.backends = ["numba", "numpy"] if numba_unavailable_reason() is None else ["numpy"]
    common.set_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="numpylenet-epoch-") as scratch:
        runs = contenders(args, Path(scratch))
        figures: dict[str, list[dict]] = {name: [] for name in runs}
        timed = {name: (lambda name=name: figures[name].append(runs[name]())) for name in runs}
        common.interleaved_timings(timed, args.repeats, warmup=0)
    # Each numpylenet learner sets these threads as it is built; a TorchLearner leaves Numba's data
    # kernels on one thread (reference.train says why). The JSON records the numpylenet rows' threads,
    # whichever contender ran last.
    common.set_threads(args.threads)
    summary = summarise(figures)
    note = ("" if not args.quick else
            f"--quick: numpylenet rows train on {QUICK_TRAIN_IMAGES} images; the notebook's row "
            f"on the whole sample: not comparable.")
    return common.publish(args, NAME, {
        "recipe": "seed", "dataset": "mnist-sample" if args.quick else "mnist",
        "train_images": next((e["train_images"] for e in summary.values() if "train_images" in e), None),
        "unit": "seconds per epoch (median)", "contenders": summary, "markdown": markdown(summary, comparable=not args.quick)},
        note)


if __name__ == "__main__":
    main()
