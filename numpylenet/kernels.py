"""Numba kernels: LeNet-5's layers fused and run on every core, with BLAS for the matrix products.

The NumPy layers (:mod:`numpylenet.layers`) are the readable reference: one layer at a time, NCHW,
each a forward/backward pair. This module computes the same numbers faster by changing *where*
the work happens, never *what* is computed. Each layer of the network has its pair here too:

<!-- table: kernels -->
| layer | NumPy (`numpylenet.`) | Numba kernels (here) | layout here | fused in |
|---|---|---|---|---|
| conv1 | `layers.Conv2d` | `conv1_forward`, `conv1_backward` | out (N, 6, 28, 32) [1] | act, pool1 [2] |
| conv2 | `layers.Conv2d` | `conv2_forward`, `conv2_backward` | NHWC, cols (i, j, c) [3] | act, pool2 |
| conv3 | `layers.Conv2d` | `dense_forward`, `dense_backward`, `dense_weight_grad` | (N, 400) -> (N, 120) [4] | act |
| fc1 | `layers.Linear` | `dense_forward`, `dense_backward`, `dense_weight_grad` | (N, 120) -> (N, 84) | act |
| fc2 | `layers.Linear` | `dense_forward`, `dense_backward`, `dense_weight_grad` | (N, 84) -> (N, 10) | |
| act | `layers.ReLU`, `layers.Tanh`, `layers.Sigmoid` | `bias_activation`, `activation_backward` | in place | |
| pool | `layers.AvgPool2d`, `layers.MaxPool2d` | `pool_forward`, `pool_activation_backward` | NHWC | |
| flatten | `layers.Flatten` | none [5] | | |
| loss | `loss.softmax_cross_entropy` | `cross_entropy_rows` | (N, 10), into the workspace | |
| network | `model.LeNet5.forward`, `model.LeNet5.backward` | `forward_images`, `loss_images`, `backward_images`, `weight_grads`, run by `on_threads` | [6] | all |
| Adam | `optim.Adam.step` | `adam_step` | flat buffer | all ten |
| SGD | `optim.SGD.step` | `sgd_step` | flat buffer | all ten |

[1] conv1's output in the rows of its input x (N, 1, 32, 32): 32 wide, of which 28 are outputs; its
pooled output (N, 14, 14, 6) channels-last. [2] No im2col: each output is summed where it stands
in the image. [3] Channels-last (NHWC) activations; conv2's im2col matrix (4 x 100, 150) per
sub-batch of 4 images, against its weight reordered (i, j, c); its pooled output (N, 16, 5, 5) in
torch's (c, h, w) order. [4] conv3's 5x5 kernel covers its whole 5x5 input: one window, so im2col
would only copy, and the convolution is a dense layer on the 400 flattened inputs. [5] pool2 is
stored in torch's order, so it is conv3's (N, 400) input as it stands. [6] One slice of the batch
per thread, carried through every layer `SUB_BATCH` images at a time; a training step is two
parallel regions (forward, loss and backward, sub-batch by sub-batch; the dense layers' weight
gradients).

The activation (any of three) and the pooling (either) are chosen at run time by :class:`Codes`
and run inside the layer kernel before them. So a layer's forward kernel returns its output after
activation (and pooling), and its backward kernel takes dL/d(that output) and applies the pooling's
and the activation's backward first.

How the work is placed:

* **One pass per thread.** The batch is split into one contiguous slice of images per thread
  (``prange``); each thread carries its images through every layer, so there is one parallel
  region per pass instead of one per layer, and no two threads ever write the same memory.
* **A training step sub-batch by sub-batch.** In training, each thread runs the forward pass,
  the loss and the backward pass on SUB_BATCH images before it starts the next ones, so their
  activations, and conv2's im2col matrix, are still in its cache when the backward pass reads
  them (the im2col is not formed again): the step took 8-13% less time than with the three
  passes one after the other over the thread's whole slice.
* **Gradients without races.** conv1's and conv2's dL/dW are sums over images taken SUB_BATCH
  at a time: each thread adds its images' into its own zeroed copy of those 2,572 entries, and
  their sum is added into ``flat_grad`` once per step. A dense layer's dL/dW is one product over
  the whole batch, formed after every image's dL/dz, with the threads splitting its rows.
* **BLAS from inside Numba.** The matrix products call NumPy's own OpenBLAS ``?gemm`` directly
  (single-threaded: the parallelism is the ``prange`` above), on sub-batches of ``SUB_BATCH``
  images whose im2col matrices stay in the core's L2 cache.
* **Channels-last inside.** Convolution outputs are stored (N, OH, OW, C), the layout in which
  ``cols @ W^T`` leaves them, so im2col -> product -> bias + activation -> pooling needs no
  transposes. conv2 unfolds channels-last (:func:`im2col_channels_last`) against its weights
  reordered to (i, j, c) once per pass.
* **conv1 without im2col.** With one input channel, im2col would copy every pixel 25 times to
  feed products with only six rows; :func:`conv1_forward` sums each output where it stands, with
  bias, activation and pooling in the same pass, and :func:`conv1_backward` forms dL/dW and
  dL/dx from the image in place.
* **Named work buffers.** Every array the passes write lives in one :class:`Workspace`, built
  by :func:`make_workspace` for a batch size and a thread count; every size in it follows from
  :data:`PARAMETER_SHAPES`.

Every kernel is compiled with ``cache=True`` and NumPy's error model; the pointwise, pooling and
conv1 kernels, and the forward and backward passes, also with ``fastmath``, which lets LLVM
vectorise them by assuming that no value is NaN or infinite. On such values these kernels
therefore follow no rule: where the NumPy layers route gradients at NaN exactly as torch does
(ReLU passes it, max pooling picks the last NaN), the kernels' choice is unspecified. A NaN
there means training has already diverged, and the trainer stops at the first non-finite loss.

The layer kernels that the per-thread passes call (conv1's, conv2's, the dense layers') are
compiled with ``inline='always'``: Numba writes their code into the pass that calls them, where
it is compiled once, instead of compiling each on its own first (LLVM optimising and emitting it
once alone and again inside the pass): the first compile on an empty cache went from 8.5 s to
7.2 s. The inlined code takes the pass's flags (the passes are ``fastmath`` for conv1's sake; the
other layer kernels do their arithmetic in kernels they call, which keep their own). Called from
Python, as the tests call them, they compile on their own as any kernel. The small kernels that
several layers call (im2col, gemm, pooling, activation) stay ordinary calls: inlined, Numba
would type their code again at every call site, which measured slower to compile.

Importing this module compiles nothing and starts no threads:
:mod:`numpylenet.engine` starts Numba's thread pool when the first engine is built, and
:func:`numpylenet.engine.warmup` compiles (or loads) every kernel.
"""
from __future__ import annotations

from typing import NamedTuple

import llvmlite.binding as llvm
import numpy as np
from numba import prange, typeof, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blas import LIBRARY, gemm_address
from .numba_cache import kernel

__all__ = [
    "kernel", "RELU", "TANH", "SIGMOID", "IDENTITY", "AVG", "MAX", "ACTIVATION_CODES", "POOL_CODES",
    "Codes", "PARAMETER_SHAPES", "NUM_PARAMETERS", "CONV_PARAMETERS", "KERNEL", "POOL", "SUB_BATCH", "gemm",
    "channels_last", "im2col_channels_last", "col2im_channels_last", "permute_conv_weight",
    "bias_activation", "activate_in_place", "activation_backward",
    "pool_forward", "pool_activation_backward", "conv1_forward", "conv1_backward", "conv2_forward",
    "conv2_backward", "dense_forward", "dense_backward", "dense_weight_grad", "Parameters", "parameter_views",
    "Workspace", "make_workspace", "KernelAddress", "forward_images", "loss_images", "backward_images",
    "weight_grads", "on_threads", "cross_entropy_rows", "adam_step", "sgd_step",
]


# Activation and pooling codes: Numba kernels branch on small ints, outside their inner loops.
RELU, TANH, SIGMOID, IDENTITY = 0, 1, 2, 3
# Passed as np.int64(code) where a constant code would do, so that Numba compiles the layer once
# for all codes instead of once more for that constant.
AVG, MAX = 0, 1
# Keyed by every name of names.ACTIVATION_NAMES and names.POOL_NAMES (tests/test_layout.py checks).
ACTIVATION_CODES = {"relu": RELU, "tanh": TANH, "sigmoid": SIGMOID}
POOL_CODES = {"avg": AVG, "max": MAX}


class Codes(NamedTuple):
    """The activation and the pooling of a network, as the kernels branch on them."""
    activation: int     # RELU, TANH or SIGMOID
    pool: int           # AVG or MAX


# --------------------------------------------------------------------------------------------
# LeNet-5's shapes: every size below follows from these
# --------------------------------------------------------------------------------------------

# LeNet-5's parameters in torch's named order, as they sit in the model's flat buffer.
PARAMETER_SHAPES = (
    ("conv1.weight", (6, 1, 5, 5)), ("conv1.bias", (6,)),
    ("conv2.weight", (16, 6, 5, 5)), ("conv2.bias", (16,)),
    ("conv3.weight", (120, 16, 5, 5)), ("conv3.bias", (120,)),
    ("fc1.weight", (84, 120)), ("fc1.bias", (84,)),
    ("fc2.weight", (10, 84)), ("fc2.bias", (10,)),
)
_SHAPE = dict(PARAMETER_SHAPES)
_SIZES = tuple(int(np.prod(shape)) for _, shape in PARAMETER_SHAPES)
_OFFSETS = tuple(int(o) for o in np.concatenate([[0], np.cumsum(_SIZES)]))
NUM_PARAMETERS = _OFFSETS[-1]                       # 61,706
# conv1's and conv2's parameters, first in the flat buffer: the part of dL/dW that each thread
# forms for its own images (a dense layer's is one product over the whole batch, see weight_grads).
CONV_PARAMETERS = _OFFSETS[4]                       # 2,572
# Each weight as the kernels use it: conv weights (C_out, C_in kh kw), in torch's (c, i, j) order.
_WEIGHT_MATRICES = tuple((shape[0], int(np.prod(shape[1:]))) for name, shape in PARAMETER_SHAPES
                         if name.endswith(".weight"))

KERNEL = _SHAPE["conv1.weight"][-1]                 # 5: every convolution is 5x5, stride 1, no padding
KERNEL_AREA = KERNEL * KERNEL
POOL = 2                                            # every pooling window is 2x2, stride 2
POOL_WINDOW = (POOL, POOL)
CONV1_CHANNELS = _SHAPE["conv1.weight"][0]          # 6
CONV2_CHANNELS = _SHAPE["conv2.weight"][0]          # 16
CONV3_CHANNELS = _SHAPE["conv3.weight"][0]          # 120
FC1_FEATURES = _SHAPE["fc1.weight"][0]              # 84
NUM_CLASSES = _SHAPE["fc2.weight"][0]               # 10
# The side lengths, back from conv3, whose kernel covers its whole input: one 5x5 window.
POOL2_SIZE = KERNEL                                 # 5
CONV2_SIZE = POOL2_SIZE * POOL                      # 10
POOL1_SIZE = CONV2_SIZE + KERNEL - 1                # 14
CONV1_SIZE = POOL1_SIZE * POOL                      # 28
INPUT_SIZE = CONV1_SIZE + KERNEL - 1                # 32
CONV2_COLUMNS = KERNEL_AREA * CONV1_CHANNELS        # 150: a row of conv2's im2col matrix
# Images per im2col sub-batch: conv2's cols (SUB_BATCH * 100, 150) then take 240 KB in float32 and
# stay in a 512 KB L2 cache, with the sub-batch's activations beside them.
SUB_BATCH = 4


# --------------------------------------------------------------------------------------------
# BLAS: NumPy's own ?gemm, called from inside Numba
# --------------------------------------------------------------------------------------------

_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112


def _gemm_signature(real):
    """cblas_?gemm's C signature for the float type ``real``:
    (order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), 64-bit integers."""
    return types.void(types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
                      real, types.intp, types.int64, types.intp, types.int64, real, types.intp,
                      types.int64)


if LIBRARY is not None:       # else the numba backend is unavailable (see numpylenet.backend)
    for _letter in "sd":
        llvm.add_symbol(f"numpylenet_{_letter}gemm", gemm_address(_letter))
_sgemm = types.ExternalFunction("numpylenet_sgemm", _gemm_signature(types.float32))
_dgemm = types.ExternalFunction("numpylenet_dgemm", _gemm_signature(types.float64))


@kernel
def gemm(a, b, c, transpose_a=False, transpose_b=False, beta=0.0):
    """C = op(A) @ op(B) + beta C for 2-D arrays whose rows are contiguous (C-contiguous arrays,
    or column slices of them), op(X) = X^T if asked.

    Shapes: op(A) (M, K), op(B) (K, N), C (M, N). Calls single-threaded BLAS ``?gemm``, with each
    array's row stride as its leading dimension.
    """
    m, n = c.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    if m == 0 or n == 0:
        return
    trans_a = _CBLAS_TRANS if transpose_a else _CBLAS_NO_TRANS
    trans_b = _CBLAS_TRANS if transpose_b else _CBLAS_NO_TRANS
    lda, ldb, ldc = a.strides[0] // a.itemsize, b.strides[0] // b.itemsize, c.strides[0] // c.itemsize
    if c.itemsize == 4:
        _sgemm(_CBLAS_ROW_MAJOR, trans_a, trans_b, m, n, k, np.float32(1.0), a.ctypes.data,
               lda, b.ctypes.data, ldb, np.float32(beta), c.ctypes.data, ldc)
    else:
        _dgemm(_CBLAS_ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a.ctypes.data,
               lda, b.ctypes.data, ldb, beta, c.ctypes.data, ldc)


# --------------------------------------------------------------------------------------------
# im2col and col2im, channels-last
# --------------------------------------------------------------------------------------------

# These two kernels only move data, and are memory-bound only if their inner copy loops vectorise.
# They index flat buffers with unsigned offsets: Numba adds a wrap-around test to every negative-
# capable (signed) index it cannot prove non-negative, and that test alone makes them 2-4x slower.
_ONE = np.uint64(1)


@kernel
def _unsigned_shape(array):
    """The four dimensions of a 4-D array as unsigned ints."""
    return (np.uint64(array.shape[0]), np.uint64(array.shape[1]), np.uint64(array.shape[2]),
            np.uint64(array.shape[3]))


@kernel
def channels_last(array):
    """The (N, C, H, W) ``array`` seen as (N, H, W, C): ``array.transpose(0, 2, 3, 1)``, a view.

    Written with ``as_strided`` because Numba's ``transpose`` with axes compiles its argument
    checks' error messages along with it: 2.5 s of a cold start, for nothing the kernels use."""
    n, c, h, w = array.shape
    sn, sc, sh, sw = array.strides
    return np.lib.stride_tricks.as_strided(array, (n, h, w, c), (sn, sh, sw, sc))


@kernel
def im2col_channels_last(x, kernel_h, kernel_w, cols):
    """Unfold the kernel windows of an NHWC batch, one window per ROW, weights ordered (i, j, c).

    ``cols[(n, oh, ow), (i, j, c)] = x[n, oh + i, ow + j, c]``: in channels-last memory the
    kw C values of one window row are contiguous, so a row of ``cols`` is kh contiguous copies.
    The matching weight matrix is ``weight.transpose(0, 2, 3, 1).reshape(C_out, kh kw C)``
    (:func:`permute_conv_weight`), and ``cols @ W^T`` is the convolution, (N OH OW, C_out).
    The channels-last counterpart of :func:`numpylenet.layers.im2col`.

    x : (N, H, W, C), C-contiguous;  cols : (N OH OW, kh kw C), C-contiguous.
    """
    n_images, height, width, channels = _unsigned_shape(x)
    kh, kw = np.uint64(kernel_h), np.uint64(kernel_w)
    out_h, out_w = height - kh + _ONE, width - kw + _ONE
    run = kw * channels
    source, target = x.ravel(), cols.ravel()
    for n in range(n_images):
        for oh in range(out_h):
            for ow in range(out_w):
                row = (n * out_h + oh) * out_w + ow
                for i in range(kh):
                    to = (row * kh + i) * run
                    start = ((n * height + oh + i) * width + ow) * channels
                    for k in range(run):
                        target[to + k] = source[start + k]


@kernel
def col2im_channels_last(cols, kernel_h, kernel_w, grad_x):
    """The adjoint of :func:`im2col_channels_last`: ADD each row back onto its window of
    grad_x (N, H, W, C). Both arrays C-contiguous; zero grad_x first for the plain adjoint."""
    n_images, height, width, channels = _unsigned_shape(grad_x)
    kh, kw = np.uint64(kernel_h), np.uint64(kernel_w)
    out_h, out_w = height - kh + _ONE, width - kw + _ONE
    run = kw * channels
    source, target = cols.ravel(), grad_x.ravel()
    for n in range(n_images):
        for oh in range(out_h):
            for ow in range(out_w):
                row = (n * out_h + oh) * out_w + ow
                for i in range(kh):
                    start = (row * kh + i) * run
                    to = ((n * height + oh + i) * width + ow) * channels
                    for k in range(run):
                        target[to + k] += source[start + k]


@kernel
def permute_conv_weight(weight, kernel_area, permuted):
    """(C_out, C_in kh kw) in torch's (c, i, j) order -> (C_out, kh kw C_in) in (i, j, c) order."""
    out_c, size = weight.shape
    in_c = size // kernel_area
    for o in range(out_c):
        for c in range(in_c):
            for k in range(kernel_area):
                permuted[o, k * in_c + c] = weight[o, c * kernel_area + k]


# --------------------------------------------------------------------------------------------
# Pointwise: bias + activation, activation derivative (layers.ReLU, Tanh, Sigmoid)
# --------------------------------------------------------------------------------------------

@kernel
def _activate(v, activation, one):
    """f(v) for an activation code: relu max(v, 0), tanh, sigmoid 1 / (1 + exp(-v)), identity.

    ``one`` is 1 in v's dtype (a Numba scalar has no ``.dtype``), so float32 stays float32."""
    if activation == RELU:
        return max(v, one - one)
    if activation == TANH:
        return np.tanh(v)
    if activation == SIGMOID:
        # exp(-|v|) <= 1 never overflows; the two branches are the same function.
        e = np.exp(-abs(v))
        return one / (one + e) if v >= 0 else e / (one + e)
    return v


@kernel(fastmath=True)
def activate_in_place(values, activation):
    """values = f(values) for a 1-D array. Branching on the activation once, outside the loop,
    lets the relu loop vectorise (a loop that may call tanh or exp does not)."""
    one = values.dtype.type(1)
    if activation == RELU:
        for k in range(values.size):
            values[k] = _activate(values[k], RELU, one)
    else:
        for k in range(values.size):
            values[k] = _activate(values[k], activation, one)


@kernel(fastmath=True)
def bias_activation(z, bias, activation):
    """In place: z[r, c] = f(z[r, c] + bias[c]) for z (R, C), f given by its code.

    The forward pass of :class:`numpylenet.layers.ReLU` / ``Tanh`` / ``Sigmoid``, fused with the
    bias of the layer before."""
    rows, channels = z.shape
    one = z.dtype.type(1)
    for r in range(rows):
        for c in range(channels):
            z[r, c] = _activate(z[r, c] + bias[c], activation, one)


@kernel
def _derivative(y, activation, one):
    """f'(x) written in terms of y = f(x): relu [y > 0], tanh 1 - y^2, sigmoid y (1 - y).

    ``one`` is 1 in y's dtype (a Numba scalar has no ``.dtype``), so float32 stays float32."""
    if activation == RELU:
        return one if y > 0 else one - one
    if activation == TANH:
        return one - y * y
    if activation == SIGMOID:
        return y * (one - y)
    return one


@kernel(fastmath=True)
def activation_backward(grad, y, activation):
    """In place: grad *= f'(x) for 2-D grad and y = f(x) of the same shape.

    The backward pass of :class:`numpylenet.layers.ReLU` / ``Tanh`` / ``Sigmoid``."""
    rows, columns = grad.shape
    one = grad.dtype.type(1)
    for r in range(rows):
        for c in range(columns):
            grad[r, c] *= _derivative(y[r, c], activation, one)


# --------------------------------------------------------------------------------------------
# Pooling, channels-last, non-overlapping windows (layers.AvgPool2d, MaxPool2d; torch: stride =
# kernel, floor mode)
# --------------------------------------------------------------------------------------------

@kernel(fastmath=True)
def pool_forward(y, pool, window, out):
    """out[n, oh, ow, c] = mean or max of y[n, oh kh + i, ow kw + j, c] over the window.

    The forward pass of :class:`numpylenet.layers.AvgPool2d` / ``MaxPool2d`` with stride = window.
    y : (N, H, W, C);  window : (kh, kw);  out : (N, H // kh, W // kw, C), any strides. The channel
    loop is innermost, over contiguous memory, so it vectorises.
    """
    kernel_h, kernel_w = window
    n_images, _, _, channels = y.shape
    out_h, out_w = out.shape[1], out.shape[2]
    scale = y.dtype.type(1.0 / (kernel_h * kernel_w))
    for n in range(n_images):
        for oh in range(out_h):
            for ow in range(out_w):
                h0, w0 = oh * kernel_h, ow * kernel_w
                for c in range(channels):
                    out[n, oh, ow, c] = y[n, h0, w0, c]
                for i in range(kernel_h):
                    for j in range(kernel_w):
                        if i + j == 0:
                            continue
                        if pool == MAX:
                            for c in range(channels):
                                out[n, oh, ow, c] = max(out[n, oh, ow, c], y[n, h0 + i, w0 + j, c])
                        else:
                            for c in range(channels):
                                out[n, oh, ow, c] += y[n, h0 + i, w0 + j, c]
                if pool == AVG:
                    for c in range(channels):
                        out[n, oh, ow, c] *= scale


@kernel(fastmath=True)
def pool_activation_backward(grad_out, y, codes, window, grad_z):
    """dL/dz before activation and pooling, from dL/d(pooled) ``grad_out``.

    The backward passes of :class:`numpylenet.layers.AvgPool2d` / ``MaxPool2d``, then of the
    activation. Pooling backward: avg gives each pixel of a window grad / (kh kw); max gives the
    whole gradient to the first pixel (row-major in the window) that holds the maximum, as torch.
    Pixels outside every window (floor mode) get 0. Then the activation: grad_z = grad_y * f'(x),
    with f' computed from y = f(x) (:func:`activation_backward`, row by row).

    grad_out : (N, OH, OW, C) any strides;  y, grad_z : (N, H, W, C);  codes : :class:`Codes`;
    window : (kh, kw).
    """
    activation, pool = codes
    kernel_h, kernel_w = window
    n_images, height, width, channels = y.shape
    out_h, out_w = grad_out.shape[1], grad_out.shape[2]
    scale = y.dtype.type(1.0 / (kernel_h * kernel_w))
    for n in range(n_images):
        grad_z[n] = 0               # off every window, and max pooling's losers
        for oh in range(out_h):
            for ow in range(out_w):
                h0, w0 = oh * kernel_h, ow * kernel_w
                # The channel loop innermost, over channels-last memory: it vectorises.
                if pool == AVG:
                    for i in range(kernel_h):
                        for j in range(kernel_w):
                            for c in range(channels):
                                grad_z[n, h0 + i, w0 + j, c] = grad_out[n, oh, ow, c] * scale
                else:
                    for c in range(channels):
                        best_i, best_j = 0, 0
                        for i in range(kernel_h):
                            for j in range(kernel_w):
                                if y[n, h0 + i, w0 + j, c] > y[n, h0 + best_i, w0 + best_j, c]:
                                    best_i, best_j = i, j
                        grad_z[n, h0 + best_i, w0 + best_j, c] = grad_out[n, oh, ow, c]
        # The activation's branch out of the pooling's loops, so that both vectorise.
        for h in range(height):
            activation_backward(grad_z[n, h], y[n, h], activation)


@kernel(fastmath=True)
def _add_column_sums(matrix, out):
    """out[c] += sum_r matrix[r, c]: the bias gradient of a (R, C) output gradient."""
    rows, columns = matrix.shape
    for r in range(rows):
        for c in range(columns):
            out[c] += matrix[r, c]


# --------------------------------------------------------------------------------------------
# conv1: the direct convolution of a one-channel image, fused with activation and pooling
# --------------------------------------------------------------------------------------------

# With one input channel, im2col would copy every pixel 25 times only to feed products with six
# rows. These two kernels instead work on the image in place, in flat positions p = oh W + ow of
# its rows (width W), where the 5x5 kernel's tap (i, j) sits at offset i W + j. Their loops run
# over all (OH - 1) W + OW positions at once: a single output row (OW = 28) is too short for the
# 32-wide unrolled vector loop LLVM emits, so a loop per row would run scalar. conv1's output is
# therefore kept in the same row layout, (N, C, OH, W); the positions with ow >= OW straddle two
# rows: computed, never used, and their gradient is 0.


@kernel(fastmath=True, inline='always')
def conv1_forward(x, conv1, codes, y, pooled):
    """conv1's forward pass: :class:`numpylenet.layers.Conv2d` (one input channel, 5x5), then the
    activation and the 2x2 pooling, in one pass over the image::

        y[n, c, p] = f(b[c] + sum_{i, j} W[c, (i, j)] x[n, p + i W + j])   (p = oh W + ow)
        pooled[n, ph, pw, c] = mean or max of y[n, c, 2 ph + i, 2 pw + j] over i, j in {0, 1}

    The same numbers as Conv2d's ``Y = W_mat @ cols + bias``, with each column of cols read from
    the image where it lies. Any image size H x W and any channel count C.

    Parameters
    ----------
    x : ndarray, shape (N, 1, H, W)
    conv1 : (weight, bias), shapes (C, 25) in torch's (i, j) order and (C,)
    codes : Codes
    y : ndarray, shape (N, C, OH, W), C-contiguous, OH = H - 4; written. Valid for
        ow < OW = W - 4 (see above); its last four entries, past the last window, are set to 0.
    pooled : ndarray, shape (N, OH // 2, OW // 2, C), channels-last; written.
    """
    weight, bias = conv1
    activation, pool = codes
    n_images, channels, out_h, width = _unsigned_shape(y)
    pooled_h, pooled_w = np.uint64(pooled.shape[1]), np.uint64(pooled.shape[2])
    span = (out_h - _ONE) * width + width - np.uint64(KERNEL - 1)
    one = y.dtype.type(1)
    scale = y.dtype.type(1.0 / (POOL * POOL))
    for n in range(n_images):
        image = x[n, 0].ravel()
        for c in range(channels):
            z = y[n, c].ravel()
            for p in range(span):
                total = one - one           # 0 in y's dtype
                for i in range(KERNEL):
                    for j in range(KERNEL):      # unrolled: 25 multiply-adds on shifted loads
                        tap = np.uint64(i) * width + np.uint64(j)
                        total += weight[c, i * KERNEL + j] * image[p + tap]
                z[p] = total + bias[c]
            z[span:] = 0
            activate_in_place(z[:span], activation)
            # pool_forward on a transposed view of y computes the same, but its window size is a
            # run-time argument, and with it the whole forward pass measured 8% slower.
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    corner = (ph * width + pw) * np.uint64(POOL)
                    result = z[corner]
                    for i in range(POOL):
                        for j in range(POOL):
                            value = z[corner + np.uint64(i) * width + np.uint64(j)]
                            if pool == MAX:
                                result = max(result, value)
                            elif i + j > 0:
                                result += value
                    pooled[n, ph, pw, c] = result if pool == MAX else result * scale


@kernel(fastmath=True, inline='always')
def conv1_backward(grad_pooled, x, y, conv1, codes, grad_conv1, grad_z, grad_x, input_grad):
    """conv1's backward pass (:meth:`numpylenet.layers.Conv2d.backward` after the pooling's and the
    activation's), from dL/d(pooled) in the row layout of :func:`conv1_forward`::

        dz = pooling backward of grad_pooled, times f'        (0 at the straddling positions)
        dW[c, (i, j)] += sum_p dz[c, p] x[p + i W + j]        db[c] += sum_p dz[c, p]
        dx[p + i W + j] = sum_{c, p} W[c, (i, j)] dz[c, p]     (only if input_grad)

    Conv2d's ``dW = dY @ cols^T`` and ``dx = col2im(W^T @ dY)``, with cols read from the image.

    Parameters
    ----------
    grad_pooled : ndarray, shape (N, OH // 2, OW // 2, C), channels-last: dL/d(pooled)
    x : ndarray, shape (N, 1, H, W), the input conv1_forward saw
    y : ndarray, shape (N, C, OH, W), as conv1_forward stored it
    conv1 : (weight, bias), shapes (C, 25) and (C,)
    codes : Codes
    grad_conv1 : (grad_weight, grad_bias), shapes (C, 25) and (C,); added to.
    grad_z : ndarray, shape (C, OH, W); scratch (dL/dz of one image).
    grad_x : ndarray, shape (N, 1, H, W); overwritten with dL/dx if ``input_grad``.
    input_grad : bool
    """
    weight = conv1[0]
    grad_weight, grad_bias = grad_conv1
    activation, pool = codes
    n_images, channels, out_h, width = _unsigned_shape(y)
    pooled_h, pooled_w = np.uint64(grad_pooled.shape[1]), np.uint64(grad_pooled.shape[2])
    span = (out_h - _ONE) * width + width - np.uint64(KERNEL - 1)
    zero = y.dtype.type(0)
    scale = y.dtype.type(1.0 / (POOL * POOL))
    for n in range(n_images):
        image = x[n, 0].ravel()
        for c in range(channels):
            # pool_activation_backward in the row layout, in two passes: first the pooling's
            # backward (avg: grad / 4 to each pixel of the window; max: grad to the first pixel
            # holding the maximum, as torch), 0 off every window; then, over the whole channel,
            # times f' (activation_backward). With the activation's branch out of the pooling's
            # loops, both passes vectorise (conv1's whole backward: 8.1 -> 7.4 us an image).
            dz, z = grad_z[c].ravel(), y[n, c].ravel()
            dz[:] = 0
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    corner = (ph * width + pw) * np.uint64(POOL)
                    grad = grad_pooled[n, ph, pw, c]
                    if pool == AVG:
                        for i in range(POOL):
                            for j in range(POOL):
                                dz[corner + np.uint64(i) * width + np.uint64(j)] = grad * scale
                    else:
                        winner = corner
                        for i in range(POOL):
                            for j in range(POOL):
                                position = corner + np.uint64(i) * width + np.uint64(j)
                                if z[position] > z[winner]:
                                    winner = position
                        dz[winner] = grad
            activation_backward(grad_z[c], y[n, c], activation)
            total = zero
            for p in range(span):
                total += dz[p]
            grad_bias[c] += total
        # dW, two channels at a time, one pass over their dz per row of taps, summing their ten
        # dot products at once: each image value is loaded once for two channels' multiply-adds,
        # each dz[p] once for five (a pass per tap loads two values for each multiply-add; conv1's
        # whole backward pass: 7.6 us an image one channel at a time, 5.8 two at a time). Written
        # out for LeNet-5's five taps a row: tests/test_kernels.py checks it against the NumPy
        # layer. An odd last channel is paired with itself, and its twin's sums dropped.
        for c in range(0, weight.shape[0], 2):
            twin = min(c + 1, weight.shape[0] - 1)
            dz, dz_twin = grad_z[c].ravel(), grad_z[twin].ravel()
            for i in range(KERNEL):
                row = image[np.uint64(i) * width:]
                tap0 = tap1 = tap2 = tap3 = tap4 = zero
                twin0 = twin1 = twin2 = twin3 = twin4 = zero
                for p in range(span):
                    grad, grad_twin = dz[p], dz_twin[p]
                    value0, value1, value2 = row[p], row[p + _ONE], row[p + np.uint64(2)]
                    value3, value4 = row[p + np.uint64(3)], row[p + np.uint64(4)]
                    tap0 += grad * value0
                    tap1 += grad * value1
                    tap2 += grad * value2
                    tap3 += grad * value3
                    tap4 += grad * value4
                    twin0 += grad_twin * value0
                    twin1 += grad_twin * value1
                    twin2 += grad_twin * value2
                    twin3 += grad_twin * value3
                    twin4 += grad_twin * value4
                first = i * KERNEL
                for j, total in enumerate((tap0, tap1, tap2, tap3, tap4)):
                    grad_weight[c, first + j] += total
                if twin != c:
                    for j, total in enumerate((twin0, twin1, twin2, twin3, twin4)):
                        grad_weight[twin, first + j] += total
        if input_grad:
            grad_image = grad_x[n, 0].ravel()
            grad_image[:] = 0
            for c in range(channels):
                dz = grad_z[c].ravel()
                # The 25 taps by one loop over k, which LLVM keeps rolled: written as two loops
                # of KERNEL, it unrolled them into 25 copies of the vectorised p loop, 0.4 s of
                # compiling for a path that training never takes.
                for k in range(weight.shape[1]):
                    i, j = divmod(k, KERNEL)
                    tap = np.uint64(i) * width + np.uint64(j)
                    w = weight[c, k]
                    for p in range(span):
                        grad_image[p + tap] += w * dz[p]


# --------------------------------------------------------------------------------------------
# conv2: channels-last im2col and one matrix product, fused with activation and pooling
# --------------------------------------------------------------------------------------------

@kernel(inline='always')
def conv2_forward(x, conv2, codes, cols, y, pooled):
    """conv2's forward pass: :class:`numpylenet.layers.Conv2d` (5x5) as im2col and one product,
    then bias + activation on the product and the 2x2 pooling, all channels-last::

        cols = im2col(x)                  (N OH OW, kh kw C_in), rows (n, oh, ow), columns (i, j, c)
        Z = cols @ W^T                    (N OH OW, C_out): y channels-last as it stands
        y = f(Z + b);  pooled = mean or max of y over each 2x2 window

    Conv2d's ``Y = W_mat @ cols + bias`` transposed, so that its rows are output pixels.

    Parameters
    ----------
    x : ndarray, shape (N, H, W, C_in), channels-last
    conv2 : (weight, bias), shapes (C_out, kh kw C_in) in (i, j, c) order (see
        :func:`permute_conv_weight`) and (C_out,)
    codes : Codes
    cols : ndarray, 1-D, at least N OH OW kh kw C_in entries; scratch.
    y : ndarray, shape (N, OH, OW, C_out), channels-last; written.
    pooled : ndarray, shape (N, C_out, OH // 2, OW // 2), torch's (c, h, w) order (conv3 reads it
        as it stands); written.
    """
    weight, bias = conv2
    activation, pool = codes
    n_images, out_h, out_w, channels = y.shape
    rows = n_images * out_h * out_w
    unfolded = cols[:rows * weight.shape[1]].reshape(rows, weight.shape[1])
    im2col_channels_last(x, KERNEL, KERNEL, unfolded)
    z = y.reshape(rows, channels)
    gemm(unfolded, weight, z, False, True)                 # Z = cols @ W^T
    bias_activation(z, bias, activation)
    pool_forward(y, pool, POOL_WINDOW, channels_last(pooled))


@kernel(inline='always')
def conv2_backward(grad_pooled, x, y, conv2, codes, grad_conv2, cols, cols_ready, grad_z, grad_x):
    """conv2's backward pass (:meth:`numpylenet.layers.Conv2d.backward` after the pooling's and
    the activation's), channels-last as :func:`conv2_forward`::

        dZ = pooling backward of grad_pooled, times f'    (N OH OW, C_out)
        db += sum over rows of dZ;   dW += dZ^T @ cols;   dcols = dZ @ W;   dx = col2im(dcols)

    Parameters
    ----------
    grad_pooled : ndarray, shape (N, C_out, OH // 2, OW // 2): dL/d(pooled)
    x : ndarray, shape (N, H, W, C_in), the input conv2_forward saw
    y : ndarray, shape (N, OH, OW, C_out), as conv2_forward stored it
    conv2 : (weight, bias), as in conv2_forward
    codes : Codes
    grad_conv2 : (grad_weight, grad_bias), shapes (C_out, kh kw C_in) in (i, j, c) order and
        (C_out,); added to.
    cols : ndarray, 1-D, as in conv2_forward: the im2col of x if ``cols_ready`` (else formed
        here); overwritten with dL/dcols.
    cols_ready : bool, whether ``cols`` holds what conv2_forward left there for this x.
    grad_z : ndarray, shape (N, OH, OW, C_out); scratch (dL/dZ).
    grad_x : ndarray, shape (N, H, W, C_in); overwritten with dL/dx.
    """
    weight = conv2[0]
    grad_weight, grad_bias = grad_conv2
    n_images, out_h, out_w, channels = y.shape
    rows = n_images * out_h * out_w
    pool_activation_backward(channels_last(grad_pooled), y, codes, POOL_WINDOW, grad_z)
    dz = grad_z.reshape(rows, channels)
    _add_column_sums(dz, grad_bias)                        # db += sum over rows of dZ
    unfolded = cols[:rows * weight.shape[1]].reshape(rows, weight.shape[1])
    if not cols_ready:
        im2col_channels_last(x, KERNEL, KERNEL, unfolded)
    gemm(dz, unfolded, grad_weight, True, False, 1.0)      # dW += dZ^T @ cols
    gemm(dz, weight, unfolded, False, False)               # dcols = dZ @ W
    grad_x[:] = 0
    col2im_channels_last(unfolded, KERNEL, KERNEL, grad_x)


# --------------------------------------------------------------------------------------------
# Dense layers: conv3 (one window), fc1, fc2
# --------------------------------------------------------------------------------------------

@kernel(inline='always')
def dense_forward(x, layer, activation, y):
    """A dense layer's forward pass, :class:`numpylenet.layers.Linear` then the activation
    (IDENTITY for fc2)::

        y = f(x @ W^T + b)

    conv3 runs here too: its 5x5 kernel covers its whole 5x5 input, so :class:`Conv2d`'s im2col
    has one column per image, the flattened input, and the convolution is this product.

    Parameters
    ----------
    x : ndarray, shape (N, in)
    layer : (weight, bias), shapes (out, in) and (out,)
    activation : int, an activation code, or IDENTITY
    y : ndarray, shape (N, out); written.
    """
    weight, bias = layer
    gemm(x, weight, y, False, True)
    bias_activation(y, bias, activation)


@kernel(inline='always')
def dense_backward(grad_y, y, layer, activation, grad_x):
    """A dense layer's backward pass, per image: the activation's, then the input-gradient half of
    :meth:`numpylenet.layers.Linear.backward` (for conv3, :meth:`~numpylenet.layers.Conv2d.backward`
    on its single window); :func:`dense_weight_grad` is the other half::

        dZ = dY * f'(z), in place in grad_y (f' from y = f(z); skipped for IDENTITY)
        dx = dZ @ W

    Parameters
    ----------
    grad_y : ndarray, shape (N, out): dL/dy on entry, dL/dz on return
    y : ndarray, shape (N, out), as dense_forward wrote it
    layer : (weight, bias), shapes (out, in) and (out,)
    activation : int, as in dense_forward
    grad_x : ndarray, shape (N, in); overwritten with dL/dx.
    """
    if activation != IDENTITY:
        activation_backward(grad_y, y, activation)
    gemm(grad_y, layer[0], grad_x, False, False)           # dx = dZ @ W


@kernel(inline='always')
def dense_weight_grad(grad_z, x, grad_layer, part, parts):
    """The weight-gradient half of :meth:`numpylenet.layers.Linear.backward` (for conv3, of
    :meth:`~numpylenet.layers.Conv2d.backward` on its single window), over the whole batch, for
    the rows ``part * out // parts`` up to ``(part + 1) * out // parts`` of the layer's weight::

        dW[rows] += dZ[:, rows]^T @ x;   db[rows] += sum_n dZ[n, rows]

    so that ``parts`` threads, each given its own ``part``, write disjoint rows.

    Parameters
    ----------
    grad_z : ndarray, shape (N, out): dL/dz, as :func:`dense_backward` left it
    x : ndarray, shape (N, in), the input dense_forward saw
    grad_layer : (grad_weight, grad_bias), shapes (out, in) and (out,); added to.
    part, parts : int, 0 <= part < parts
    """
    grad_weight, grad_bias = grad_layer
    out = grad_weight.shape[0]
    rows = slice(part * out // parts, (part + 1) * out // parts)
    gemm(grad_z[:, rows], x, grad_weight[rows], True, False, 1.0)
    _add_column_sums(grad_z[:, rows], grad_bias[rows])


# --------------------------------------------------------------------------------------------
# The work buffers and the parameters, as the kernels see them
# --------------------------------------------------------------------------------------------

class Parameters(NamedTuple):
    """The ten parameters, or their gradients, as views into a flat buffer (see
    :func:`parameter_views`): per layer a (weight, bias) pair, conv weights as matrices."""
    conv1: tuple    # (6, 25), (6,)
    conv2: tuple    # (16, 150), (16,): in the kernels, the weight is in (i, j, c) order
    conv3: tuple    # (120, 400), (120,)
    fc1: tuple      # (84, 120), (84,)
    fc2: tuple      # (10, 84), (10,)


# Where each layer's (weight, bias) pair sits in the flat buffer: (weight start, bias start, bias
# end, weight rows), plain ints, so that one compiled _layer_views serves all five layers.
_LAYER_PLACES = tuple((_OFFSETS[2 * layer], _OFFSETS[2 * layer + 1], _OFFSETS[2 * layer + 2], rows)
                      for layer, (rows, _) in enumerate(_WEIGHT_MATRICES))


@kernel
def _layer_views(flat, place):
    """(weight matrix, bias) of the layer at ``place`` (an entry of _LAYER_PLACES), views into ``flat``."""
    weight_start, bias_start, bias_end, rows = place
    weight = flat[weight_start:bias_start]
    return weight.reshape(rows, weight.size // rows), flat[bias_start:bias_end]


@kernel
def parameter_views(flat):
    """The ten parameters in ``flat`` (NUM_PARAMETERS,) as :class:`Parameters`, in torch's order:
    views, conv weights as (C_out, C_in kh kw) matrices."""
    conv1, conv2, conv3, fc1, fc2 = _LAYER_PLACES
    return Parameters(_layer_views(flat, conv1), _layer_views(flat, conv2), _layer_views(flat, conv3),
                      _layer_views(flat, fc1), _layer_views(flat, fc2))


@kernel
def _with_conv2_weight(params, conv2_weight):
    """``params`` with conv2's weight replaced by ``conv2_weight``: the same layer, its weight in
    the (i, j, c) order that conv2's channels-last im2col needs (see permute_conv_weight)."""
    return Parameters(params.conv1, (conv2_weight, params.conv2[1]), params.conv3, params.fc1,
                      params.fc2)


class Workspace(NamedTuple):
    """Every array the passes read and write, for one batch size N and thread count T.

    Built by :func:`make_workspace`. The per-batch arrays are split between threads by images,
    the per-thread ones by their first axis. Names are those of :class:`numpylenet.LeNet5`'s
    layers; ``grad_<name>`` is dL/d(<name>'s output). All in the model's dtype but for the
    four marked (int64) or (float64).
    """
    # Per batch: what the forward pass stores for the backward pass.
    x: np.ndarray                  # (N, 1, 32, 32)   a copy of the input
    conv1: np.ndarray              # (N, 6, 28, 32)   after activation, in the input's rows
    pool1: np.ndarray              # (N, 14, 14, 6)   channels-last
    conv2: np.ndarray              # (N, 10, 10, 16)  after activation, channels-last
    pool2: np.ndarray              # (N, 16, 5, 5)    torch's (c, h, w) order: conv3's (N, 400) input
    conv3: np.ndarray              # (N, 120)         after activation
    fc1: np.ndarray                # (N, 84)          after activation
    logits: np.ndarray             # (N, 10)
    # Per batch: the loss's targets, copied in for a training step.
    labels: np.ndarray             # (N,) int64
    label_smoothing: np.ndarray    # (1,) float64
    # Per batch: the backward pass's gradients (a dense layer's backward turns dL/dy into
    # dL/dz in place, before its activation).
    grad_logits: np.ndarray        # (N, 10)          the loss's, or the caller's copied in
    grad_fc1: np.ndarray           # (N, 84)
    grad_conv3: np.ndarray         # (N, 120)
    grad_pool2: np.ndarray         # (N, 16, 5, 5)
    grad_x: np.ndarray             # (N, 1, 32, 32)   written only if the input gradient is asked
    # Shared: conv2's weight reordered (i, j, c), rebuilt at the start of each region.
    conv2_weight: np.ndarray       # (16, 150)
    # Per thread: scratch, and each thread's own sums.
    cols2: np.ndarray              # (T, SUB_BATCH * 100 * 150)  conv2's im2col of a sub-batch
    cols2_images: np.ndarray       # (T, 2) int64     the images (start, stop) whose im2col cols2[t]
                                   #   holds, (-1, -1) if none (see backward_images)
    grad_conv1: np.ndarray         # (T, 6, 28, 32)   conv1's dL/dz, one image at a time
    grad_pool1: np.ndarray         # (T, SUB_BATCH, 14, 14, 6)
    grad_conv2: np.ndarray         # (T, SUB_BATCH, 10, 10, 16)  conv2's dL/dz
    conv_grads: np.ndarray         # (T, CONV_PARAMETERS)  conv1's and conv2's dL/dW (flat_grad's
                                   #   first entries; conv2's weight in (i, j, c) order), zeroed
                                   #   before a backward pass, summed into flat_grad after it
    losses: np.ndarray             # (T,) float64     the sum of the thread's images' losses


# The arrays of a Workspace that are not in the model's dtype.
_WORKSPACE_DTYPES = {"labels": np.int64, "label_smoothing": np.float64, "cols2_images": np.int64,
                     "losses": np.float64}


def make_workspace(batch_size: int, threads: int, dtype) -> Workspace:
    """The :class:`Workspace` for ``batch_size`` images split over ``threads`` threads
    (uninitialised, but for ``cols2_images``: no im2col held yet)."""
    n, t, sub = batch_size, threads, SUB_BATCH
    c1, c2, k2 = CONV1_CHANNELS, CONV2_CHANNELS, CONV2_COLUMNS
    image = (n, 1, INPUT_SIZE, INPUT_SIZE)
    shapes = Workspace(
        x=image, conv1=(n, c1, CONV1_SIZE, INPUT_SIZE), pool1=(n, POOL1_SIZE, POOL1_SIZE, c1),
        conv2=(n, CONV2_SIZE, CONV2_SIZE, c2), pool2=(n, c2, POOL2_SIZE, POOL2_SIZE),
        conv3=(n, CONV3_CHANNELS), fc1=(n, FC1_FEATURES), logits=(n, NUM_CLASSES),
        labels=(n,), label_smoothing=(1,),
        grad_logits=(n, NUM_CLASSES), grad_fc1=(n, FC1_FEATURES), grad_conv3=(n, CONV3_CHANNELS),
        grad_pool2=(n, c2, POOL2_SIZE, POOL2_SIZE), grad_x=image,
        conv2_weight=(c2, k2),
        cols2=(t, sub * CONV2_SIZE * CONV2_SIZE * k2), cols2_images=(t, 2),
        grad_conv1=(t, c1, CONV1_SIZE, INPUT_SIZE), grad_pool1=(t, sub, POOL1_SIZE, POOL1_SIZE, c1),
        grad_conv2=(t, sub, CONV2_SIZE, CONV2_SIZE, c2), conv_grads=(t, CONV_PARAMETERS), losses=(t,))
    work = Workspace(*(np.empty(shape, _WORKSPACE_DTYPES.get(name, dtype))
                       for name, shape in zip(Workspace._fields, shapes)))
    work.cols2_images.fill(-1)
    return work


# --------------------------------------------------------------------------------------------
# The whole network: LeNet5.forward and LeNet5.backward
# --------------------------------------------------------------------------------------------

# The parallel kernel, on_threads, takes the per-thread passes (forward_images, loss_images,
# backward_images, weight_grads) as the addresses of their compiled code, instead of calling them
# by name. Called by name, Numba would link the whole network's code into the parallel kernel's
# module, and into each of the three modules that a parallel loop adds (the loop body, its gufunc
# wrapper, the thread launcher), optimising and emitting it again in each: 18 of the 37 s that
# compiling took on an empty cache. Called through a pointer, each of those modules holds a few
# loops, and the network is compiled once. The addresses travel as plain integers, in an array:
# handed over as Numba's first-class functions (objects with a ``__wrapper_address__``), each
# would cost about 4 us at every call, Numba unpickling its signature twice to unbox it.

class KernelAddress:
    """A kernel compiled for the types of ``example_args`` (or loaded from Numba's cache), and
    the address of its code, ``address``, for :func:`on_threads` to call."""

    def __init__(self, dispatcher, example_args: tuple):
        compiled = dispatcher.get_compile_result(self.signature_of(example_args))
        self.address = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_cfunc_wrapper_name)

    @staticmethod
    def signature_of(example_args: tuple):
        """The kernel's Numba signature for arguments like ``example_args``: ``void(...)``."""
        return types.void(*(typeof(arg) for arg in example_args))


@intrinsic
def _pass_at(typingctx, address, flat_params, flat_grad, codes, work, input_grad):
    """The per-thread pass whose code is at ``address`` (a :class:`KernelAddress`'s), as a
    function to call with (flat_params, flat_grad, codes, work, t, lo, hi, input_grad) of the
    types given: the value Numba itself builds for a first-class function (its C wrapper's
    address, no Python object, no direct entry point). The address must be of a pass compiled
    for exactly these types."""
    pass_type = types.FunctionType(types.void(flat_params, flat_grad, codes, work, types.int64,
                                              types.int64, types.int64, input_grad))

    def codegen(context, builder, signature, args):
        function = cgutils.create_struct_proxy(pass_type)(context, builder)
        function.c_addr = builder.inttoptr(args[0], cgutils.voidptr_t)
        function.py_addr = cgutils.get_null_value(cgutils.voidptr_t)
        function.jit_addr = cgutils.get_null_value(cgutils.voidptr_t)
        return function._getvalue()

    return pass_type(address, flat_params, flat_grad, codes, work, input_grad), codegen


# Every per-thread pass has this one signature, so that one parallel kernel, on_threads, runs them
# all: each parallel kernel took 1.3 s (one loop) to 2.9 s (two) to compile (the loop body, its
# gufunc wrapper and the thread launcher are three more modules). A pass ignores what it does not
# use.

@kernel(fastmath=True)
def forward_images(flat_params, flat_grad, codes, work, t, lo, hi, input_grad):
    """The forward pass of images lo:hi on thread t, with its own scratch (entry t of each
    per-thread array of ``work``). Reads like :meth:`numpylenet.LeNet5.forward`: conv1 and conv2
    SUB_BATCH images at a time, then conv3, fc1 and fc2 on all of them. Notes in
    ``work.cols2_images[t]`` which images' im2col its last conv2 left in ``work.cols2[t]``.
    (``flat_grad`` and ``input_grad``: unused.)"""
    params = _with_conv2_weight(parameter_views(flat_params), work.conv2_weight)
    for start in range(lo, hi, SUB_BATCH):
        stop = min(start + SUB_BATCH, hi)
        images = slice(start, stop)
        conv1_forward(work.x[images], params.conv1, codes, y=work.conv1[images], pooled=work.pool1[images])
        conv2_forward(work.pool1[images], params.conv2, codes, cols=work.cols2[t], y=work.conv2[images],
                      pooled=work.pool2[images])
        work.cols2_images[t, 0], work.cols2_images[t, 1] = start, stop
    mine = slice(lo, hi)
    pool2 = work.pool2[mine].reshape(hi - lo, -1)            # conv3's input: its one 5x5 window
    dense_forward(pool2, params.conv3, codes.activation, y=work.conv3[mine])
    dense_forward(work.conv3[mine], params.fc1, codes.activation, y=work.fc1[mine])
    dense_forward(work.fc1[mine], params.fc2, np.int64(IDENTITY), y=work.logits[mine])


@kernel
def loss_images(flat_params, flat_grad, codes, work, t, lo, hi, input_grad):
    """The loss of images lo:hi on thread t, in a training step's
    :meth:`numpylenet.LeNet5.forward_backward`: :func:`cross_entropy_rows` of their logits
    against ``work.labels``, with ``work.label_smoothing[0]``, its gradient into
    ``work.grad_logits`` (the mean over all N images of the batch), its sum added to
    ``work.losses[t]``.
    (``flat_params``, ``flat_grad``, ``codes``, ``input_grad``: unused.)"""
    mine = slice(lo, hi)
    work.losses[t] += cross_entropy_rows(work.logits[mine], work.labels[mine], work.label_smoothing[0],
                                         work.x.shape[0], work.grad_logits[mine])


@kernel(fastmath=True)
def backward_images(flat_params, flat_grad, codes, work, t, lo, hi, input_grad):
    """The backward pass of images lo:hi on thread t, with its own scratch. Reads like
    :meth:`numpylenet.LeNet5.backward`: fc2, fc1 and conv3 on all the images (dL/dz and dL/dx:
    their dL/dW comes after, over the whole batch, in :func:`weight_grads`), then conv2 and conv1
    SUB_BATCH images at a time, adding their dL/dW into the thread's own ``work.conv_grads[t]``.

    conv2's backward needs the im2col of its input, which its forward pass formed: when
    ``work.cols2[t]`` still holds it (``work.cols2_images[t]`` names these very images, as when
    :func:`on_threads` runs the forward pass, the loss and this pass on one sub-batch after
    another), it is used as it stands; else it is formed again. conv2's backward then overwrites
    it. (``flat_grad``: unused.)"""
    params = _with_conv2_weight(parameter_views(flat_params), work.conv2_weight)
    conv1_grads = _layer_views(work.conv_grads[t], _LAYER_PLACES[0])
    conv2_grads = _layer_views(work.conv_grads[t], _LAYER_PLACES[1])   # the weight's in (i, j, c) order
    activation, mine = codes.activation, slice(lo, hi)
    dense_backward(work.grad_logits[mine], work.logits[mine], params.fc2, np.int64(IDENTITY),
                   grad_x=work.grad_fc1[mine])
    dense_backward(work.grad_fc1[mine], work.fc1[mine], params.fc1, activation, grad_x=work.grad_conv3[mine])
    grad_pool2 = work.grad_pool2[mine].reshape(hi - lo, -1)
    dense_backward(work.grad_conv3[mine], work.conv3[mine], params.conv3, activation,
                   grad_x=grad_pool2)                                    # conv3 on its one window
    for start in range(lo, hi, SUB_BATCH):
        stop = min(start + SUB_BATCH, hi)
        images, count = slice(start, stop), stop - start
        cols_ready = work.cols2_images[t, 0] == start and work.cols2_images[t, 1] == stop
        work.cols2_images[t, 0], work.cols2_images[t, 1] = -1, -1
        grad_pool1 = work.grad_pool1[t, :count]
        conv2_backward(work.grad_pool2[images], work.pool1[images], work.conv2[images], params.conv2,
                       codes, grad_conv2=conv2_grads, cols=work.cols2[t], cols_ready=cols_ready,
                       grad_z=work.grad_conv2[t, :count], grad_x=grad_pool1)
        conv1_backward(grad_pool1, work.x[images], work.conv1[images], params.conv1, codes,
                       grad_conv1=conv1_grads, grad_z=work.grad_conv1[t], grad_x=work.grad_x[images],
                       input_grad=input_grad)


@kernel
def _add_threads_sum(conv_grads, stored, flat_grad, index):
    """flat_grad[index] += the sum over threads of conv_grads[:, stored]."""
    total = conv_grads[0, stored]
    for other in range(1, conv_grads.shape[0]):
        total += conv_grads[other, stored]
    flat_grad[index] += total


@kernel
def weight_grads(flat_params, flat_grad, codes, work, t, lo, hi, input_grad):
    """The end of :meth:`numpylenet.LeNet5.backward`: thread t's share of the weight gradients,
    once every thread's :func:`backward_images` is done, added into ``flat_grad``: rows part t of
    T (the threads) of each dense layer's dL/dW over the whole batch (:func:`dense_weight_grad`
    for fc2, fc1 and conv3: one product over all N images, from the dL/dz and the inputs that
    the passes left in ``work``, and no per-thread copy of those 59,000 entries to zero and sum),
    and part t of the sum of the threads' conv1 and conv2 gradients ``work.conv_grads``.
    (``flat_params``, ``codes``, ``lo``, ``hi``, ``input_grad``: unused.)"""
    threads = work.cols2.shape[0]
    grads = parameter_views(flat_grad)
    pool2 = work.pool2.reshape(work.pool2.shape[0], -1)     # conv3's input
    dense_weight_grad(work.grad_logits, work.fc1, grads.fc2, t, threads)
    dense_weight_grad(work.grad_fc1, work.conv3, grads.fc1, t, threads)
    dense_weight_grad(work.grad_conv3, pool2, grads.conv3, t, threads)
    # flat_grad += (the threads' sum), for conv1 and conv2: one addition per step, as the reference.
    # conv2's weight, rows part t, from the (i, j, c) order of its im2col (see permute_conv_weight)
    # back to torch's (c, i, j): entry (o, c, k) is kept at (o, k, c).
    conv2_weight_start, conv2_bias_start = _OFFSETS[2], _OFFSETS[3]
    for o in range(t * CONV2_CHANNELS // threads, (t + 1) * CONV2_CHANNELS // threads):
        row = conv2_weight_start + o * CONV2_COLUMNS
        for c in range(CONV1_CHANNELS):
            for k in range(KERNEL_AREA):
                stored, index = row + k * CONV1_CHANNELS + c, row + c * KERNEL_AREA + k
                _add_threads_sum(work.conv_grads, stored, flat_grad, index)
    # conv1's weight and bias, then conv2's bias, kept in place: entries part t of them.
    conv1_entries = conv2_weight_start
    others = conv1_entries + CONV2_CHANNELS
    for entry in range(t * others // threads, (t + 1) * others // threads):
        index = entry if entry < conv1_entries else conv2_bias_start + entry - conv1_entries
        _add_threads_sum(work.conv_grads, index, flat_grad, index)


@kernel(parallel=True)
def on_threads(program, flat_params, flat_grad, codes, work, input_grad, by_sub_batch):
    """Run a program of per-thread passes on every thread t of ``work`` (T threads, one parallel
    region), after reordering conv2's weight into ``work.conv2_weight`` for the threads to share.
    Thread t takes the slice lo:hi of the batch's N images (t N / T up to (t + 1) N / T) and runs
    ``per_thread(flat_params, flat_grad, codes, work, t, start, stop, input_grad)`` for each pass
    of ``program`` in turn: once on the whole slice, or, if ``by_sub_batch``, on each SUB_BATCH
    images of it in turn, all the passes on one before the next.

    :class:`numpylenet.engine.NumbaLeNet5` runs the network with these programs:

    * forward: :func:`forward_images` on each slice: logits ``work.logits`` (N, 10) for the images
      ``work.x`` (N, 1, 32, 32), storing in ``work`` every activation the backward pass needs;
    * training: :func:`forward_images`, :func:`loss_images`, :func:`backward_images`, by
      sub-batch: each sub-batch's activations and its conv2 im2col are still in the core's cache
      when its backward pass needs them;
    * backward: :func:`backward_images` on each slice, from dL/dlogits ``work.grad_logits``
      (N, 10): every image's dL/dz, conv1's and conv2's dL/dW per thread, and, if ``input_grad``,
      dL/dx into ``work.grad_x``;
    * then, after either of the last two, :func:`weight_grads`: with every image's dL/dz ready,
      the dL/dW of the dense layers, and the threads' conv gradients summed, added into
      ``flat_grad``.

    Parameters
    ----------
    program : ndarray, shape (passes,), uint64: the passes' addresses (:class:`KernelAddress`),
        each compiled for exactly the types of the arguments below
    flat_params : ndarray, shape (NUM_PARAMETERS,), the model's flat parameter buffer
    flat_grad : ndarray, shape (NUM_PARAMETERS,), the model's flat gradient
    codes : Codes
    work : Workspace, :func:`make_workspace`'s for N images and T threads
    input_grad : bool
    by_sub_batch : bool
    """
    threads, n_images = work.cols2.shape[0], work.x.shape[0]
    permute_conv_weight(parameter_views(flat_params).conv2[0], KERNEL_AREA, work.conv2_weight)
    for thread in prange(threads):
        # prange's index is unsigned once parallel: np.int64 keeps one signature for the passes
        t = np.int64(thread)
        lo, hi = t * n_images // threads, (t + 1) * n_images // threads
        step = SUB_BATCH if by_sub_batch else max(hi - lo, 1)
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            for address in program:
                per_thread = _pass_at(address, flat_params, flat_grad, codes, work, input_grad)
                per_thread(flat_params, flat_grad, codes, work, t, start, stop, input_grad)


# --------------------------------------------------------------------------------------------
# The loss (loss.softmax_cross_entropy), on the workspace's rows
# --------------------------------------------------------------------------------------------

@kernel
def cross_entropy_rows(logits, labels, label_smoothing, batch_size, grad_logits):
    """:func:`numpylenet.loss.softmax_cross_entropy` on some rows of a batch of ``batch_size``:
    writes their dL/dz into ``grad_logits``, returns the sum of their losses::

        log p[n, k] = z[n, k] - m_n - log sum_j exp(z[n, j] - m_n)      (m_n = max_j z[n, j])
        q = (1 - eps) onehot(y) + eps / K
        loss_n = -[(1 - eps) log p[n, y_n] + (eps / K) sum_k log p[n, k]]
        dL/dz[n] = (p[n] - q[n]) / batch_size

    so that L, the mean over the batch, is the rows' sums added up, over batch_size. Row by row,
    in the logits' dtype as the NumPy loss computes (the loss summed in float64). A label outside
    [0, K) makes its row's loss and gradient NaN: this kernel runs inside the parallel region,
    where it cannot raise, so :class:`numpylenet.LeNet5` checks labels before.

    logits, grad_logits : (R, K);  labels : (R,) integers;  label_smoothing : eps;
    batch_size : int, N >= R.
    """
    rows, classes = logits.shape
    real = logits.dtype.type
    keep, spread, scale = real(1 - label_smoothing), real(label_smoothing / classes), real(1 / batch_size)
    total = 0.0
    for r in range(rows):
        label = labels[r]
        if label < 0 or label >= classes:
            grad_logits[r] = np.nan
            total += np.nan
            continue
        peak = logits[r, 0]
        for k in range(1, classes):
            peak = max(peak, logits[r, k])
        exp_sum = real(0)
        for k in range(classes):
            exp_sum += np.exp(logits[r, k] - peak)
        log_exp_sum = np.log(exp_sum)
        log_prob_sum = 0.0
        for k in range(classes):
            log_prob = (logits[r, k] - peak) - log_exp_sum
            log_prob_sum += log_prob
            grad_logits[r, k] = (np.exp(log_prob) - spread) * scale
        total -= keep * ((logits[r, label] - peak) - log_exp_sum) + spread * log_prob_sum
        grad_logits[r, label] -= keep * scale
    return total


# --------------------------------------------------------------------------------------------
# Optimisers over the flat buffer (no fastmath: each line rounds exactly as the NumPy optimiser)
# --------------------------------------------------------------------------------------------

@kernel(parallel=True)
def adam_step(params, grads, exp_avg, exp_avg_sq, scalars):
    """One Adam step over flat arrays, rounding exactly as :meth:`numpylenet.optim.Adam.step`.

    ``scalars`` holds, as floats, the fields of :class:`numpylenet.optim.AdamStep` in its order:
    (step_size, bias_correction2_sqrt, beta1, beta2, eps, weight_decay), with
    step_size = lr / (1 - beta1^t) and bias_correction2_sqrt = sqrt(1 - beta2^t) computed there.
    With g = grad + weight_decay p::

        m = m + (1 - beta1) (g - m);   v = beta2 v + (1 - beta2) g^2
        p = p - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)

    m and v update in the parameter dtype; the denominator and the step are formed in float64,
    as NumPy's type promotion does them in the reference.
    """
    step_size, bias_correction2_sqrt, beta1, beta2, eps, weight_decay = scalars
    real = params.dtype.type
    one_minus_beta1, one_minus_beta2 = real(1 - beta1), real(1 - beta2)
    beta2_real, decay = real(beta2), real(weight_decay)
    for i in prange(params.size):
        g = grads[i] + decay * params[i] if weight_decay != 0 else grads[i]
        exp_avg[i] += one_minus_beta1 * (g - exp_avg[i])
        exp_avg_sq[i] *= beta2_real
        exp_avg_sq[i] += one_minus_beta2 * g * g
        denominator = np.float64(np.sqrt(exp_avg_sq[i])) / bias_correction2_sqrt + eps
        params[i] = np.float64(params[i]) - step_size * (np.float64(exp_avg[i]) / denominator)


@kernel(parallel=True)
def sgd_step(params, grads, momentum_buffer, settings, first_step):
    """One SGD step over flat arrays, rounding exactly as :meth:`numpylenet.optim.SGD.step`.

    ``settings`` holds the fields of :class:`numpylenet.optim.SGDSettings` in its order:
    (lr, momentum, dampening, weight_decay) as floats, then nesterov as a bool.
    g = grad + weight_decay p;  with momentum: b = g on the first step, else
    b = momentum b + (1 - dampening) g, and g = g + momentum b (nesterov) or b;  p = p - lr g.
    """
    lr, momentum, dampening, weight_decay, nesterov = settings
    real = params.dtype.type
    rate, decay, mu, keep = real(lr), real(weight_decay), real(momentum), real(1 - dampening)
    for i in prange(params.size):
        g = grads[i] + decay * params[i] if weight_decay != 0 else grads[i]
        if momentum != 0:
            if first_step:
                momentum_buffer[i] = g
            else:
                momentum_buffer[i] *= mu
                momentum_buffer[i] += keep * g
            g = g + mu * momentum_buffer[i] if nesterov else momentum_buffer[i]
        params[i] -= rate * g
