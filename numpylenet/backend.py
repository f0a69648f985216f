"""Choosing the compute backend, and the Numba backend's glue to :class:`numpylenet.LeNet5`.

Two backends compute the same numbers:

* ``"numpy"``: the readable reference, layer by layer (:mod:`numpylenet.layers`);
* ``"numba"``: the whole network fused into two parallel kernels (:mod:`numpylenet.kernels`),
  and the optimisers as one loop over the flat parameter buffer.

``LeNet5(backend=None)`` resolves the name with :func:`resolve_backend`: the environment variable
``NUMPYLENET_BACKEND`` if set, else ``"numba"`` when Numba imports (and NumPy's OpenBLAS can be
found), else ``"numpy"``.
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager

import numpy as np

__all__ = ["BACKENDS", "ENVIRONMENT_VARIABLE", "resolve_backend", "numba_unavailable_reason",
           "set_threads", "NumbaLeNet5", "fused_parameter_buffers", "fused_adam_step",
           "fused_sgd_step"]

BACKENDS = ("numpy", "numba")
ENVIRONMENT_VARIABLE = "NUMPYLENET_BACKEND"


def numba_unavailable_reason() -> str | None:
    """None if the numba backend can run here, else why not."""
    try:
        from . import kernels
    except ImportError as error:
        return f"numba does not import ({error})"
    if kernels.BLAS_LIBRARY is None:
        return "NumPy's OpenBLAS library was not found (the numba kernels call its ?gemm)"
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
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "numba":
        reason = numba_unavailable_reason()
        if reason is not None:
            raise ValueError(f"the numba backend is unavailable: {reason}")
    return name


def set_threads(count: int) -> None:
    """Use ``count`` threads for both Numba's kernels and NumPy's BLAS (``--threads``).

    Numba cannot start more threads than it launched with (``NUMBA_NUM_THREADS``, by default the
    number of cores), so its count is capped there.
    """
    if int(count) < 1:
        raise ValueError(f"threads must be >= 1, got {count}")
    from . import kernels
    import numba
    numba.set_num_threads(min(int(count), numba.config.NUMBA_NUM_THREADS))
    kernels.set_blas_threads(int(count))


@contextmanager
def _kernel_threads(count: int):
    """Run a fused kernel on ``count`` Numba threads, with BLAS on one thread.

    BLAS runs single-threaded because the kernels parallelise over images themselves: a
    multi-threaded BLAS called from two threads at once would fight them for the cores. And a
    batch too small to split runs on one Numba thread, so no idle thread has to be woken (on a
    busy machine waking it can cost milliseconds).
    """
    import numba

    from . import kernels
    previous_blas, previous_numba = kernels.blas_threads(), numba.get_num_threads()
    if previous_blas is not None and previous_blas != 1:
        kernels.set_blas_threads(1)
    if count != previous_numba:
        numba.set_num_threads(count)
    try:
        yield
    finally:
        if count != previous_numba:
            numba.set_num_threads(previous_numba)
        if previous_blas is not None and previous_blas != 1:
            kernels.set_blas_threads(previous_blas)


# --------------------------------------------------------------------------------------------
# LeNet5 on the fused kernels
# --------------------------------------------------------------------------------------------

# Flat parameter buffers owned by a numba-backend LeNet5: the optimisers update these fused.
_FUSED_BUFFERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class NumbaLeNet5:
    """The forward and backward passes of a :class:`numpylenet.LeNet5` on the fused kernels.

    Reads the weights from ``model.flat_data`` and adds the gradients into ``model.flat_grad``,
    so everything else about the model (parameters, state_dict, the optimisers) is unchanged.
    Work arrays are allocated for a batch size once and reused while it stays the same.
    """

    def __init__(self, model):
        from . import kernels
        shapes = tuple((name, p.data.shape) for name, p in model.named_parameters())
        if shapes != kernels.PARAMETER_SHAPES:
            raise ValueError(f"the numba kernels are written for LeNet-5's parameters "
                             f"{kernels.PARAMETER_SHAPES}, got {shapes}")
        self.kernels = kernels
        self.model = model
        self.activation = kernels.ACTIVATION_CODES[model.activation]
        self.pool = kernels.POOL_CODES[model.pool]
        self.workspace: dict[str, np.ndarray] = {}
        self.input = None
        _FUSED_BUFFERS[id(model.flat_data)] = model.flat_data

    def _workspace(self, n: int) -> dict[str, np.ndarray]:
        """Work arrays for a batch of n, split over as many threads as it has sub-batches."""
        import numba
        sub = self.kernels.SUB_BATCH
        threads = max(1, min(numba.get_num_threads(), n // sub))
        if self.workspace.get("shape") == (n, threads):
            return self.workspace
        shapes = dict(
            w2=(16, 150), y1=(n, 6, 28, 32), p1=(n, 14, 14, 6), y2=(n, 10, 10, 16),
            p2=(n, 16, 5, 5), y3=(n, 120), y4=(n, 84), logits=(n, 10),
            cols2=(threads, sub * 100 * 150),
            grad_y4=(n, 84), grad_y3=(n, 120), grad_p2=(n, 16, 5, 5),
            grad_z1=(threads, 6, 28, 32), grad_p1=(threads, sub, 14, 14, 6),
            grad_z2=(threads, sub, 10, 10, 16), grad_w2=(threads, 16, 150),
            thread_grads=(threads, self.model.flat_grad.size), grad_x=(n, 1, 32, 32))
        self.workspace = {name: np.empty(shape, self.model.dtype) for name, shape in shapes.items()}
        self.workspace["shape"] = (n, threads)
        return self.workspace

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, 10) for x (N, 1, 32, 32), already validated by the model."""
        x = np.ascontiguousarray(x, dtype=self.model.dtype)
        w = self._workspace(x.shape[0])
        with _kernel_threads(w["shape"][1]):
            self.kernels.lenet_forward(x, self.model.flat_data, self.activation, self.pool, w["w2"],
                                       w["y1"], w["p1"], w["y2"], w["p2"], w["y3"], w["y4"],
                                       w["logits"], w["cols2"])
        self.input = x
        return w["logits"].copy()

    def backward(self, grad_logits: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Add dL/dW to the model's gradients; return dL/dx (N, 1, 32, 32) if ``input_grad``."""
        if self.input is None:
            raise RuntimeError("LeNet5.backward called before forward")
        n = self.input.shape[0]
        if np.shape(grad_logits) != (n, 10):
            raise ValueError(f"LeNet5.backward expected grad_logits of shape ({n}, 10), "
                             f"got {np.shape(grad_logits)}")
        grad_logits = np.ascontiguousarray(grad_logits, dtype=self.model.dtype)
        w = self.workspace
        with _kernel_threads(w["shape"][1]):
            self.kernels.lenet_backward(
                self.input, self.model.flat_data, self.activation, self.pool, grad_logits, w["w2"],
                w["y1"], w["p1"], w["y2"], w["p2"], w["y3"], w["y4"],
                w["grad_y4"], w["grad_y3"], w["grad_p2"], w["grad_z1"], w["grad_p1"], w["grad_z2"],
                w["cols2"], w["grad_w2"], w["thread_grads"], self.model.flat_grad,
                w["grad_x"], input_grad)
        return w["grad_x"].copy() if input_grad else None

    @classmethod
    def compile(cls, dtype: np.dtype) -> None:
        """Run every kernel once on a tiny batch, so Numba compiles them (or loads its cache)."""
        from .model import LeNet5
        from .optim import SGD, Adam
        from .loss import softmax_cross_entropy
        model = LeNet5(dtype=dtype, seed=0, backend="numba")
        x = np.zeros((2, 1, 32, 32), dtype)
        _, grad_logits = softmax_cross_entropy(model.forward(x), np.array([0, 1]))
        model.backward(grad_logits)
        Adam(model.parameters()).step()
        SGD(model.parameters(), lr=0.1, momentum=0.9).step()


# --------------------------------------------------------------------------------------------
# Fused optimiser steps
# --------------------------------------------------------------------------------------------

def fused_parameter_buffers(params) -> tuple[np.ndarray, np.ndarray] | None:
    """(flat_data, flat_grad) if ``params`` are, in order, views tiling a numba LeNet5's flat
    buffers (so one loop over the buffer updates them all); else None."""
    base = params[0].data.base
    if base is None or _FUSED_BUFFERS.get(id(base)) is not base:
        return None
    grad_base, offset = params[0].grad.base, 0
    for p in params:
        start = (p.data.__array_interface__["data"][0] - base.__array_interface__["data"][0])
        grad_start = (p.grad.__array_interface__["data"][0] - grad_base.__array_interface__["data"][0])
        if (p.data.base is not base or p.grad.base is not grad_base or not p.data.flags.c_contiguous
                or start != offset * base.itemsize or grad_start != start):
            return None
        offset += p.data.size
    return (base, grad_base) if offset == base.size else None


def _flat_state(optimizer, name: str, data: np.ndarray) -> tuple[np.ndarray, bool]:
    """The optimiser's per-parameter buffer list ``name`` as one flat array (its entries become
    views of it), and whether it was empty (no step taken yet). Loaded or new buffers are packed."""
    buffers = getattr(optimizer, name)
    flat = optimizer.__dict__.setdefault("_flat_state", {}).get(name)
    if flat is not None and all(b is not None and b.base is flat for b in buffers):
        return flat, False
    empty = all(b is None for b in buffers)
    flat = np.zeros_like(data)
    offset = 0
    for index, p in enumerate(optimizer.params):
        view = flat[offset:offset + p.data.size].reshape(p.data.shape)
        if buffers[index] is not None:
            view[...] = buffers[index]
        buffers[index] = view
        offset += p.data.size
    optimizer._flat_state[name] = flat
    return flat, empty


def fused_adam_step(optimizer, data: np.ndarray, grad: np.ndarray) -> None:
    """:meth:`numpylenet.Adam.step` as one Numba loop over the flat buffers (identical result).

    The step's two scalars are computed here exactly as the reference computes them (Numba
    would evaluate ``beta ** t`` by repeated squaring, which rounds differently)."""
    from . import kernels
    exp_avg, _ = _flat_state(optimizer, "exp_avg", data)
    exp_avg_sq, _ = _flat_state(optimizer, "exp_avg_sq", data)
    beta1, beta2 = optimizer.betas
    t = optimizer.step_count
    step_size = optimizer.lr / (1 - beta1 ** t)
    bias_correction2_sqrt = np.sqrt(1 - beta2 ** t)
    kernels.adam_step(data, grad, exp_avg, exp_avg_sq, float(step_size), float(bias_correction2_sqrt),
                      float(beta1), float(beta2), float(optimizer.eps), float(optimizer.weight_decay))


def fused_sgd_step(optimizer, data: np.ndarray, grad: np.ndarray) -> None:
    """:meth:`numpylenet.SGD.step` as one Numba loop over the flat buffers (identical result)."""
    from . import kernels
    buffer, first_step = (_flat_state(optimizer, "momentum_buffer", data) if optimizer.momentum
                          else (data[:0], False))
    kernels.sgd_step(data, grad, buffer, float(optimizer.lr), float(optimizer.momentum),
                     float(optimizer.dampening), float(optimizer.weight_decay),
                     bool(optimizer.nesterov), first_step)
