"""The names a user chooses among, defined once and imported everywhere else.

Model, recipes, command-line tools, kernels, tests and the torch reference all take their choices
from here, so adding (or renaming) an activation, a pooling, a dtype, a backend or an optimiser is one edit.
This module imports nothing, so every other module, including the Numba kernels, may import it.
"""
from __future__ import annotations

__all__ = ["ACTIVATION_NAMES", "POOL_NAMES", "DTYPE_NAMES", "BACKEND_NAMES", "OPTIMIZER_NAMES"]

ACTIVATION_NAMES = ("relu", "tanh", "sigmoid")   # after conv1, conv2, conv3 and fc1
POOL_NAMES = ("avg", "max")                      # the 2x2 pooling after conv1 and conv2
DTYPE_NAMES = ("float32", "float64")             # the parameter and activation dtype
BACKEND_NAMES = ("numpy", "numba")               # layer by layer, or the fused Numba kernels
OPTIMIZER_NAMES = ("adam", "sgd")                # numpylenet.Adam, numpylenet.SGD
