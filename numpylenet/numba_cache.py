"""How every numpylenet kernel is compiled (:func:`kernel`), and Numba's on-disk cache made safe
for several processes compiling one kernel at once.

Numba keeps, for each cached kernel, an index file that maps every compiled signature to a data
file, and adds an entry by reading the index, taking the first free data-file number, and writing
both back. Two processes that compile two signatures of one kernel at the same moment can both
take number 1: the index then names one signature's machine code under the other's key, every
later load of that signature gets code compiled for other types, and every call fails with
"can't unbox array from PyObject into native value" until the cache is deleted. numpylenet does
run such processes: the test suite compiles float32 and float64 side by side
(``tests/conftest.py``), and :meth:`numpylenet.engine.NumbaLeNet5.compile`'s helper process
compiles small kernels (``gemm`` in two array layouts, for one) while the main process compiles
them too. Seen here on 2026-11-29: ``parameter_views``' float32 entry held its float64 code.

:class:`SafeFunctionCache` is Numba's own ``FunctionCache`` with both halves fixed:

* adding an entry holds an exclusive lock on a file beside the index (``fcntl.flock``; where
  there is no ``fcntl``, or the lock file cannot be opened, it goes unlocked as Numba does), so
  that the index's read-modify-write happens one process at a time;
* a loaded entry whose code is for other argument types than those asked for counts as a miss:
  Numba compiles the kernel and rewrites the entry, so a cache damaged before this fix heals.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from numba import njit
from numba.core import sigutils
from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.core.dispatcher import Dispatcher

try:
    import fcntl
except ImportError:     # not POSIX
    fcntl = None

__all__ = ["kernel", "SafeFunctionCache", "safe_cache"]


@contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the ``with`` block."""
    if fcntl is None:
        yield
        return
    try:
        handle = open(lock_path, "a")       # noqa: SIM115 (held for the whole block)
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)   # released when the file closes
        yield


class _LockedIndexDataCacheFile(IndexDataCacheFile):
    """Numba's index and data files, adding an entry under the index's lock."""

    def save(self, key, data) -> None:
        with _exclusive(self._index_path + ".lock"):
            super().save(key, data)


class SafeFunctionCache(FunctionCache):
    """Numba's cache of one kernel, safe when several processes save to it (see the module
    docstring)."""

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _LockedIndexDataCacheFile(cache_path=self._cache_path,
                                                     filename_base=self._impl.filename_base,
                                                     source_stamp=self._impl.locator.get_source_stamp())

    def has_index(self) -> bool:
        """Whether the kernel's index file exists: without it no signature can be in the cache.
        A look-up (``load_overload``) would tell for sure, but Numba first initialises its
        compiler for it (0.4 s here, most of it importing SciPy's BLAS when SciPy is installed)."""
        return os.path.exists(self._cache_file._index_path)

    def _load_overload(self, sig, target_context):
        compiled = super()._load_overload(sig, target_context)
        asked, _ = sigutils.normalize_signature(sig)
        if compiled is not None and tuple(compiled.signature.args) != tuple(asked):
            return None         # another signature's code under this key: compile it anew
        return compiled


def safe_cache(dispatcher):
    """Give a Numba dispatcher built with ``cache=True`` a :class:`SafeFunctionCache`; returns it.
    Anything else (the plain function that ``njit`` returns under ``NUMBA_DISABLE_JIT=1``) is
    returned as it is."""
    if isinstance(dispatcher, Dispatcher):
        dispatcher._cache = SafeFunctionCache(dispatcher.py_func)
    return dispatcher


def kernel(function=None, **options):
    """``numba.njit`` as every numpylenet kernel uses it: cached on disk, in a
    :class:`SafeFunctionCache`, and with NumPy's error model (x / 0 gives inf or nan as in NumPy;
    Numba's default Python model tests every division for zero to raise ZeroDivisionError, and
    that test stops LLVM vectorising the loop). Other ``njit`` options pass through."""
    options = {"cache": True, "error_model": "numpy", **options}

    def build(python_function):
        dispatcher = njit(**options)(python_function)
        return safe_cache(dispatcher) if options["cache"] else dispatcher

    return build if function is None else build(function)
