"""A training run's folder: claimed by one run at a time, never mixed with another run's files.

``numpylenet.train`` claims its folder (``--out``) before it loads data or compiles anything, with
:func:`claim_run_folder`:

1. the folder is created if needed (and removed again if the run fails before writing into it);
2. an exclusive lock is taken on ``.run.lock`` inside it (``flock``, held until the run ends and
   released by the kernel if the process dies, so a killed run never leaves a stale claim); the file
   names the holder - pid, host, start time, command - for the message a second run gets;
3. a folder that holds another run's outputs is refused: a fresh run, or a resumed run writing into
   a new folder, needs a folder without them; a run resumed into its own folder must be resumed
   from that folder's ``last.npz`` (resuming its ``best.npz`` there would overwrite the later epochs);
4. temporaries that killed writes left behind (``.last.npz.1a2b3c4d.tmp``...) are removed.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .cli import RunError
from .files import make_folders, remove_empty_folders, remove_temporaries

__all__ = ["FIGURES", "OUTPUTS", "LOCK_NAME", "RunFolder", "claim_run_folder"]

FIGURES = ("learning_curves.png", "predictions.png", "confusion_matrix.png", "conv1_filters.png")
OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "last.npz", "best.npz", *FIGURES)
LOCK_NAME = ".run.lock"


@dataclass
class RunFolder:
    """A claimed run folder. ``removed_temporaries``: stale temporaries deleted when claiming."""

    path: Path
    removed_temporaries: list[Path]


@contextmanager
def claim_run_folder(folder: Path, resuming: Path | None = None) -> Iterator[RunFolder]:
    """Claim ``folder`` for one run for the duration of the block (see the module docstring).

    Parameters
    ----------
    folder : the run folder (``--out``)
    resuming : the checkpoint a resumed run continues from, or None for a fresh run

    Raises
    ------
    RunError
        The folder cannot be created or written (read-only, a file in the way, no permission), another
        live run holds it, or it holds another run's outputs.
    """
    try:
        created = make_folders(folder)
    except OSError as error:
        raise RunError(f"cannot create the run folder {folder}: {error.strerror}") from None
    try:
        lock = _lock(folder)
    except BaseException:
        remove_empty_folders(created)
        raise
    try:
        _check_outputs(folder, resuming)
        yield RunFolder(folder, remove_temporaries(folder, OUTPUTS))
    except BaseException:
        _release(folder, lock)
        remove_empty_folders(created)
        raise
    _release(folder, lock)


def _lock(folder: Path) -> int:
    """An open descriptor of ``folder/LOCK_NAME`` holding an exclusive flock, its content naming us."""
    path = folder / LOCK_NAME
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise RunError(f"cannot write to the run folder {folder}: {error.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(handle)
            os.close(handle)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunError(f"cannot lock the run folder {folder}: {error.strerror}") from None
            raise RunError(f"{folder} is in use by another run ({holder}); wait for it to end, or "
                           f"choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:   # else the holder we waited for removed the file as we opened it: lock anew
            break
        os.close(handle)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv}
    try:
        os.ftruncate(handle, 0)
        os.write(handle, json.dumps(holder).encode())
    except OSError as error:
        _release(folder, handle)
        raise RunError(f"cannot write to the run folder {folder}: {error.strerror}") from None
    return handle


def _read_holder(handle: int) -> str:
    try:
        holder = json.loads(os.pread(handle, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _release(folder: Path, handle: int) -> None:
    """Remove the lock file while still holding the lock (a run that opened it meanwhile sees, once
    it gets the lock, that the file is gone, and locks a new one), then let go."""
    try:
        (folder / LOCK_NAME).unlink(missing_ok=True)
    except OSError:
        pass
    os.close(handle)


def _check_outputs(folder: Path, resuming: Path | None) -> None:
    present = [name for name in OUTPUTS if (folder / name).exists() or (folder / name).is_symlink()]
    if not present:
        return
    last = folder / "last.npz"
    if resuming is None or not _same_file(resuming.parent, folder):
        advice = (f"continue it with --resume {shlex.quote(str(last))}" if last.exists()
                  else "remove it")
        raise RunError(f"{folder} already holds a run ({', '.join(present)}); choose another --out, "
                       f"or {advice}")
    if last.exists() and not _same_file(resuming, last):
        raise RunError(f"{folder} holds a run whose last checkpoint is {last}; resuming {resuming} into "
                       f"the same folder would overwrite what came after it. Resume "
                       f"{shlex.quote(str(last))}, or give --out a new folder to branch off")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
