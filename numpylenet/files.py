"""Files in and out: outputs that appear whole or not at all, inputs that are what they claim to be.

Every file numpylenet writes (checkpoints, JSON, figures, data files) goes through
:func:`atomic_write`, and every data or checkpoint file it reads is opened by :func:`open_regular`:

* :func:`atomic_write` writes to a temporary ``.<name>.<random>.tmp`` in the destination's folder,
  flushes it to disk and renames it over the destination, so an interruption (Ctrl-C, SIGKILL, a full
  disk) never leaves a half-written file under the real name. The temporary is created with mode
  ``0o666`` filtered by the umask, the mode ``open(path, "w")`` gives, so every output gets the same
  file mode. A failure of the storage itself (read-only, full, no permission, a file where a folder
  should be) becomes a :class:`WriteError` whose message is one line naming the file.
* :func:`open_regular` opens a file for reading only if it is a regular file, without ever blocking:
  a FIFO, a directory, a device, a symbolic-link loop or a broken link is reported as what it is.
* :func:`json_text` writes JSON that every parser reads: NaN and infinities become ``null``.

This module imports nothing from numpylenet, so every other module may use it.
"""
from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["WriteError", "atomic_write", "check_writable", "writable_folder", "write_text", "temporary_files", "remove_temporaries",
           "open_regular", "describe_path", "make_folders", "remove_empty_folders", "json_text",
           "finite_or_none"]

TEMPORARY_SUFFIX = ".tmp"
# errno values that can only mean "the storage refused to take the bytes" when raised while the
# caller writes into the file: anything else raised in the block (a dropped download is an OSError
# too) stays what it is. Errors of atomic_write's own steps (create, flush, fsync, rename) are all
# WriteErrors.
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})


class WriteError(OSError):
    """An output could not be written; ``str()`` is one line: ``cannot write PATH: REASON``."""

    def __init__(self, path: str | os.PathLike, error: OSError):
        super().__init__(error.errno, error.strerror or str(error))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror}"


@contextmanager
def atomic_write(destination: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file that replaces ``destination`` when the block ends without an exception.

    Parameters
    ----------
    destination : the file to (re)place; its folder must exist
    mode : ``"wb"`` or ``"w"`` (text, UTF-8)

    Raises
    ------
    WriteError
        The storage refused: read-only file system, disk full, permission denied, the folder is a
        file... The temporary is gone and ``destination`` is as it was.
    """
    destination = Path(destination)
    temporary = destination.parent / f".{destination.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as error:
        raise WriteError(destination, error) from None
    in_block = False
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            in_block = True
            yield file
            in_block = False
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, destination)
    except BaseException as error:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(error, OSError) and not isinstance(error, WriteError) and (
                not in_block or error.errno in WRITE_ERRORS):
            raise WriteError(destination, error) from None
        raise


def make_folders(folder: str | os.PathLike) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, innermost first (for
    :func:`remove_empty_folders` to undo).

    Raises OSError whose ``str()`` is the reason in words: "Read-only file system", "it is a regular
    file, not a folder", "cannot be reached: X is a file, not a folder"...
    """
    folder = Path(folder)
    missing = [path for path in (folder, *folder.parents) if not path.is_dir()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        exists, what = describe_path(folder)
        reason = (f"it {what}, not a folder" if exists and what != "is a directory" else
                  what if not exists and what != "does not exist" else error.strerror)
        raise OSError(error.errno, reason) from None
    return missing


def remove_empty_folders(created: Iterable[Path]) -> None:
    """Remove the folders :func:`make_folders` created, innermost first, stopping at the first one
    that has received anything."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return


def check_writable(folder: str | os.PathLike) -> None:
    """WriteError unless a file can be created in ``folder`` (tried with a temporary, removed at once),
    so that a tool can refuse before it computes anything rather than fail when it writes."""
    probe = Path(folder) / f".write-test.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        probe.unlink()
    except OSError as error:
        raise WriteError(folder, error) from None


def writable_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path, created if needed (:func:`make_folders`) and shown to be writable
    (:func:`check_writable`): what a tool calls before it computes anything. Raises OSError whose
    ``strerror`` is the reason in words."""
    folder = Path(folder)
    make_folders(folder)
    check_writable(folder)
    return folder


def write_text(destination: str | os.PathLike, text: str) -> None:
    """``destination.write_text(text)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(destination, "w") as file:
        file.write(text)


def temporary_files(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """The temporaries :func:`atomic_write` left in ``folder`` for the outputs ``names`` (after a kill)."""
    folder = Path(folder)
    return sorted(path for name in names for path in folder.glob(f".{name}.*{TEMPORARY_SUFFIX}")
                  if path.is_file())


def remove_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the stale temporaries of ``names`` in ``folder``; returns what was removed.

    Only call this while no other process may be writing those outputs (for a run folder: with
    the folder claimed, see :mod:`numpylenet.run_folder`).
    """
    removed = []
    for path in temporary_files(folder, names):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise WriteError(path, error) from None
    return removed


# --------------------------------------------------------------------------------------------
# Reading

# What can stand at a path instead of a regular file, as the end of "PATH is ...".
NON_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((kind for test, kind in NON_REGULAR if test(mode)), "not a regular file")


def describe_path(path: str | os.PathLike) -> tuple[bool, str]:
    """(whether anything is at ``path``, what it is as the end of a sentence), never blocking.

    The sentence ends are "is a regular file", "does not exist", "cannot be reached: X is a file,
    not a folder" (nothing is there, and nothing can be), "is a broken symbolic link", "is a
    symbolic link loop", "is a directory", "is a FIFO (named pipe)", ...
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return (True, "is a broken symbolic link") if path.is_symlink() else (False, "does not exist")
    except OSError as error:
        if error.errno == errno.ELOOP:
            return True, "is a symbolic link loop"
        if error.errno == errno.ENOTDIR:
            blocker = next((parent for parent in path.parents
                            if parent.exists() and not parent.is_dir()), None)
            if blocker is None:
                return False, "cannot be reached: part of its path is not a folder"
            what = describe_path(blocker)[1].removeprefix("is ").replace("a regular file", "a file")
            return False, f"cannot be reached: {blocker} is {what}, not a folder"
        return True, f"cannot be examined ({error.strerror})"
    return True, "is a regular file" if stat.S_ISREG(mode) else f"is {_kind(mode)}"


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """Open ``path`` for binary reading if it is a regular file (following symbolic links).

    Opened non-blocking first, so a FIFO cannot hang the call, then checked with ``fstat`` on the
    open descriptor (no window for the file to be swapped in between).

    Raises
    ------
    FileNotFoundError
        Nothing there, or a broken symbolic link; the message says which.
    OSError
        Anything else that is not a readable regular file: directory, FIFO, device, link loop,
        no permission. The message is one sentence naming ``path`` and what it is.
    """
    path = Path(path)
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        exists, what = describe_path(path)
        if not exists or what == "is a broken symbolic link":
            raise FileNotFoundError(f"{path} {what}") from None
        if what == "is a regular file":   # there, but the open failed (no permission, ...)
            what = f"cannot be read ({error.strerror})"
        raise OSError(f"{path} {what}") from None
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        raise OSError(f"{path} is {_kind(mode)}, not a regular file")
    os.set_blocking(handle, True)
    return os.fdopen(handle, "rb")


# --------------------------------------------------------------------------------------------
# JSON

def finite_or_none(value):
    """``value`` with every NaN or infinite float (at any depth of dicts, lists, tuples) replaced by
    None, and NumPy scalars turned into Python numbers."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:   # a NumPy scalar
        return finite_or_none(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def json_text(content, indent: int | None = 2) -> str:
    """Standard JSON for ``content``: NaN and +-inf written as ``null`` (JSON has no such numbers;
    Python's ``json`` would write the non-standard tokens ``NaN`` and ``Infinity``)."""
    return json.dumps(finite_or_none(content), indent=indent, allow_nan=False)
