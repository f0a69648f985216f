"""LeNet-5 as the seed notebook builds it, assembled from the layers in :mod:`numpylenet.layers`."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from .backend import resolve_backend
from .loss import check_targets, softmax_cross_entropy
from .layers import (AvgPool2d, Conv2d, Flatten, Layer, Linear, MaxPool2d, Parameter, ReLU,
                     Sigmoid, Tanh, as_float_dtype, check_weights, weights_as)
from .names import ACTIVATION_NAMES, POOL_NAMES

__all__ = ["LeNet5", "ACTIVATIONS", "POOLS"]

# The layer for each name of names.ACTIVATION_NAMES and names.POOL_NAMES (tests/test_layout.py checks).
ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}
POOLS = {"avg": AvgPool2d, "max": MaxPool2d}
INPUT_SHAPE = (1, 32, 32)
NUM_CLASSES = 10


class LeNet5:
    """LeNet-5 for 32x32 grey images, exactly the seed notebook's network.

    Forward shapes (N images)::

        x      (N, 1, 32, 32)
        conv1  (N, 6, 28, 28)   5x5 conv, then the activation
        pool1  (N, 6, 14, 14)   2x2 pooling
        conv2  (N, 16, 10, 10)  5x5 conv, then the activation
        pool2  (N, 16, 5, 5)    2x2 pooling
        conv3  (N, 120, 1, 1)   5x5 conv, then the activation
        flatten (N, 120)
        fc1    (N, 84)          then the activation
        fc2    (N, 10)          the logits (softmax lives in the loss)

    The backward pass runs the layers in reverse, each turning dL/d(output) into dL/d(input).
    Numba counterparts (``backend="numba"``): ``kernels.forward_images``,
    ``kernels.loss_images`` (in :meth:`forward_backward`), ``kernels.backward_images`` and
    ``kernels.weight_grads`` (each run on every thread by ``kernels.on_threads``), the same
    layers as one pair of fused kernels per layer.

    All 61,706 parameters live in one contiguous buffer, ``flat_data`` (torch's named order), and
    their gradients in ``flat_grad``; each Parameter's ``.data`` and ``.grad`` are views into them
    (see :meth:`flat_buffers`), so an optimiser can treat the whole model as one array. Assigning
    ``param.data = values`` writes the values into that view; ``copy.deepcopy`` and pickling give
    a model with buffers of its own.

    Several Python threads may call one model: the numba backend runs one call at a time (its
    work buffers are the model's), the numpy backend computes each forward pass apart. A
    backward pass uses the activations of the model's last forward pass, whichever thread ran it.

    Both backends accept and reject the same inputs: any floating-point x of shape (N, 1, 32, 32),
    N >= 0 (cast to the model's dtype; an empty batch gives empty logits, as in torch), and in
    backward a floating-point dL/dlogits of shape (N, 10) for the N of the last forward. The
    backward pass uses what forward kept (its own copies), never the caller's x. They agree to
    1e-10 in float64 on finite inputs; from a NaN or infinite pixel both give NaNs, but not in
    the same entries (the kernels are compiled with ``fastmath``: see :mod:`numpylenet.kernels`).

    Parameters
    ----------
    activation : one of names.ACTIVATION_NAMES: "relu", "tanh", "sigmoid"
    pool : one of names.POOL_NAMES: "avg", "max"
    dtype : float32 or float64
    seed : int or None, seeds torch-style U(-1/sqrt(fan_in), 1/sqrt(fan_in)) initialisation.
    backend : {"numpy", "numba"} or None
        "numpy" runs the layers above one by one; "numba" runs the same math as fused
        per-thread passes in one parallel kernel (:mod:`numpylenet.kernels`, run by
        :class:`numpylenet.engine.NumbaLeNet5`,
        this model's ``engine``). None: $NUMPYLENET_BACKEND, else numba if it imports, else numpy
        (see :func:`numpylenet.backend.resolve_backend`).
    """

    def __init__(self, *, activation: str = "relu", pool: str = "avg", dtype=np.float32,
                 seed: int | None = None, backend: str | None = None):
        if activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATION_NAMES)}, got {activation!r}")
        if pool not in POOL_NAMES:
            raise ValueError(f"pool must be one of {', '.join(POOL_NAMES)}, got {pool!r}")
        self.activation, self.pool, self.dtype = activation, pool, as_float_dtype(dtype)
        rng = np.random.default_rng(seed)
        activation_layer, pool_layer = ACTIVATIONS[activation], POOLS[pool]
        self.conv1 = Conv2d(1, 6, 5, dtype=self.dtype, rng=rng)
        self.conv2 = Conv2d(6, 16, 5, dtype=self.dtype, rng=rng)
        self.conv3 = Conv2d(16, 120, 5, dtype=self.dtype, rng=rng)
        self.fc1 = Linear(120, 84, dtype=self.dtype, rng=rng)
        self.fc2 = Linear(84, NUM_CLASSES, dtype=self.dtype, rng=rng)
        self.layers: list[Layer] = [
            self.conv1, activation_layer(), pool_layer(2),
            self.conv2, activation_layer(), pool_layer(2),
            self.conv3, activation_layer(), Flatten(),
            self.fc1, activation_layer(),
            self.fc2,
        ]
        self._pack_parameters()
        self.backend = resolve_backend(backend)
        self.engine = None
        if self.backend == "numba":
            from .engine import NumbaLeNet5     # here, not above: the numpy backend needs no Numba
            self.engine = NumbaLeNet5.for_model(self)
        self._forward_batch_size: int | None = None    # checked by backward

    def _pack_parameters(self) -> None:
        """Move every parameter into one flat buffer (and its gradient into another)."""
        params = self.parameters()
        total = sum(p.data.size for p in params)
        self.flat_data = np.empty(total, dtype=self.dtype)
        self.flat_grad = np.zeros(total, dtype=self.dtype)
        offset = 0
        for p in params:
            size, shape = p.data.size, p.data.shape
            self.flat_data[offset:offset + size] = p.data.ravel()
            p.data = self.flat_data[offset:offset + size].reshape(shape)
            p.grad = self.flat_grad[offset:offset + size].reshape(shape)
            p.owner = self
            offset += size

    def flat_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """``(flat_data, flat_grad)``: every parameter, and every gradient, in one array each.

        Both have shape (61,706,) and the model's dtype. The i-th parameter of
        :meth:`parameters` (torch's order, conv1.weight ... fc2.bias) is the slice
        ``flat_data[o_i : o_i + size_i]`` reshaped to its shape, with o_i the sum of the sizes
        before it; its ``.grad`` is the same slice of ``flat_grad``. Each of those Parameters has
        ``owner`` set to this model, so that an optimiser given exactly ``model.parameters()``
        can find these buffers and update them in one loop (see
        :func:`numpylenet.optim.find_fused_buffers`). Write into them in place, never rebind them.
        """
        return self.flat_data, self.flat_grad

    def __reduce__(self):
        """Pickling and ``copy.deepcopy``: the settings and the two flat buffers, rebuilt into a
        fresh model (its parameters views of the copied buffers, as here; a numba engine rebuilt
        for the new process, whose compiled code lives elsewhere). What the last forward pass kept
        for backward is not copied: a copy starts with a forward pass."""
        settings = {"activation": self.activation, "pool": self.pool, "dtype": self.dtype.name,
                    "backend": self.backend}
        return _restore, (type(self), settings, self.flat_data, self.flat_grad)

    # --- forward and backward ------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch: x (N, 1, 32, 32) -> (N, 10), in the model's dtype."""
        x = np.asarray(x)
        self._check_input(x)
        self._forward_batch_size = x.shape[0]
        if self.engine is not None:
            return self.engine.forward(x)
        x = x.astype(self.dtype, copy=False)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, grad_logits: np.ndarray, *, input_grad: bool = True) -> np.ndarray | None:
        """Back-propagate dL/dlogits (N, 10); adds to every ``.grad``; returns dL/dx (N, 1, 32, 32).

        N must be the batch size of the last :meth:`forward`, whose activations this uses. With
        ``input_grad=False`` it returns None: training never needs dL/dx, and the numba backend
        then skips conv1's input-gradient pass (about a tenth of the work).
        """
        grad_logits = self._check_grad_logits(grad_logits)
        if self.engine is not None:
            return self.engine.backward(grad_logits, input_grad)
        grad = grad_logits
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad if input_grad else None

    def forward_backward(self, x: np.ndarray, labels: np.ndarray, *, label_smoothing: float = 0.0) -> float:
        """The passes of one training step: the mean loss of x against ``labels``, with dL/dW
        added into every ``.grad`` (dL/dx is not formed). Returns the loss.

        The same as ``loss, grad = softmax_cross_entropy(self.forward(x), labels,
        label_smoothing=label_smoothing)`` then ``self.backward(grad, input_grad=False)``, which is
        what the numpy backend runs; the numba backend runs the three in its kernels and work
        buffers, allocating no array (:meth:`numpylenet.engine.NumbaLeNet5.forward_backward`).

        x : (N, 1, 32, 32), floating-point;  labels : (N,), integers in [0, 10).
        """
        # Checked before any pass runs, so that a rejected batch leaves the model as it was:
        # backward still follows the last forward pass, on either backend.
        x, labels = np.asarray(x), np.asarray(labels)
        self._check_input(x)
        check_targets(labels, x.shape[0], NUM_CLASSES, label_smoothing)
        if self.engine is None:
            loss, grad_logits = softmax_cross_entropy(self.forward(x), labels, label_smoothing=label_smoothing)
            self.backward(grad_logits, input_grad=False)
            return loss
        self._forward_batch_size = x.shape[0]
        return self.engine.forward_backward(x, labels, label_smoothing)

    @staticmethod
    def _check_input(x: np.ndarray) -> None:
        if not np.issubdtype(x.dtype, np.floating) or x.ndim != 4 or x.shape[1:] != INPUT_SHAPE:
            raise ValueError(f"LeNet5 expected a floating-point input of shape (N, 1, 32, 32), "
                             f"got {x.dtype} array of shape {x.shape}")

    def _check_grad_logits(self, grad_logits) -> np.ndarray:
        """``grad_logits`` as an array of the model's dtype, if it fits the last forward pass."""
        if self._forward_batch_size is None:
            raise RuntimeError("LeNet5.backward called before forward")
        grad_logits = np.asarray(grad_logits)
        expected = (self._forward_batch_size, NUM_CLASSES)
        if not np.issubdtype(grad_logits.dtype, np.floating) or grad_logits.shape != expected:
            raise ValueError(f"LeNet5.backward expected floating-point grad_logits of shape {expected}, "
                             f"got {grad_logits.dtype} array of shape {grad_logits.shape}")
        return grad_logits.astype(self.dtype, copy=False)

    # --- parameters ----------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """Yield ``(name, Parameter)`` with torch's names and order: conv1.weight ... fc2.bias."""
        for layer_name in ("conv1", "conv2", "conv3", "fc1", "fc2"):
            for name, param in getattr(self, layer_name).named_parameters():
                yield f"{layer_name}.{name}", param

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        self.flat_grad.fill(0)

    def num_parameters(self) -> int:
        return self.flat_data.size

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every parameter, keyed by torch's names."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy values into the parameters; keys and shapes must match exactly, and every value must be
        a float32 or float64 array whose values are finite in the model's dtype (else ValueError,
        and no parameter changes)."""
        params = dict(self.named_parameters())
        missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        if missing or unexpected:
            raise ValueError(f"state_dict does not match LeNet5: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        values = {}
        for name, param in params.items():
            value = np.asarray(state[name])
            if value.shape != param.data.shape:
                raise ValueError(f"state_dict[{name!r}] has shape {value.shape}, "
                                 f"expected {param.data.shape}")
            check_weights({name: value}, "state_dict")
            values[name] = weights_as(value, self.dtype, "state_dict", name)
        for name, param in params.items():
            param.data[...] = values[name]

    def __repr__(self) -> str:
        body = "\n".join(f"  {layer!r}" for layer in self.layers)
        return (f"LeNet5(activation={self.activation!r}, pool={self.pool!r}, dtype={self.dtype}, "
                f"backend={self.backend!r})[\n{body}\n]")


def _restore(cls: type, settings: dict, flat_data: np.ndarray, flat_grad: np.ndarray) -> LeNet5:
    """The model that :meth:`LeNet5.__reduce__` describes (of class ``cls``: LeNet5 or a subclass)."""
    model = cls(**settings)
    model.flat_data[...] = flat_data
    model.flat_grad[...] = flat_grad
    return model
