"""Shared pytest fixtures, and one compile of the Numba kernels before any test runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from numpylenet.names import DTYPE_NAMES

REPO = Path(__file__).resolve().parent.parent
_PRECOMPILE_REPORT = "numba kernels"     # what pytest_report_header reports, once known


def pytest_configure(config: pytest.Config) -> None:
    """Compile the numba backend's kernels into Numba's disk cache once, before the tests start.

    Left to the tests, every process that needs them compiles them: one pytest process compiles
    float32 then float64 (~35 s each on one core), and each pytest-xdist worker compiles both,
    at the same time as the others. Here the controlling process (not an xdist worker) compiles
    each dtype in its own child process, in parallel (each on its own core, so without
    NumbaLeNet5.compile's helper process), and every test process then loads them from
    the cache in a fraction of a second. With the cache already warm this costs about a second.
    A failure is left for the tests to report.
    """
    global _PRECOMPILE_REPORT
    _let_ctrl_c_through()
    if hasattr(config, "workerinput") or config.option.collectonly:
        return
    started = time.perf_counter()
    compiles = [subprocess.Popen([sys.executable, "-c", "import sys\n"
                                  "from numpylenet.backend import numba_unavailable_reason\n"
                                  "if numba_unavailable_reason() is None:\n"
                                  "    from numpylenet.engine import warmup\n"
                                  "    warmup([sys.argv[1]], helper_process=False)\n", dtype],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for dtype in DTYPE_NAMES]
    ok = all(child.wait() == 0 for child in compiles)
    _PRECOMPILE_REPORT = (f"numba kernels compiled (or loaded from the cache) up front in "
                 f"{time.perf_counter() - started:.1f} s" if ok else
                 "numba kernels: the up-front compile failed; the tests that need them will say why")


def _let_ctrl_c_through() -> None:
    """Give Ctrl-C (SIGINT) its usual meaning, KeyboardInterrupt, in this process and so in the
    processes the tests start, as a terminal's foreground program has it.

    The tests that stop a run with Ctrl-C send SIGINT to themselves or to a child. A shell starts a
    background job (``pytest ... &`` in a script) with SIGINT ignored, and Python then leaves it
    ignored, as does every child that inherits it: those signals would be lost, and the tests fail
    for a reason that is not in the code under test. A handler set here (unlike SIG_IGN) is reset
    to the default in every child at exec, so a child's Python raises KeyboardInterrupt again."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config: pytest.Config) -> str:
    return _PRECOMPILE_REPORT


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The root folder holding the real MNIST/raw/ files: $NUMPYLENET_DATA, else ../shared/data."""
    root = Path(os.environ.get("NUMPYLENET_DATA") or REPO.parent / "shared" / "data")
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found in {root / 'MNIST' / 'raw'} (set NUMPYLENET_DATA to its root)")
    return root


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one BLAS thread and (if torch is installed) one torch thread.

    The core tests multiply small matrices; on a shared 2-core machine a second thread mostly
    spin-waits for the first (a float64 LeNet5 step measured 9x slower with 2 OpenBLAS threads
    under load). Opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    from threadpoolctl import threadpool_limits

    try:
        import torch
    except ImportError:
        torch = None
    previous = torch.get_num_threads() if torch else None
    with threadpool_limits(limits=1):
        if torch:
            torch.set_num_threads(1)
        yield
        if torch:
            torch.set_num_threads(previous)
