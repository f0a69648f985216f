"""The layers of LeNet-5, each a forward/backward pair in plain NumPy.

Every layer follows one contract:

* ``forward(x) -> y`` computes the output and caches what the backward pass needs;
* ``backward(grad_y) -> grad_x`` takes dL/dy (same shape as ``y``) and returns dL/dx (same shape
  as ``x``), and *adds* dL/dW to each parameter's ``.grad`` (gradients accumulate, as in torch,
  until ``zero_grad()``).

Shapes use N for the batch, C for channels, H x W for the spatial size, and the convolution and
pooling layers work in NCHW, the layout torch uses. A layer keeps its own copy of what backward
needs, so the caller may reuse ``x`` after forward. N may be 0 (empty in, empty out, as in torch).

Each class names its Numba counterpart: the kernels in :mod:`numpylenet.kernels` that compute the
same layer inside ``LeNet5(backend="numba")`` (the table at the top of that module lists them all).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .names import DTYPE_NAMES

__all__ = [
    "Parameter",
    "Layer",
    "check_weights",
    "weights_as",
    "im2col",
    "col2im",
    "Conv2d",
    "AvgPool2d",
    "MaxPool2d",
    "ReLU",
    "Tanh",
    "Sigmoid",
    "Flatten",
    "Linear",
]

Pair = tuple[int, int]
FLOAT_DTYPES = tuple(np.dtype(name) for name in DTYPE_NAMES)


class Parameter:
    """A trainable array and the gradient accumulated for it.

    Attributes
    ----------
    data : ndarray
        The values, any shape.
    grad : ndarray
        dL/d(data), same shape and dtype as ``data``; starts at zero and accumulates.
    owner : object or None
        The model whose flat buffers hold ``data`` and ``grad`` as views (set by
        :meth:`numpylenet.LeNet5.flat_buffers`' packing), else None.

    Assigning ``p.data = values`` (or ``p.grad``) rebinds the array of a parameter of its own;
    for one with an ``owner`` it writes ``values`` into the view instead (same shape, cast to its
    dtype), since the owner's kernels and optimisers read the flat buffers, not the attribute.
    """

    def __init__(self, data: np.ndarray):
        if not (isinstance(data, np.ndarray) and np.issubdtype(data.dtype, np.floating)):
            raise ValueError(f"a Parameter holds a float ndarray, got {type(data).__name__}"
                             f"{' of ' + str(data.dtype) if isinstance(data, np.ndarray) else ''}")
        self._data = data
        self._grad = np.zeros_like(data)
        self.owner = None

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, values: np.ndarray) -> None:
        self._data = self._assigned(self._data, values, "data")

    @property
    def grad(self) -> np.ndarray:
        return self._grad

    @grad.setter
    def grad(self, values: np.ndarray) -> None:
        self._grad = self._assigned(self._grad, values, "grad")

    def _assigned(self, current: np.ndarray, values, name: str) -> np.ndarray:
        """What ``.<name> = values`` leaves in place: ``values`` itself, or for an owned
        parameter the view ``current`` with ``values`` written into it."""
        if self.owner is None:
            return values
        values = np.asarray(values)
        if values.shape != current.shape or not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"a {name} of shape {current.shape} lives in its model's flat buffer: "
                             f"assign a float array of that shape, got {values.dtype} {values.shape}")
        current[...] = values
        return current

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def __reduce__(self):
        """Pickling and ``copy.deepcopy``: a parameter of a model's flat buffers becomes the same
        parameter of the copied model, so that whatever is copied together with the model - an
        optimiser, in ``copy.deepcopy((model, optimizer))`` - holds the copy's parameters, as in
        torch. Any other parameter is copied with its data and gradient."""
        if self.owner is not None:
            index = next(i for i, p in enumerate(self.owner.parameters()) if p is self)
            return _parameter_of, (self.owner, index)
        return _free_parameter, (self._data, self._grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def _parameter_of(owner, index: int) -> Parameter:
    """Parameter ``index`` of the model ``owner`` (see :meth:`Parameter.__reduce__`)."""
    return owner.parameters()[index]


def _free_parameter(data: np.ndarray, grad: np.ndarray) -> Parameter:
    """A parameter of no model holding ``data`` and ``grad`` (see :meth:`Parameter.__reduce__`)."""
    parameter = Parameter(data)
    parameter.grad = grad
    return parameter


# --------------------------------------------------------------------------------------------
# Helpers shared by the layers
# --------------------------------------------------------------------------------------------

def _pair(value: int | Pair, name: str, minimum: int) -> Pair:
    """Normalise an int or a pair of ints to a pair, rejecting values below ``minimum``."""
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                 for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def as_float_dtype(dtype) -> np.dtype:
    """Return ``dtype`` as a NumPy dtype, accepting only float32 and float64 (not None, which NumPy
    reads as float64 but torch as its default, float32)."""
    if dtype is None:
        raise ValueError("dtype must be float32 or float64, got None")
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from error
    if resolved not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {resolved}")
    return resolved


def check_weights(arrays: Mapping[str, np.ndarray], what: str = "weights") -> None:
    """ValueError unless every array is float32 or float64 and holds only finite values.

    float16, integers, complex numbers or NaN/inf would be converted or computed with silently
    (complex cut to the real part, NaN giving an "accuracy" of chance level next to a NaN loss).
    """
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{what} {name} is {value.dtype}; numpylenet takes float32 or float64 weights")
        if not np.isfinite(value).all():
            raise ValueError(f"{what} {name} holds NaN or infinite values")


def weights_as(value, dtype: np.dtype, what: str, name: str) -> np.ndarray:
    """``value`` (a checked weight, see :func:`check_weights`) cast to ``dtype``; ValueError if a
    value finite in its own dtype is not in ``dtype`` (1e300 becomes inf in float32)."""
    with np.errstate(over="ignore"):
        cast = np.asarray(value).astype(dtype)
    if not np.isfinite(cast).all():
        raise ValueError(f"{what} {name} holds values too large for {np.dtype(dtype).name}")
    return cast


def check_float_array(x, layer: str, expected: str, ndim: int) -> np.ndarray:
    """Check that ``x`` is a floating array of rank ``ndim``; ``expected`` describes its shape."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{layer} expected a floating-point input of shape {expected}, "
                         f"got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{layer} expected input of shape {expected}, got shape {x.shape}")
    return x


def uniform_init(rng: np.random.Generator | int | None, shape: tuple[int, ...], fan_in: int,
                 dtype: np.dtype) -> np.ndarray:
    """torch's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    torch draws weights with kaiming_uniform(a=sqrt(5)), whose bound gain * sqrt(3 / fan_in)
    works out to exactly 1/sqrt(fan_in), and biases from the same interval. Values are drawn in
    float64 and then cast, so one seed gives the same network in float32 and float64.
    """
    bound = 1.0 / np.sqrt(fan_in)
    return np.random.default_rng(rng).uniform(-bound, bound, size=shape).astype(dtype)


def output_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output length along one axis: floor((size + 2 * padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


# --------------------------------------------------------------------------------------------
# im2col and col2im
# --------------------------------------------------------------------------------------------

def im2col(x: np.ndarray, kernel: Pair, stride: Pair = (1, 1), padding: Pair = (0, 0)) -> np.ndarray:
    """Unfold every kernel-sized window of ``x`` into one column of a matrix.

    The column matrix ``cols`` has one ROW per weight of a filter and one COLUMN per output pixel:

    * row index ``(c, i, j)`` flattened as ``c * kh * kw + i * kw + j``: input channel ``c`` and
      the offset ``(i, j)`` inside the kernel window; the same order as a torch weight
      ``(out, C, kh, kw)`` reshaped to ``(out, C * kh * kw)``;
    * column index ``(n, oh, ow)`` flattened as ``n * OH * OW + oh * OW + ow``: the image and
      the output position.

    So ``cols[(c, i, j), (n, oh, ow)] = x_padded[n, c, oh * sh + i, ow * sw + j]``, and a
    convolution becomes one matrix multiply: ``Y = W_mat @ cols``, shape (out, N * OH * OW).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel, stride, padding : pairs (kh, kw), (sh, sw), (ph, pw); zero padding on both sides.

    Returns
    -------
    cols : ndarray, shape (C * kh * kw, N * OH * OW), never a view of ``x``,
        with OH = (H + 2 ph - kh) // sh + 1 and OW = (W + 2 pw - kw) // sw + 1.
    """
    ph, pw = padding
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    cols = _unfold(padded, kernel, stride)
    # When no window overlaps another (a 1x1 kernel, a kernel covering the input) the reshape in
    # _unfold can leave cols a view of x; Conv2d keeps cols for backward, so they must not change
    # with x. Then they are unfolded from a copy of x (the same strides, so BLAS rounds the same).
    return _unfold(x.copy(), kernel, stride) if np.may_share_memory(cols, x) else cols


def _unfold(padded: np.ndarray, kernel: Pair, stride: Pair) -> np.ndarray:
    """:func:`im2col` of an already padded batch; the result may be a view of ``padded``."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c = padded.shape[:2]
    # windows[n, c, oh, ow, i, j] = padded[n, c, oh * sh + i, ow * sw + j]: a strided view, no copy.
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    oh, ow = windows.shape[2:4]
    # Reorder to (c, i, j, n, oh, ow) so the reshape yields rows (c, i, j) and columns (n, oh, ow).
    return windows.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * oh * ow)


def col2im(cols: np.ndarray, input_shape: tuple[int, int, int, int], kernel: Pair,
           stride: Pair = (1, 1), padding: Pair = (0, 0)) -> np.ndarray:
    """The adjoint of :func:`im2col`: scatter-ADD every column back onto its window.

    An input pixel lies in several overlapping windows, so it was copied into several columns;
    its gradient is the SUM of the gradients of all those copies. ``col2im`` is the transpose of
    the linear map ``im2col``: for all x and G, ``sum(im2col(x) * G) == sum(x * col2im(G))``.

    Parameters
    ----------
    cols : ndarray, shape (C * kh * kw, N * OH * OW), laid out as :func:`im2col` returns it.
    input_shape : (N, C, H, W), the shape of the ``x`` that :func:`im2col` unfolded.
    kernel, stride, padding : as in :func:`im2col`.

    Returns
    -------
    x_grad : ndarray, shape (N, C, H, W)
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = input_shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    cols = cols.reshape(c, kh, kw, n, oh, ow)
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    # One vectorised add per kernel offset (i, j): the kh * kw slices each visit every window once.
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    return padded[:, :, ph:ph + h, pw:pw + w]


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

class Layer:
    """Base class: a layer without parameters unless it overrides ``named_parameters``."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def named_parameters(self):
        """Yield ``(name, Parameter)`` pairs, in torch's order (weight before bias)."""
        return iter(())

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad.fill(0)

    def _cached(self, name: str):
        value = getattr(self, name, None)
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return value

    def _output_grad(self, grad_output) -> np.ndarray:
        """``grad_output`` checked to be dL/dy for the last forward pass: a float array of exactly
        its output's shape (``output_shape``, which forward records). Checked before any
        ``.grad`` is touched: a transposed or broadcastable gradient would give wrong ones."""
        shape = self._cached("output_shape")
        grad_output = np.asarray(grad_output)
        if grad_output.shape != shape or not np.issubdtype(grad_output.dtype, np.floating):
            raise ValueError(f"{type(self).__name__}.backward expected a float gradient of the output's "
                             f"shape {shape}, got {grad_output.dtype} of shape {grad_output.shape}")
        return grad_output


class Conv2d(Layer):
    """2-D convolution (cross-correlation, as in torch) by im2col and one matrix multiply.

    Shapes: x (N, C_in, H, W) -> y (N, C_out, OH, OW), with
    OH = (H + 2 ph - kh) // sh + 1 and OW = (W + 2 pw - kw) // sw + 1.
    Parameters: weight (C_out, C_in, kh, kw), bias (C_out,).

    Forward, with ``cols = im2col(x)`` of shape (C_in kh kw, N OH OW) and
    ``W_mat = weight.reshape(C_out, C_in kh kw)``::

        Y = W_mat @ cols + bias[:, None]              (C_out, N OH OW)

    Backward, with dY = grad_y rearranged to (C_out, N OH OW) like Y::

        dW_mat = dY @ cols^T                          (C_out, C_in kh kw)
        dbias  = dY summed over its columns           (C_out,)
        dx     = col2im(W_mat^T @ dY)                 (N, C_in, H, W)

    Numba counterparts, one per convolution of LeNet-5: ``kernels.conv1_forward`` /
    ``conv1_backward`` (conv1: one input channel, summed in place without im2col),
    ``kernels.conv2_forward`` / ``conv2_backward`` (conv2: im2col channels-last and one GEMM),
    ``kernels.dense_forward`` / ``dense_backward`` + ``dense_weight_grad`` (conv3: one window, a
    dense layer); each fused with the activation (and pooling) after it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair,
                 stride: int | Pair = 1, padding: int | Pair = 0, *, dtype=np.float32,
                 rng: np.random.Generator | int | None = None):
        self.in_channels = _pair(in_channels, "in_channels", 1)[0]
        self.out_channels = _pair(out_channels, "out_channels", 1)[0]
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dtype = as_float_dtype(dtype)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        rng = np.random.default_rng(rng)
        self.weight = Parameter(uniform_init(rng, (self.out_channels, self.in_channels, kh, kw),
                                             fan_in, self.dtype))
        self.bias = Parameter(uniform_init(rng, (self.out_channels,), fan_in, self.dtype))
        self.cols = self.input_shape = None

    def named_parameters(self):
        yield "weight", self.weight
        yield "bias", self.bias

    def check_input(self, x) -> np.ndarray:
        """Validate ``x`` and return it in this layer's dtype."""
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        expected = f"(N, {self.in_channels}, H, W) with H + {2 * ph} >= {kh} and W + {2 * pw} >= {kw}"
        x = check_float_array(x, "Conv2d", expected, 4)
        if x.shape[1] != self.in_channels or x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise ValueError(f"Conv2d expected input of shape {expected}, got shape {x.shape}")
        return x.astype(self.dtype, copy=False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x)
        n, _, h, w = x.shape
        oh = output_size(h, self.kernel_size[0], self.stride[0], self.padding[0])
        ow = output_size(w, self.kernel_size[1], self.stride[1], self.padding[1])
        self.input_shape = x.shape
        self.cols = im2col(x, self.kernel_size, self.stride, self.padding)   # (C_in kh kw, N OH OW)
        weight_matrix = self.weight.data.reshape(self.out_channels, -1)      # (C_out, C_in kh kw)
        y = weight_matrix @ self.cols + self.bias.data[:, None]              # (C_out, N OH OW)
        self.output_shape = (n, self.out_channels, oh, ow)
        return y.reshape(self.out_channels, n, oh, ow).transpose(1, 0, 2, 3)  # (N, C_out, OH, OW)

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        grad_output = self._output_grad(grad_output)
        cols = self.cols
        # (N, C_out, OH, OW) -> (C_out, N OH OW), the layout of Y in forward.
        grad_y = grad_output.transpose(1, 0, 2, 3).reshape(self.out_channels, cols.shape[1])
        weight_matrix = self.weight.data.reshape(self.out_channels, -1)
        self.weight.grad += (grad_y @ cols.T).reshape(self.weight.data.shape)  # dW = dY @ cols^T
        self.bias.grad += grad_y.sum(axis=1)                                   # db = sum_cols dY
        grad_cols = weight_matrix.T @ grad_y                                   # (C_in kh kw, N OH OW)
        return col2im(grad_cols, self.input_shape, self.kernel_size, self.stride, self.padding)

    def __repr__(self) -> str:
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dtype={self.dtype})")


class _Pool2d(Layer):
    """Shared machinery of the pooling layers: each channel is pooled on its own.

    Pooling is a convolution with one input channel, so it reuses im2col: the input
    (N, C, H, W) is viewed as (N C, 1, H, W), and im2col gives ``cols`` of shape
    (kh kw, N C OH OW), one column per window. A pooling layer reduces each column to one number
    (``reduce``, which also returns what the backward pass needs) and, going back, spreads each
    output gradient over its column (``spread``) before col2im adds the overlapping windows
    together. torch semantics: no padding, floor mode, stride defaulting to the kernel size.

    Numba counterparts (2x2, stride 2, channels-last): ``kernels.pool_forward`` and
    ``kernels.pool_activation_backward``, run inside the conv1 and conv2 kernels.
    """

    def __init__(self, kernel_size: int | Pair, stride: int | Pair | None = None):
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride", 1)
        self.input_shape = self.saved = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        kh, kw = self.kernel_size
        name = type(self).__name__
        expected = f"(N, C, H, W) with H >= {kh} and W >= {kw}"
        x = check_float_array(x, name, expected, 4)
        if x.shape[2] < kh or x.shape[3] < kw:
            raise ValueError(f"{name} expected input of shape {expected}, got shape {x.shape}")
        n, c, h, w = self.input_shape = x.shape
        oh, ow = output_size(h, kh, self.stride[0]), output_size(w, kw, self.stride[1])
        cols = im2col(x.reshape(n * c, 1, h, w), self.kernel_size, self.stride)  # (kh kw, N C OH OW)
        pooled, self.saved = self.reduce(cols)
        self.output_shape = (n, c, oh, ow)
        return pooled.reshape(n, c, oh, ow)

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        grad_output = self._output_grad(grad_output)
        n, c, h, w = self.input_shape
        grad_cols = self.spread(grad_output.reshape(1, -1), self.saved)          # (kh kw, N C OH OW)
        grad_x = col2im(grad_cols, (n * c, 1, h, w), self.kernel_size, self.stride)
        return grad_x.reshape(n, c, h, w)

    def reduce(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """cols (kh kw, M) -> (the M pooled values, what :meth:`spread` needs, or None)."""
        raise NotImplementedError

    def spread(self, grad_y: np.ndarray, saved: np.ndarray | None) -> np.ndarray:
        """grad_y (1, M) -> its share for each window entry, (kh kw, M); ``saved`` from reduce."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride})"


class AvgPool2d(_Pool2d):
    """Average pooling: each output is the mean of its kh x kw window.

    Shapes: x (N, C, H, W) -> y (N, C, OH, OW), OH = (H - kh) // sh + 1, OW = (W - kw) // sw + 1.

    Forward:  y[n, c, oh, ow] = (1 / (kh kw)) * sum_{i, j} x[n, c, oh sh + i, ow sw + j]
    Backward: every pixel of a window receives an equal share, dx += dy / (kh kw),
              summed over all windows the pixel belongs to (col2im does the sum).
    """

    def reduce(self, cols: np.ndarray) -> tuple[np.ndarray, None]:
        return cols.mean(axis=0), None

    def spread(self, grad_y: np.ndarray, saved: None) -> np.ndarray:
        window_size = self.kernel_size[0] * self.kernel_size[1]
        return np.repeat(grad_y / window_size, window_size, axis=0)


class MaxPool2d(_Pool2d):
    """Max pooling: each output is the largest value of its kh x kw window.

    Shapes: as :class:`AvgPool2d`.

    Forward:  y[n, c, oh, ow] = max_{i, j} x[n, c, oh sh + i, ow sw + j]
    Backward: the whole gradient goes to the position that won the max: dx[winner] += dy.

    The winner is torch's: scanning the window in row-major order, a value wins if it is greater
    than the best so far or is NaN. So on ties the first maximum wins, and in a window holding
    NaN (whose output is NaN) the last NaN wins.
    """

    def reduce(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        columns = np.arange(cols.shape[1])
        winner = cols.argmax(axis=0)              # (N C OH OW,) the first maximum, or the first NaN
        has_nan = np.isnan(cols[winner, columns])
        if has_nan.any():                         # a later NaN wins over an earlier one
            winner[has_nan] = cols.shape[0] - 1 - np.isnan(cols[::-1, has_nan]).argmax(axis=0)
        return cols[winner, columns], winner

    def spread(self, grad_y: np.ndarray, winner: np.ndarray) -> np.ndarray:
        grad_y = grad_y[0]
        grad_cols = np.zeros((self.kernel_size[0] * self.kernel_size[1], grad_y.size), grad_y.dtype)
        grad_cols[winner, np.arange(grad_y.size)] = grad_y
        return grad_cols


class _Activation(Layer):
    """An elementwise function y = f(x); backward multiplies by f'(x), written in terms of y.

    Only y is kept for backward (as torch keeps the result of relu, tanh and sigmoid): the layer
    made it, so it does not change when the caller reuses x.

    Numba counterparts: ``kernels.bias_activation`` and ``kernels.activation_backward``, run
    inside the kernel of the layer before the activation (and ``pool_activation_backward`` where
    pooling follows).
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{type(self).__name__} expected a floating-point input of any shape, "
                             f"got dtype {x.dtype}")
        self.output = self.function(x)
        self.output_shape = self.output.shape
        return self.output

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        return self._output_grad(grad_output) * self.derivative(self.output)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReLU(_Activation):
    """y = max(x, 0);  dx = dy * [y > 0]   (y > 0 exactly where x > 0; at 0 the subgradient is 0).

    As in torch, a NaN input gives y = NaN and passes its gradient through: torch zeroes dx where
    y <= 0, which NaN is not, so the mask is written "not y <= 0".
    """

    @staticmethod
    def function(x):
        return np.maximum(x, 0)

    @staticmethod
    def derivative(y):
        return ~(y <= 0)


class Tanh(_Activation):
    """y = tanh(x);  dx = dy * (1 - y^2)."""

    @staticmethod
    def function(x):
        return np.tanh(x)

    @staticmethod
    def derivative(y):
        return 1 - y * y


class Sigmoid(_Activation):
    """y = 1 / (1 + exp(-x));  dx = dy * y * (1 - y).

    Computed from e = exp(-|x|) <= 1 as 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0,
    which never overflows and keeps full relative precision for very negative x.
    """

    @staticmethod
    def function(x):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e))

    @staticmethod
    def derivative(y):
        return y * (1 - y)


class Flatten(Layer):
    """Flatten all but the batch axis: (N, d1, d2, ...) -> (N, d1 d2 ...); backward reshapes back.

    No Numba counterpart: the kernels store pool2 in torch's (c, h, w) order, which is already
    conv3's flattened input.
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        # Rank 1 is refused, as torch's nn.Flatten does: (N,) has no axes to flatten, only a batch.
        if not np.issubdtype(x.dtype, np.floating) or x.ndim < 2:
            raise ValueError(f"Flatten expected a floating-point input of shape (N, d1, ...), "
                             f"got {x.dtype} of shape {x.shape}")
        self.input_shape = x.shape
        self.output_shape = (x.shape[0], int(np.prod(x.shape[1:])))
        return x.reshape(self.output_shape)

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        return self._output_grad(grad_output).reshape(self.input_shape)

    def __repr__(self) -> str:
        return "Flatten()"


class Linear(Layer):
    """Fully connected layer, y = x @ W^T + b.

    Shapes: x (N, in_features) -> y (N, out_features).
    Parameters: weight (out_features, in_features), bias (out_features,).

    Backward::

        dW = dY^T @ x        (out, in)
        db = sum_n dY        (out,)
        dx = dY @ W          (N, in)

    Numba counterparts: ``kernels.dense_forward`` / ``dense_backward`` (dx, per image) and
    ``dense_weight_grad`` (dW and db, over the whole batch) (fc1 and fc2, and conv3), fused with
    the activation after the layer.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype=np.float32,
                 rng: np.random.Generator | int | None = None):
        self.in_features = _pair(in_features, "in_features", 1)[0]
        self.out_features = _pair(out_features, "out_features", 1)[0]
        self.dtype = as_float_dtype(dtype)
        rng = np.random.default_rng(rng)
        self.weight = Parameter(uniform_init(rng, (self.out_features, self.in_features),
                                             self.in_features, self.dtype))
        self.bias = Parameter(uniform_init(rng, (self.out_features,), self.in_features, self.dtype))
        self.input = None

    def named_parameters(self):
        yield "weight", self.weight
        yield "bias", self.bias

    def forward(self, x: np.ndarray) -> np.ndarray:
        expected = f"(N, {self.in_features})"
        x = check_float_array(x, "Linear", expected, 2)
        if x.shape[1] != self.in_features:
            raise ValueError(f"Linear expected input of shape {expected}, got shape {x.shape}")
        self.input = np.array(x, dtype=self.dtype)    # a copy: dW needs x as it was
        self.output_shape = (x.shape[0], self.out_features)
        return self.input @ self.weight.data.T + self.bias.data

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        grad_output = self._output_grad(grad_output)
        x = self.input
        self.weight.grad += grad_output.T @ x        # dW = dY^T @ x
        self.bias.grad += grad_output.sum(axis=0)    # db = sum over the batch of dY
        return grad_output @ self.weight.data        # dx = dY @ W

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features}, dtype={self.dtype})"
