"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
