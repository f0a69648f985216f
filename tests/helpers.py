"""The checks every core test goes through: compare with torch, compare with finite differences.

The comparison code itself lives in :mod:`numpylenet.compare`, which ``python -m numpylenet.check``
uses too, so the tests and the learner's check cannot drift apart: the relative error, the
tolerances and their justification, the one-line-per-tensor report, the torch-versus-ours layer
comparison and central finite differences are all there. Here they only become assertions.

Each check prints one line per named tensor (run pytest with ``-s`` to see them), llm.c style.
"""

from __future__ import annotations

from numpylenet.compare import (GRADCHECK_TOLERANCE, TOLERANCE, assert_close, assert_ok,  # noqa: F401
                                layer_parameters, layer_vs_finite_differences, layer_vs_torch,
                                numerical_gradient, relative_error, torch_dtype)


# Python source that makes ``import torch`` fail as it would were torch not installed: run it first
# (in a subprocess, or a notebook's first cell) to test what works without torch.
BLOCK_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTorch())
"""


def check_layer(make_ours, make_torch, input_shape, dtype="float64", **options) -> None:
    """Assert :func:`numpylenet.compare.layer_vs_torch` (same arguments)."""
    assert_ok(layer_vs_torch(make_ours, make_torch, input_shape, dtype, **options))


def check_gradients(layer, input_shape, **options) -> None:
    """Assert :func:`numpylenet.compare.layer_vs_finite_differences` (same arguments)."""
    assert_ok(layer_vs_finite_differences(layer, input_shape, **options))
