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
