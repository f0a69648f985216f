"""NumPy's own OpenBLAS, opened with ctypes: its ``?gemm`` for the Numba kernels, its thread count.

NumPy's wheels bundle OpenBLAS with 64-bit integers and prefixed names (``scipy_cblas_sgemm64_``);
a NumPy built against a system OpenBLAS exports ``cblas_sgemm64_``. This module finds that library
once, at import, and needs nothing but NumPy and ctypes, so the thread count can be set on the
NumPy backend too, where Numba may be missing. If no such OpenBLAS is found (a NumPy built on MKL
or Accelerate), ``LIBRARY`` is None: the numba backend is then unavailable, and
:func:`blas_threads` / :func:`set_blas_threads` do nothing.
"""
from __future__ import annotations

import ctypes
import glob
import os
from typing import NamedTuple

import numpy as np

__all__ = ["OpenBLAS", "LIBRARY", "gemm_address", "blas_threads", "set_blas_threads"]


class OpenBLAS(NamedTuple):
    """The OpenBLAS library NumPy uses: the loaded library, its file, and how its symbols are named
    (``f"{prefix}cblas_sgemm{suffix}"``)."""
    library: ctypes.CDLL
    path: str
    prefix: str
    suffix: str


def _find_openblas() -> OpenBLAS | None:
    """Open the OpenBLAS that NumPy's wheel bundles and return it as an :class:`OpenBLAS`, or None
    if none is found that exports both ``cblas_sgemm`` and ``cblas_dgemm`` (64-bit integer API)."""
    numpy_dir = os.path.dirname(np.__file__)
    candidates = []
    for folder in (os.path.join(numpy_dir, os.pardir, "numpy.libs"), os.path.join(numpy_dir, ".dylibs")):
        candidates += sorted(glob.glob(os.path.join(folder, "*openblas*")))
    for path in candidates:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_", "64_"), ("", "64_")):
            if all(hasattr(library, f"{prefix}cblas_{letter}gemm{suffix}") for letter in "sd"):
                return OpenBLAS(library, path, prefix, suffix)
    return None


LIBRARY = _find_openblas()


def gemm_address(letter: str) -> int:
    """The address of ``cblas_?gemm`` (``letter`` "s" or "d"), for the Numba kernels to call."""
    function = getattr(LIBRARY.library, f"{LIBRARY.prefix}cblas_{letter}gemm{LIBRARY.suffix}")
    return ctypes.cast(function, ctypes.c_void_p).value


def _threads_function(kind: str):
    """OpenBLAS's ``openblas_{kind}_num_threads``, or None."""
    if LIBRARY is None:
        return None
    return getattr(LIBRARY.library, f"{LIBRARY.prefix}openblas_{kind}_num_threads{LIBRARY.suffix}", None)


_get_threads, _set_threads = _threads_function("get"), _threads_function("set")
if _get_threads is not None and _set_threads is not None:
    _set_threads.argtypes, _get_threads.restype = [ctypes.c_int], ctypes.c_int
else:
    _get_threads = _set_threads = None


def blas_threads() -> int | None:
    """The number of threads NumPy's OpenBLAS uses, or None if it cannot be queried."""
    return None if _get_threads is None else int(_get_threads())


def set_blas_threads(count: int) -> None:
    """Set the number of threads of NumPy's OpenBLAS (a no-op when it cannot be found)."""
    if _set_threads is not None:
        _set_threads(int(count))
