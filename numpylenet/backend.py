"""Choosing the compute backend, and the number of threads it runs on.

Two backends compute the same numbers:

* ``"numpy"``: the readable reference, layer by layer (:mod:`numpylenet.layers`);
* ``"numba"``: the whole network fused into two parallel kernels (:mod:`numpylenet.kernels`, run
  by :mod:`numpylenet.engine`), and the optimisers as one loop over the flat parameter buffer.

``LeNet5(backend=None)`` resolves the name with :func:`resolve_backend`: the environment variable
``NUMPYLENET_BACKEND`` if set, else ``"numba"`` when Numba imports (and NumPy's OpenBLAS can be
found), else ``"numpy"``. Nothing here imports Numba unless asked about it.
"""
from __future__ import annotations

import os

from .blas import set_blas_threads
from .names import BACKEND_NAMES

__all__ = ["ENVIRONMENT_VARIABLE", "resolve_backend", "numba_unavailable_reason", "available_cores",
           "thread_limit", "set_threads", "COMPILE_SECONDS"]

ENVIRONMENT_VARIABLE = "NUMPYLENET_BACKEND"

# What compiling the numba backend's kernels for one dtype and one optimiser into an empty Numba
# cache takes on an AMD EPYC (Zen 4, 2.6 GHz), the backward pass's per-thread kernel in a helper
# process on the second core (NumbaLeNet5.compile; ~12.5 s on one core; benchmarks/cold_start.py
# measures the whole cold start); loading them back from the cache takes well under a second.
# Nearly all of it is LLVM optimising and emitting machine code: each kernel once on its own,
# and again inside every kernel that calls it by name (Numba links callees into their caller's
# module). See numpylenet.kernels.KernelAddress for why the parallel kernel calls the network by
# address, and the kernels' module docstring for the layer kernels inlined into it.
COMPILE_SECONDS = 7


def numba_unavailable_reason() -> str | None:
    """None if the numba backend can run here, else why not."""
    try:
        from . import kernels  # noqa: F401  (imports Numba; compiles nothing, starts no threads)
    except ImportError as error:
        return f"numba does not import ({error})"
    from numba import config

    from .blas import LIBRARY
    if LIBRARY is None:
        return "NumPy's OpenBLAS library was not found (the numba kernels call its ?gemm)"
    if config.DISABLE_JIT:
        return "NUMBA_DISABLE_JIT is set (the engine runs compiled kernels only)"
    return None


def resolve_backend(name: str | None = None) -> str:
    """The backend to use: ``name``, else $NUMPYLENET_BACKEND, else numba if available, else numpy.

    Raises ValueError for a name that is not a backend, and for "numba" when it cannot run.
    """
    source = "backend"
    if name is None and os.environ.get(ENVIRONMENT_VARIABLE):
        name, source = os.environ[ENVIRONMENT_VARIABLE], f"${ENVIRONMENT_VARIABLE}"
    if name is None:
        return "numba" if numba_unavailable_reason() is None else "numpy"
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    if name == "numba":
        reason = numba_unavailable_reason()
        if reason is not None:
            raise ValueError(f"the numba backend is unavailable: {reason}")
    return name


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system reports one (a
    container or ``taskset`` may allow fewer than the machine has), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_limit(backend: str) -> tuple[int, str]:
    """The most threads a run on ``backend`` ("numpy" or "numba") computes with, and what sets
    that limit, in words: the cores available (:func:`available_cores`), and for numba also the
    threads Numba launched with (``NUMBA_NUM_THREADS``), which :func:`set_threads` cannot exceed."""
    cores = available_cores()
    if backend == "numba":
        import numba

        launched = numba.config.NUMBA_NUM_THREADS
        if launched < cores:
            return launched, f"NUMBA_NUM_THREADS={launched}, the threads Numba launched with"
    return cores, f"the {cores} core{'s' if cores != 1 else ''} available"


def set_threads(count: int) -> int:
    """Use ``count`` threads, at most :func:`available_cores`, for NumPy's BLAS and (where the
    numba backend can run) Numba's kernels (``--threads``); return the count used.

    More threads than cores only make them wait for one another: with BLAS at 64 threads on 2
    cores a NumPy-backend epoch ran 10x slower. Numba is also capped at the threads it launched
    with (``NUMBA_NUM_THREADS``, by default the machine's cores). Needs no Numba for the BLAS part.
    For the whole process, as BLAS's count is (see :func:`numpylenet.engine.set_kernel_threads`).
    """
    if int(count) < 1:
        raise ValueError(f"threads must be >= 1, got {count}")
    used = min(int(count), available_cores())
    set_blas_threads(used)
    if numba_unavailable_reason() is None:
        import numba

        from .engine import set_kernel_threads
        set_kernel_threads(min(used, numba.config.NUMBA_NUM_THREADS))
    return used
