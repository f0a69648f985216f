"""What the command-line tools ``numpylenet.train`` and ``numpylenet.evaluate`` share.

* :class:`OneLineErrorParser` and :class:`RunError`: every problem a user can fix is one line on
  stderr and exit status 2 (:func:`run_tool` maps the exceptions to exit statuses);
* the argparse value types and the common data flags (``--dataset``, ``--data-dir``, ``--download``);
* :func:`load_error_text`: a data or checkpoint error as the one line it is reported as;
* :func:`confusion_matrix` and :func:`per_class_accuracy`, the report both tools print;
* :func:`build_with_cache_recovery`: building the learner (where Numba compiles or loads its disk
  cache), saying at once when that turns into a compile (:func:`compile_announcement`), and
  recovering from an unreadable cache entry by discarding it and compiling again.

Exit statuses: 0 done, 1 training diverged, 2 bad command line, data, checkpoint or output folder,
128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM).

This module imports only the standard library and numpylenet.backend (which importing the package
has loaded already) at load time, so ``--help`` stays instant.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from .backend import COMPILE_SECONDS, resolve_backend
from .backend import available_cores  # noqa: F401  (re-exported: train and evaluate use it from here)
from .names import BACKEND_NAMES

__all__ = ["OneLineErrorParser", "RunError", "run_tool", "positive_int", "non_negative_int",
           "positive_float", "non_negative_float", "open_fraction", "path_argument",
           "add_data_arguments", "add_backend_argument", "load_error_text", "confusion_matrix",
           "per_class_accuracy", "available_cores", "build_with_cache_recovery", "backend_or_numpy",
           "compile_announcement", "ANNOUNCE_AFTER_SECONDS", "print_note"]

T = TypeVar("T")


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``prog: error: message (see --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class RunError(Exception):
    """A problem with the data, a checkpoint or the output folder, reported as one line, exit 2."""


def run_tool(parser: argparse.ArgumentParser, prog: str, body: Callable[[], int]) -> int:
    """Run a tool's ``body`` with SIGTERM raising :class:`numpylenet.loop.Terminated` (as SIGINT raises
    KeyboardInterrupt), and turn what escapes into exit statuses: RunError and unwritable outputs
    exit 2 with one line, Ctrl-C 130, SIGTERM 143, a closed output pipe 141 (quietly)."""
    from .files import WriteError
    from .loop import Terminated

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return body()
    except BrokenPipeError:
        # The reader of the output went away (``| head``): stop as a killed writer does, without
        # the traceback Python would print when flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (RunError, WriteError) as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(128 + signal.SIGINT, f"{prog}: interrupted\n")
    except Terminated:
        parser.exit(128 + signal.SIGTERM, f"{prog}: terminated (SIGTERM)\n")
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------
# Argument types and shared flags

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
finite_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
open_fraction = _number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def path_argument(text: str) -> str:
    """An argparse ``type=`` for a file or folder: anything but the empty string (which would
    silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def add_data_arguments(group, *, dataset_choices: Sequence[str], dataset_help: str,
                       data_dir_help: str, download_default: bool | None) -> None:
    """``--dataset``, ``--data-dir`` and ``--download`` (both tools read their data alike)."""
    group.add_argument("--dataset", choices=dataset_choices, default=None, help=dataset_help)
    group.add_argument("--data-dir", type=path_argument, default=None, metavar="DIR", help=data_dir_help)
    group.add_argument("--download", action=argparse.BooleanOptionalAction, default=download_default,
                       help="download missing data files from torchvision's mirrors [default: yes]")


def add_backend_argument(group, help_text: str = "compute backend [default: $NUMPYLENET_BACKEND, "
                                                 "else numba if it imports]") -> None:
    group.add_argument("--backend", choices=BACKEND_NAMES, default=None, help=help_text)


def load_error_text(error: BaseException) -> str:
    """A data-loading error as one line (download errors list mirrors over several lines)."""
    return " ".join(str(error).split())


# --------------------------------------------------------------------------------------------
# The report both tools print

def confusion_matrix(labels, predictions, num_classes: int = 10):
    """Counts ``matrix[t, p]`` of images of true class t predicted as p; shape (K, K), int64."""
    import numpy as np

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return np.bincount(labels * num_classes + predictions,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(matrix) -> dict[str, float | None]:
    """The accuracy of each true class, ``matrix[k, k] / sum_p matrix[k, p]``, keyed by the class
    as a string (JSON keys); None for a class with no image (no accuracy to speak of)."""
    totals = matrix.sum(axis=1)
    return {str(k): (float(matrix[k, k] / totals[k]) if totals[k] else None) for k in range(len(matrix))}


# --------------------------------------------------------------------------------------------
# Numba's disk cache

# Loading every kernel from a warm Numba cache takes a few tenths of a second; a build still
# running after this long is compiling, and the user hears so while it does.
ANNOUNCE_AFTER_SECONDS = 1.0


def backend_or_numpy(name: str | None) -> str:
    """The backend ``name`` resolves to, or "numpy" when it cannot run (building the learner
    reports why)."""
    try:
        return resolve_backend(name)
    except ValueError:
        return "numpy"


def compile_announcement(backend: str | None, dtype: str, optimizer: str | None) -> str | None:
    """What to print while the learner's kernels compile: None unless ``backend`` resolves to
    numba (the numpy backend compiles nothing)."""
    if backend_or_numpy(backend) != "numba":
        return None
    what = dtype if optimizer is None else f"{dtype} and {optimizer}"
    return (f"compiling Numba kernels for {what}, once per machine: ~{COMPILE_SECONDS} s "
            f"(then cached on disk)")


def build_with_cache_recovery(build: Callable[[], T], note: Callable[[str], None],
                              announce: str | None = None) -> T:
    """``build()``, announcing a long compile, and recovering when Numba cannot read an entry of
    its on-disk cache.

    ``announce`` (if given) is printed as soon as ``build()`` has run for
    :data:`ANNOUNCE_AFTER_SECONDS` without finishing, that is, at the start of a compile and not
    after it; a build that loads its kernels from the cache finishes first and prints nothing.

    Numba pickles compiled kernels into ``.nbi`` (index) and ``.nbc`` (data) files, in the
    ``__pycache__`` beside the source or under ``$NUMBA_CACHE_DIR``; a file cut short (a kill
    while it was written, a full disk) makes the next load raise ``UnpicklingError``/``EOFError``.
    Such an error - recognised by being raised inside ``numba/core/caching.py`` - discards the
    entry it came from (its index and data files), says so through ``note``, and builds again,
    so Numba recompiles that kernel; any other error propagates unchanged.
    """
    from .loop import interruption

    timer = None
    if announce is not None:
        timer = threading.Timer(ANNOUNCE_AFTER_SECONDS, lambda: print(announce, flush=True))
        timer.daemon = True
        timer.start()
    held = _held_while_compiling()
    try:
        with held:
            built = _build_recovering(build, note, stop=lambda: held.requested != 0)
    finally:
        if timer is not None:
            timer.cancel()
    if held.requested:
        raise interruption(held.requested)
    return built


def _held_while_compiling():
    """A :class:`numpylenet.loop.StopOnInterrupt` for a build: the first Ctrl-C or SIGTERM waits for
    the build to end (what it compiled stays in the disk cache); a second one ends the process at
    once, with status 128 + the signal, as a kill would (the run folder's lock goes with it).

    Numba's compiler cannot be interrupted otherwise: a KeyboardInterrupt raised while it compiles
    lands, most of the time, in a ctypes callback of LLVM's, which drops it (the compile runs on),
    and else leaves a half-built library behind (a RuntimeError at the next step).
    """
    from .loop import SIGNAL_NAMES, StopOnInterrupt

    class HeldWhileCompiling(StopOnInterrupt):
        def _handle(self, signum, frame) -> None:
            if self.requested:
                print(f"\n{SIGNAL_NAMES[signum]} again: aborting the compile", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            super()._handle(signum, frame)

    return HeldWhileCompiling("once the Numba compile in progress is done, keeping it in the cache")


def _build_recovering(build: Callable[[], T], note: Callable[[str], None], stop: Callable[[], bool]) -> T:
    """:func:`build_with_cache_recovery` without the announcement and the signals; builds no more
    once ``stop()``."""
    discarded: set[Path] = set()
    while True:
        try:
            return build()
        except Exception as error:
            files, index = _bad_cache_entry(error)
            if index is None or index in discarded or stop():
                raise
            for path in files:
                path.unlink(missing_ok=True)
            discarded.add(index)
            note(f"Numba's disk cache entry {index} could not be read ({type(error).__name__}: "
                 f"{' '.join(str(error).split())}); discarded it ({len(files)} files) and compiled anew")


def _bad_cache_entry(error: BaseException) -> tuple[list[Path], Path | None]:
    """The files of the Numba cache entry whose loading raised ``error``, and its index file;
    ([], None) if ``error`` was not raised while Numba loaded its cache."""
    traceback = error.__traceback__
    cache_file = None
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_filename.endswith(os.path.join("numba", "core", "caching.py")):
            owner = frame.f_locals.get("self")
            if hasattr(owner, "_index_path"):   # numba's IndexDataCacheFile
                cache_file = owner
        traceback = traceback.tb_next
    if cache_file is None:
        return [], None
    index = Path(cache_file._index_path)
    stem = index.name.removesuffix(".nbi")
    return [index, *index.parent.glob(f"{stem}.*.nbc")], index


def print_note(prog: str, message: str) -> None:
    """``prog: note: message`` on stderr: something the user should know that is not an error."""
    print(f"{prog}: note: {message}", file=sys.stderr, flush=True)
