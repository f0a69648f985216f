"""Numba kernels that run the whole LeNet-5 fused, on every core, with BLAS for the matrix products.

The NumPy layers (:mod:`numpylenet.layers`) are the readable reference: one layer at a time, NCHW,
each a forward/backward pair. This module computes the same numbers faster by changing *where*
the work happens, never *what* is computed:

* **One pass per thread.** The batch is split into one contiguous slice of images per thread
  (``prange``); each thread carries its images through every layer, so there is one parallel
  region per pass instead of one per layer, and no two threads ever write the same memory.
* **Per-thread gradients.** Each thread adds dL/dW for its images into its own zeroed copy of
  the flat gradient; their sum is added into ``flat_grad`` once per step.
* **BLAS from inside Numba.** The matrix products call NumPy's own OpenBLAS ``?gemm`` directly
  (single-threaded: the parallelism is the ``prange`` above), on sub-batches of ``SUB_BATCH``
  images whose im2col matrices stay in the core's L2 cache.
* **Channels-last inside.** Convolution outputs are stored (N, OH, OW, C), the layout in which
  ``cols @ W^T`` leaves them, so im2col -> product -> bias + activation -> pooling needs no
  transposes. conv2 unfolds channels-last (:func:`im2col_channels_last`) against its weights
  reordered to (i, j, c) once per pass.
* **conv1 without im2col.** With one input channel, im2col would copy every pixel 25 times to
  feed products with only six rows; :func:`conv_single_channel_forward` sums each output where
  it stands, with bias, activation and pooling in the same pass, and
  :func:`conv_single_channel_backward` forms dL/dW and dL/dx from the image in place.
* **Fused pointwise work.** Bias + activation run on the product as it leaves BLAS; the pooling
  backward and the activation derivative are one pass. The optimisers update the flat parameter
  buffer in one parallel loop.

Every kernel is compiled with ``cache=True``; :func:`warmup` compiles (or loads) them all and
returns the seconds it took.
"""
from __future__ import annotations

import ctypes
import glob
import os
import time

import numpy as np
from numba import njit, prange, types
import llvmlite.binding as llvm

__all__ = [
    "RELU", "TANH", "SIGMOID", "IDENTITY", "AVG", "MAX", "ACTIVATION_CODES", "POOL_CODES",
    "PARAMETER_SHAPES", "SUB_BATCH", "BLAS_LIBRARY",
    "NUM_PARAMETERS", "kernel", "gemm", "im2col_channels_last",
    "col2im_channels_last", "permute_conv_weight", "add_unpermuted_conv_weight", "bias_activation",
    "activate_in_place", "activation_backward", "conv_single_channel_forward",
    "conv_single_channel_backward", "pool_forward", "pool_activation_backward", "lenet_forward",
    "lenet_backward", "adam_step", "sgd_step", "blas_threads", "set_blas_threads", "warmup",
]


def kernel(function=None, **options):
    """``numba.njit`` as every kernel here uses it: cached on disk, and with NumPy's error model
    (x / 0 gives inf or nan as in NumPy; Numba's default Python model tests every division for
    zero to raise ZeroDivisionError, and that test stops LLVM vectorising the loop)."""
    options = {"cache": True, "error_model": "numpy", **options}
    return njit(**options) if function is None else njit(**options)(function)


# Activation and pooling codes: Numba kernels branch on small ints, outside their inner loops.
RELU, TANH, SIGMOID, IDENTITY = 0, 1, 2, 3
AVG, MAX = 0, 1
ACTIVATION_CODES = {"relu": RELU, "tanh": TANH, "sigmoid": SIGMOID}
POOL_CODES = {"avg": AVG, "max": MAX}

# LeNet-5's parameters in torch's named order, as they sit in the model's flat buffer.
PARAMETER_SHAPES = (
    ("conv1.weight", (6, 1, 5, 5)), ("conv1.bias", (6,)),
    ("conv2.weight", (16, 6, 5, 5)), ("conv2.bias", (16,)),
    ("conv3.weight", (120, 16, 5, 5)), ("conv3.bias", (120,)),
    ("fc1.weight", (84, 120)), ("fc1.bias", (84,)),
    ("fc2.weight", (10, 84)), ("fc2.bias", (10,)),
)
_SIZES = tuple(int(np.prod(shape)) for _, shape in PARAMETER_SHAPES)
_OFFSETS = tuple(int(o) for o in np.concatenate([[0], np.cumsum(_SIZES)]))
NUM_PARAMETERS = _OFFSETS[-1]
KERNEL = 5          # every LeNet-5 convolution is 5x5, stride 1, no padding
POOL = 2            # every pooling window is 2x2, stride 2
# Images per im2col sub-batch: conv2's cols (SUB_BATCH * 100, 150) then take 240 KB in float32 and
# stay in a 512 KB L2 cache, with the sub-batch's activations beside them.
SUB_BATCH = 4


# --------------------------------------------------------------------------------------------
# BLAS: NumPy's own ?gemm, called from inside Numba
# --------------------------------------------------------------------------------------------

def _find_blas():
    """Open the OpenBLAS that NumPy's wheel bundles and return (library, symbol prefix), or None.

    NumPy's wheels ship OpenBLAS with 64-bit integers and prefixed names (``scipy_cblas_sgemm64_``);
    a build against a system OpenBLAS exports ``cblas_sgemm64_``. If neither is found (NumPy built
    on MKL or Accelerate), ``BLAS_LIBRARY`` is None and the numba backend is unavailable.
    """
    numpy_dir = os.path.dirname(np.__file__)
    candidates = []
    for folder in (os.path.join(numpy_dir, os.pardir, "numpy.libs"), os.path.join(numpy_dir, ".dylibs")):
        candidates += sorted(glob.glob(os.path.join(folder, "*openblas*")))
    for path in candidates:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_", "64_"), ("", "64_")):
            if hasattr(library, f"{prefix}cblas_sgemm{suffix}") and hasattr(library, f"{prefix}cblas_dgemm{suffix}"):
                return library, path, prefix, suffix
    return None


_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112
_GEMM_ARGS = lambda real: (types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
                           real, types.intp, types.int64, types.intp, types.int64, real, types.intp,
                           types.int64)


_blas = _find_blas()
if _blas is not None:
    _library, BLAS_LIBRARY, _prefix, _suffix = _blas
    for _letter in "sd":
        llvm.add_symbol(f"numpylenet_{_letter}gemm",
                        ctypes.cast(getattr(_library, f"{_prefix}cblas_{_letter}gemm{_suffix}"),
                                    ctypes.c_void_p).value)
else:
    BLAS_LIBRARY = None

_sgemm = types.ExternalFunction("numpylenet_sgemm", types.void(*_GEMM_ARGS(types.float32)))
_dgemm = types.ExternalFunction("numpylenet_dgemm", types.void(*_GEMM_ARGS(types.float64)))


def _threads_function(kind: str):
    if _blas is None:
        return None
    name = f"{_prefix}openblas_{kind}_num_threads{_suffix}"
    return getattr(_library, name, None)


_get_threads, _set_threads = _threads_function("get"), _threads_function("set")
if _set_threads is not None:
    _set_threads.argtypes, _get_threads.restype = [ctypes.c_int], ctypes.c_int


def blas_threads() -> int | None:
    """The number of threads NumPy's OpenBLAS uses, or None if it cannot be queried."""
    return None if _get_threads is None else int(_get_threads())


def set_blas_threads(count: int) -> None:
    """Set the number of threads of NumPy's OpenBLAS (a no-op when it cannot be found)."""
    if _set_threads is not None:
        _set_threads(int(count))


def _start_thread_pool() -> None:
    """Start Numba's OpenMP thread pool with idle threads spinning about 1 ms before they sleep.

    A thread that runs out of work either spins, ready to start the next parallel region at
    once, or sleeps and must be woken by the kernel. Measured on this 2-core VM: waking a
    sleeping thread costs ~110 us per region (OMP_WAIT_POLICY=PASSIVE), four times per training
    step, and a 2-epoch run trained at 11,400 img/s; spinning for 100,000 rounds (libgomp's
    estimate: 1 ms) it ran at 13,300 img/s, the next region usually arriving within that time.
    libgomp's default, 3 ms, and the active policy, 5 minutes, are worse on a shared machine:
    the spinning steals the core that another process or our last working thread needs.
    libgomp reads ``GOMP_SPINCOUNT`` when it loads, so it is set only around starting Numba's
    pool and reaches no other library (torch bundles its own libgomp). A user's own
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is left to take effect instead.
    """
    import numba.np.ufunc.parallel as numba_parallel

    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        numba_parallel._launch_threads()
        return
    os.environ["GOMP_SPINCOUNT"] = "100000"
    try:
        numba_parallel._launch_threads()
    finally:
        del os.environ["GOMP_SPINCOUNT"]


_start_thread_pool()


@kernel
def gemm(a, b, c, transpose_a=False, transpose_b=False, beta=0.0):
    """C = op(A) @ op(B) + beta C for C-contiguous 2-D arrays, op(X) = X^T if asked.

    Shapes: op(A) (M, K), op(B) (K, N), C (M, N). Calls single-threaded BLAS ``?gemm``.
    """
    m, n = c.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    if m == 0 or n == 0:
        return
    trans_a = _CBLAS_TRANS if transpose_a else _CBLAS_NO_TRANS
    trans_b = _CBLAS_TRANS if transpose_b else _CBLAS_NO_TRANS
    if c.itemsize == 4:
        _sgemm(_CBLAS_ROW_MAJOR, trans_a, trans_b, m, n, k, np.float32(1.0), a.ctypes.data,
               a.shape[1], b.ctypes.data, b.shape[1], np.float32(beta), c.ctypes.data, n)
    else:
        _dgemm(_CBLAS_ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a.ctypes.data,
               a.shape[1], b.ctypes.data, b.shape[1], beta, c.ctypes.data, n)


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
def im2col_channels_last(x, kernel_h, kernel_w, cols):
    """Unfold the kernel windows of an NHWC batch, one window per ROW, weights ordered (i, j, c).

    ``cols[(n, oh, ow), (i, j, c)] = x[n, oh + i, ow + j, c]``: in channels-last memory the
    kw C values of one window row are contiguous, so a row of ``cols`` is kh contiguous copies.
    The matching weight matrix is ``weight.transpose(0, 2, 3, 1).reshape(C_out, kh kw C)``
    (:func:`permute_conv_weight`), and ``cols @ W^T`` is the convolution, (N OH OW, C_out).

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


@kernel
def add_unpermuted_conv_weight(permuted, kernel_area, weight):
    """The inverse of :func:`permute_conv_weight`, added: weight[o, (c, k)] += permuted[o, (k, c)]."""
    out_c, size = weight.shape
    in_c = size // kernel_area
    for o in range(out_c):
        for c in range(in_c):
            for k in range(kernel_area):
                weight[o, c * kernel_area + k] += permuted[o, k * in_c + c]


# --------------------------------------------------------------------------------------------
# Pointwise: bias + activation, activation derivative
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
    """In place: z[r, c] = f(z[r, c] + bias[c]) for z (R, C), f given by its code."""
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
    """In place: grad *= f'(x) for 2-D grad and y = f(x) of the same shape."""
    rows, columns = grad.shape
    one = grad.dtype.type(1)
    for r in range(rows):
        for c in range(columns):
            grad[r, c] *= _derivative(y[r, c], activation, one)


# --------------------------------------------------------------------------------------------
# Pooling, channels-last, non-overlapping windows (torch: stride = kernel, floor mode)
# --------------------------------------------------------------------------------------------

@kernel(fastmath=True)
def pool_forward(y, pool, kernel_h, kernel_w, out):
    """out[n, oh, ow, c] = mean or max of y[n, oh kh + i, ow kw + j, c] over the window.

    y : (N, H, W, C);  out : (N, H // kh, W // kw, C), any strides. The channel loop is innermost,
    over contiguous memory, so it vectorises.
    """
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
def pool_activation_backward(grad_out, y, pool, activation, kernel_h, kernel_w, grad_z):
    """dL/dz before activation and pooling, from dL/d(pooled) ``grad_out``.

    Pooling backward: avg gives each pixel of a window grad / (kh kw); max gives the whole
    gradient to the first pixel (row-major in the window) that holds the maximum, as torch.
    Then the activation: grad_z = grad_y * f'(x), with f' computed from y = f(x).
    Pixels outside every window (floor mode) get 0.

    grad_out : (N, OH, OW, C) any strides;  y, grad_z : (N, H, W, C).
    """
    n_images, height, width, channels = y.shape
    out_h, out_w = grad_out.shape[1], grad_out.shape[2]
    scale = y.dtype.type(1.0 / (kernel_h * kernel_w))
    one = y.dtype.type(1)
    for n in range(n_images):
        grad_z[n, out_h * kernel_h:, :, :] = 0
        grad_z[n, :, out_w * kernel_w:, :] = 0
        for c in range(channels):       # outermost: conv1's channel-major layout reads rows
            for oh in range(out_h):
                for ow in range(out_w):
                    h0, w0 = oh * kernel_h, ow * kernel_w
                    grad = grad_out[n, oh, ow, c]
                    if pool == AVG:
                        for i in range(kernel_h):
                            for j in range(kernel_w):
                                grad_z[n, h0 + i, w0 + j, c] = grad * scale * _derivative(
                                    y[n, h0 + i, w0 + j, c], activation, one)
                    else:
                        best_i, best_j, best = 0, 0, y[n, h0, w0, c]
                        for i in range(kernel_h):
                            for j in range(kernel_w):
                                if y[n, h0 + i, w0 + j, c] > best:
                                    best_i, best_j, best = i, j, y[n, h0 + i, w0 + j, c]
                        for i in range(kernel_h):
                            for j in range(kernel_w):
                                winner = i == best_i and j == best_j
                                grad_z[n, h0 + i, w0 + j, c] = (
                                    grad * _derivative(best, activation, one) if winner else 0)


# --------------------------------------------------------------------------------------------
# conv1 directly: a one-channel input needs no im2col
# --------------------------------------------------------------------------------------------

# With one input channel, im2col would copy every pixel 25 times only to feed products with six
# rows. These two kernels instead work on the image in place, in flat positions p = oh W + ow of
# its rows (width W), where the 5x5 kernel's tap (i, j) sits at offset i W + j. Their loops run
# over all (OH - 1) W + OW positions at once: a single output row (OW = 28) is too short for the
# 32-wide unrolled vector loop LLVM emits, so a loop per row would run scalar. conv1's output is
# therefore kept in the same row layout, (N, C, OH, W); the positions with ow >= OW straddle two
# rows: computed, never used, and their gradient is 0.


@kernel(fastmath=True)
def conv_single_channel_forward(x, weight, bias, activation, pool, y, pooled):
    """conv1's forward pass, fused with its bias, activation and 2x2 pooling::

        y[n, c, p] = f(b[c] + sum_{i, j} weight[c, (i, j)] x[n, p + i W + j])   (p = oh W + ow)
        pooled[n, ph, pw, c] = mean or max of y[n, c, 2 ph + i, 2 pw + j] over i, j in {0, 1}

    x : (N, 1, H, W);  weight : (C, 25), torch's (i, j) order;  bias : (C,);
    y : (N, C, OH, W), C-contiguous, OH = H - 4, valid for ow < OW = W - 4 (see above; its last
    four entries, past the last window, are set to 0);  pooled : (N, OH // 2, OW // 2, C).
    """
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


@kernel(fastmath=True)
def conv_single_channel_backward(x, weight, y, grad_pooled, activation, pool, grad_weight,
                                 grad_bias, grad_z, grad_x, input_grad):
    """conv1's backward pass, from dL/d(pooled) back through pooling, activation and the
    convolution, in the row layout of :func:`conv_single_channel_forward`::

        dz = pooling backward of grad_pooled, times f'        (0 at the straddling positions)
        dW[c, (i, j)] += sum_p dz[c, p] x[p + i W + j]        db[c] += sum_p dz[c, p]
        dx[p + i W + j] = sum_{c, p} W[c, (i, j)] dz[c, p]     (only if input_grad)

    x : (N, 1, H, W);  weight, grad_weight : (C, 25);  grad_bias : (C,);  y : (N, C, OH, W) as
    the forward pass stored it;  grad_pooled : (N, OH // 2, OW // 2, C);  grad_z : (C, OH, W)
    scratch;  grad_x : (N, 1, H, W), overwritten if input_grad.
    """
    n_images, channels, out_h, width = _unsigned_shape(y)
    span = (out_h - _ONE) * width + width - np.uint64(KERNEL - 1)
    zero = y.dtype.type(0)
    for n in range(n_images):
        pool_activation_backward(grad_pooled[n:n + 1], y[n:n + 1].transpose(0, 2, 3, 1), pool,
                                 activation, POOL, POOL, grad_z[np.newaxis].transpose(0, 2, 3, 1))
        image = x[n, 0].ravel()
        for c in range(channels):
            dz = grad_z[c].ravel()
            total = zero
            for p in range(span):
                total += dz[p]
            grad_bias[c] += total
            for i in range(KERNEL):
                for j in range(KERNEL):
                    tap = np.uint64(i) * width + np.uint64(j)
                    total = zero
                    for p in range(span):
                        total += dz[p] * image[p + tap]
                    grad_weight[c, i * KERNEL + j] += total
        if input_grad:
            grad_image = grad_x[n, 0].ravel()
            grad_image[:] = 0
            for c in range(channels):
                dz = grad_z[c].ravel()
                for i in range(KERNEL):
                    for j in range(KERNEL):
                        tap = np.uint64(i) * width + np.uint64(j)
                        w = weight[c, i * KERNEL + j]
                        for p in range(span):
                            grad_image[p + tap] += w * dz[p]


@kernel(fastmath=True)
def _add_column_sums(matrix, out):
    """out[c] += sum_r matrix[r, c]: the bias gradient of a (R, C) output gradient."""
    rows, columns = matrix.shape
    for r in range(rows):
        for c in range(columns):
            out[c] += matrix[r, c]


# --------------------------------------------------------------------------------------------
# The whole network
# --------------------------------------------------------------------------------------------

@kernel
def _unpack(flat):
    """Views of the ten LeNet-5 parameters inside a flat buffer; conv weights as (C_out, C_in kh kw)."""
    o = _OFFSETS
    return (flat[o[0]:o[1]].reshape(6, 25), flat[o[1]:o[2]],
            flat[o[2]:o[3]].reshape(16, 150), flat[o[3]:o[4]],
            flat[o[4]:o[5]].reshape(120, 400), flat[o[5]:o[6]],
            flat[o[6]:o[7]].reshape(84, 120), flat[o[7]:o[8]],
            flat[o[8]:o[9]].reshape(10, 84), flat[o[9]:o[10]])


@kernel
def _dense_forward(x, weight, bias, activation, y):
    """y = f(x @ W^T + b): x (n, in), weight (out, in), y (n, out)."""
    gemm(x, weight, y, False, True)
    bias_activation(y, bias, activation)


@kernel
def _dense_backward(grad_y, x, weight, grad_weight, grad_bias, grad_x):
    """dW += dY^T @ x, db += sum_n dY, dx = dY @ W:  grad_y (n, out), x (n, in), grad_x (n, in)."""
    gemm(grad_y, x, grad_weight, True, False, 1.0)
    _add_column_sums(grad_y, grad_bias)
    gemm(grad_y, weight, grad_x, False, False)


@kernel
def _forward_images(x, params, w2, activation, pool, y1, p1, y2, p2, y3, y4, logits, cols2):
    """:func:`lenet_forward` for one thread's slice of the batch (all arrays sliced to it)."""
    w1, b1, _, b2, w3, b3, w4, b4, w5, b5 = _unpack(params)
    n = x.shape[0]
    for start in range(0, n, SUB_BATCH):
        stop = min(start + SUB_BATCH, n)
        rows2 = (stop - start) * 100
        conv_single_channel_forward(x[start:stop], w1, b1, activation, pool, y1[start:stop],
                                    p1[start:stop])
        # conv2: channels-last cols (rows2, 150) against the (i, j, c)-ordered weights.
        window2 = cols2[:rows2 * 150].reshape(rows2, 150)
        im2col_channels_last(p1[start:stop], KERNEL, KERNEL, window2)
        z2 = y2[start:stop].reshape(rows2, 16)
        gemm(window2, w2, z2, False, True)
        bias_activation(z2, b2, activation)
        pool_forward(y2[start:stop], pool, POOL, POOL, p2[start:stop].transpose(0, 2, 3, 1))
    _dense_forward(p2.reshape(n, 400), w3, b3, activation, y3)      # conv3 on a 5x5 input
    _dense_forward(y3, w4, b4, activation, y4)
    _dense_forward(y4, w5, b5, IDENTITY, logits)


@kernel(parallel=True)
def lenet_forward(x, params, activation, pool, w2, y1, p1, y2, p2, y3, y4, logits, cols2):
    """LeNet-5's forward pass for a batch, storing what the backward pass needs.

    x (N, 1, 32, 32);  params: the flat parameter buffer (61,706,).
    Outputs:  y1 (N, 6, 28, 32) conv1 after activation, in the input's rows (see
    conv_single_channel_forward);  channels-last: p1 (N, 14, 14, 6) pooled, y2 (N, 10, 10, 16);
    p2 (N, 16, 5, 5) pooled, in torch's (c, h, w) order, conv3's input;  y3 (N, 120);  y4 (N, 84);
    logits (N, 10).  w2 (16, 150): conv2's weight, (i, j, c) order.
    Scratch:  cols2 (T, SUB_BATCH * 100 * 150), conv2's im2col, one per thread.
    """
    n_images, threads = x.shape[0], cols2.shape[0]
    permute_conv_weight(_unpack(params)[2], KERNEL * KERNEL, w2)
    for t in prange(threads):
        lo, hi = t * n_images // threads, (t + 1) * n_images // threads
        _forward_images(x[lo:hi], params, w2, activation, pool, y1[lo:hi], p1[lo:hi], y2[lo:hi],
                        p2[lo:hi], y3[lo:hi], y4[lo:hi], logits[lo:hi], cols2[t])


@kernel
def _backward_images(x, params, w2, activation, pool, grad_logits, y1, p1, y2, p2, y3, y4,
                     grad_y4, grad_y3, grad_p2, grad_z1, grad_p1, grad_z2, cols2,
                     grad_w2, grads, grad_x, input_grad):
    """:func:`lenet_backward` for one thread's slice of the batch, ADDED into ``grads`` (flat).

    conv2's weight gradient is accumulated in the (i, j, c) order of ``w2`` in ``grad_w2``
    (16, 150), and added into ``grads`` in torch's order at the end.
    """
    w1, _, _, _, w3, _, w4, _, w5, _ = _unpack(params)
    gw1, gb1, gw2, gb2, gw3, gb3, gw4, gb4, gw5, gb5 = _unpack(grads)
    grad_w2[:] = 0
    n = x.shape[0]
    _dense_backward(grad_logits, y4, w5, gw5, gb5, grad_y4)
    activation_backward(grad_y4, y4, activation)
    _dense_backward(grad_y4, y3, w4, gw4, gb4, grad_y3)
    activation_backward(grad_y3, y3, activation)
    _dense_backward(grad_y3, p2.reshape(n, 400), w3, gw3, gb3, grad_p2.reshape(n, 400))
    for start in range(0, n, SUB_BATCH):
        stop = min(start + SUB_BATCH, n)
        count = stop - start
        rows2 = count * 100
        # conv2
        pool_activation_backward(grad_p2[start:stop].transpose(0, 2, 3, 1), y2[start:stop], pool,
                                 activation, POOL, POOL, grad_z2[:count])
        g2 = grad_z2[:count].reshape(rows2, 16)
        _add_column_sums(g2, gb2)
        window2 = cols2[:rows2 * 150].reshape(rows2, 150)
        im2col_channels_last(p1[start:stop], KERNEL, KERNEL, window2)
        gemm(g2, window2, grad_w2, True, False, 1.0)           # dW += dZ^T @ cols
        gemm(g2, w2, window2, False, False)                    # dcols = dZ @ W
        grad_p1[:count] = 0
        col2im_channels_last(window2, KERNEL, KERNEL, grad_p1[:count])
        # conv1
        conv_single_channel_backward(x[start:stop], w1, y1[start:stop], grad_p1[:count], activation,
                                     pool, gw1, gb1, grad_z1, grad_x[start:stop], input_grad)
    add_unpermuted_conv_weight(grad_w2, KERNEL * KERNEL, gw2)


@kernel(parallel=True)
def lenet_backward(x, params, activation, pool, grad_logits, w2, y1, p1, y2, p2, y3, y4,
                   grad_y4, grad_y3, grad_p2, grad_z1, grad_p1, grad_z2, cols2, grad_w2,
                   thread_grads, flat_grad, grad_x, input_grad):
    """LeNet-5's backward pass from dL/dlogits (N, 10), using what :func:`lenet_forward` stored.

    Adds dL/dW to ``flat_grad`` (61,706,) and, if ``input_grad``, writes dL/dx into
    grad_x (N, 1, 32, 32). Batch-sized scratch: grad_y4 (N, 84), grad_y3 (N, 120),
    grad_p2 (N, 16, 5, 5). Per-thread scratch: grad_z1 (T, 6, 28, 32),
    grad_p1 (T, SUB_BATCH, 14, 14, 6), grad_z2 (T, SUB_BATCH, 10, 10, 16), cols2 as in
    forward, grad_w2 (T, 16, 150), thread_grads (T, 61,706): each thread's gradient, whose sum is
    added into flat_grad at the end.
    """
    n_images, threads = x.shape[0], cols2.shape[0]
    permute_conv_weight(_unpack(params)[2], KERNEL * KERNEL, w2)
    for t in prange(threads):
        lo, hi = t * n_images // threads, (t + 1) * n_images // threads
        thread_grads[t, :] = 0
        _backward_images(x[lo:hi], params, w2, activation, pool, grad_logits[lo:hi], y1[lo:hi],
                         p1[lo:hi], y2[lo:hi], p2[lo:hi], y3[lo:hi], y4[lo:hi], grad_y4[lo:hi],
                         grad_y3[lo:hi], grad_p2[lo:hi], grad_z1[t], grad_p1[t], grad_z2[t],
                         cols2[t], grad_w2[t], thread_grads[t], grad_x[lo:hi], input_grad)
    # flat_grad += (the threads' sum): one addition into flat_grad per step, as the reference.
    block = 4096
    for b in prange((flat_grad.size + block - 1) // block):
        lo, hi = b * block, min((b + 1) * block, flat_grad.size)
        for t in range(1, threads):
            for i in range(lo, hi):
                thread_grads[0, i] += thread_grads[t, i]
        for i in range(lo, hi):
            flat_grad[i] += thread_grads[0, i]


# --------------------------------------------------------------------------------------------
# Optimisers over the flat buffer (no fastmath: each line rounds exactly as the NumPy optimiser)
# --------------------------------------------------------------------------------------------

@kernel(parallel=True)
def adam_step(params, grads, exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt, beta1, beta2,
              eps, weight_decay):
    """One Adam step over flat arrays, rounding exactly as :class:`numpylenet.Adam`.

    With g = grad + weight_decay p, and the step's scalars computed by the caller as the
    reference does (step_size = lr / (1 - beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t))::

        m = m + (1 - beta1) (g - m);   v = beta2 v + (1 - beta2) g^2
        p = p - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)

    m and v update in the parameter dtype; the denominator and the step are formed in float64,
    as NumPy's type promotion does them in the reference.
    """
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
def sgd_step(params, grads, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov,
             first_step):
    """One SGD step over flat arrays, rounding exactly as :class:`numpylenet.SGD`.

    g = grad + weight_decay p;  with momentum: b = g on the first step, else
    b = momentum b + (1 - dampening) g, and g = g + momentum b (nesterov) or b;  p = p - lr g.
    """
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


def warmup() -> float:
    """Compile (or load from the on-disk cache) every kernel for float32 and float64.

    Returns the seconds it took: a few tens of seconds the first time, well under a second after.
    """
    start = time.perf_counter()
    from .backend import NumbaLeNet5
    for dtype in (np.float32, np.float64):
        NumbaLeNet5.compile(np.dtype(dtype))
    return time.perf_counter() - start
