"""The numba backend against the NumPy reference: every kernel, the whole network, the optimisers.

The NumPy layers are the truth here (they are themselves checked against torch and finite
differences in the core tests). Tolerances, relative to the largest reference entry as in
:mod:`helpers`: float64 1e-10 (both sides round differently only through summation order, which
lands near 1e-15); float32 2e-5 (sums of up to a few thousand products in another order, see
:data:`helpers.TOLERANCE`). Data-movement kernels (im2col, pooling) must agree exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import TOLERANCE, assert_close
from numpylenet import SGD, Adam, LeNet5, layers, softmax_cross_entropy
from numpylenet.backend import (BACKENDS, ENVIRONMENT_VARIABLE, numba_unavailable_reason,
                                resolve_backend, set_threads)

if numba_unavailable_reason() is not None:
    pytest.skip(f"numba backend unavailable: {numba_unavailable_reason()}", allow_module_level=True)

from numpylenet import kernels  # noqa: E402  (only once we know numba imports)

DTYPES = (np.float32, np.float64)
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): TOLERANCE[np.dtype(np.float32)]}
ACTIVATIONS = {"relu": layers.ReLU, "tanh": layers.Tanh, "sigmoid": layers.Sigmoid}
POOLS = {"avg": layers.AvgPool2d, "max": layers.MaxPool2d}
COMBINATIONS = [(a, p) for a in ACTIVATIONS for p in POOLS]


def random(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# im2col / col2im channels-last, against layers.im2col / layers.col2im
# --------------------------------------------------------------------------------------------

def channels_last_cols(cols, channels, kh, kw):
    """The reference cols (C kh kw, N OH OW), rearranged to im2col_channels_last's (N OH OW, kh kw C)."""
    return np.ascontiguousarray(cols.reshape(channels, kh, kw, -1).transpose(3, 1, 2, 0).reshape(-1, kh * kw * channels))


def check_im2col(shape, kernel, dtype=np.float64):
    """im2col_channels_last / col2im_channels_last vs layers.im2col / layers.col2im (NCHW)."""
    n, c, h, w = shape
    kh, kw = kernel
    x = random(shape, dtype)
    reference = layers.im2col(x, kernel)
    cols_last = np.full((reference.shape[1], reference.shape[0]), np.nan, dtype)
    kernels.im2col_channels_last(nhwc(x), kh, kw, cols_last)
    assert np.array_equal(cols_last, channels_last_cols(reference, c, kh, kw))
    # col2im: against the reference, and as the adjoint: <im2col(x), G> == <x, col2im(G)>.
    grad_cols = random(reference.shape, dtype, seed=1)
    expected = layers.col2im(grad_cols, shape, kernel)
    grad_x_last = np.zeros((n, h, w, c), dtype)
    kernels.col2im_channels_last(channels_last_cols(grad_cols, c, kh, kw), kh, kw, grad_x_last)
    assert_close(f"col2im {shape} {kernel}", {"col2im_channels_last": (nchw(grad_x_last), expected)},
                 TOL[np.dtype(dtype)])
    assert np.isclose(np.sum(reference * grad_cols), np.sum(nchw(grad_x_last) * x),
                      rtol=1e-4 if dtype == np.float32 else 1e-12)


def test_im2col_lenet_conv2(): check_im2col((2, 6, 14, 14), (5, 5), np.float32)
def test_im2col_odd_shape(): check_im2col((3, 2, 7, 9), (3, 2))
def test_im2col_batch1(): check_im2col((1, 3, 5, 6), (2, 4), np.float32)
def test_im2col_kernel_is_input(): check_im2col((2, 4, 5, 5), (5, 5))


# --------------------------------------------------------------------------------------------
# Pointwise and pooling kernels, against the layers
# --------------------------------------------------------------------------------------------

def check_bias_activation(activation, dtype, shape=(37, 6)):
    z, bias = random(shape, dtype) * 3, random(shape[1:], dtype, seed=1)
    reference_layer = ACTIVATIONS[activation]()
    expected = reference_layer.forward(z + bias)
    ours = z.copy()
    kernels.bias_activation(ours, bias, kernels.ACTIVATION_CODES[activation])
    grad = random(shape, dtype, seed=2)
    expected_grad = reference_layer.backward(grad)
    ours_grad = grad.copy()
    kernels.activation_backward(ours_grad, ours, kernels.ACTIVATION_CODES[activation])
    assert_close(f"{activation} {np.dtype(dtype)}", {"forward": (ours, expected),
                                                  "backward": (ours_grad, expected_grad)}, TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_bias_activation(activation, dtype): check_bias_activation(activation, dtype)
def test_bias_identity(): z, b = random((5, 3)), random(3, seed=1); ours = z.copy(); kernels.bias_activation(ours, b, kernels.IDENTITY); assert np.array_equal(ours, z + b)
def test_sigmoid_extreme_inputs(): check_bias_activation("sigmoid", np.float64, shape=(3, 4)); z = np.array([[-1e4, 1e4]]); kernels.bias_activation(z, np.zeros(2), kernels.SIGMOID); assert np.array_equal(z, [[0.0, 1.0]])


def check_pool(activation, pool, shape, kernel, dtype=np.float64, transposed_out=False):
    """pool_forward and pool_activation_backward vs Pool2d then the activation's backward."""
    n, c, h, w = shape
    kh, kw = kernel
    act_layer, pool_layer = ACTIVATIONS[activation](), POOLS[pool](kernel)
    x = random(shape, dtype)
    x[0, 0, :kh, :kw] = -1              # relu: a window of ties at 0 (the first one wins, as in torch)
    y = act_layer.forward(x)
    pooled_ref = pool_layer.forward(y)
    oh, ow = pooled_ref.shape[2:]
    if transposed_out:                  # (N, C, OH, OW) storage seen as (N, OH, OW, C), as LeNet's p2
        storage = np.full((n, c, oh, ow), np.nan, dtype)
        out = storage.transpose(0, 2, 3, 1)
    else:
        out = storage = np.full((n, oh, ow, c), np.nan, dtype)
    kernels.pool_forward(nhwc(y), kernels.POOL_CODES[pool], kh, kw, out)
    if pool == "max":                   # picking is exact; averaging rounds (sum * (1/k) vs mean)
        assert np.array_equal(nchw(out), pooled_ref)
    grad_pooled = random(pooled_ref.shape, dtype, seed=3)
    expected = act_layer.backward(pool_layer.backward(grad_pooled))
    grad_z = np.full((n, h, w, c), np.nan, dtype)
    kernels.pool_activation_backward(nhwc(grad_pooled), nhwc(y), kernels.POOL_CODES[pool],
                                     kernels.ACTIVATION_CODES[activation], kh, kw, grad_z)
    assert_close(f"pool {activation}/{pool} {shape}", {"pooled": (nchw(out), pooled_ref),
                                                     "grad_z": (nchw(grad_z), expected)}, TOL[np.dtype(dtype)])


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_pool_lenet_shapes(activation, pool): check_pool(activation, pool, (2, 6, 28, 28), (2, 2), np.float32)
@pytest.mark.parametrize("pool", list(POOLS))
def test_pool_odd_sizes_floor_mode(pool): check_pool("tanh", pool, (3, 4, 7, 9), (2, 2))
@pytest.mark.parametrize("pool", list(POOLS))
def test_pool_nonsquare_window(pool): check_pool("sigmoid", pool, (1, 3, 8, 7), (3, 2))
def test_pool_transposed_output(): check_pool("relu", "avg", (2, 16, 10, 10), (2, 2), transposed_out=True)


def check_conv_single_channel(activation, pool, shape, dtype=np.float64):
    """conv_single_channel_forward / _backward vs Conv2d(1, C, 5), the activation, 2x2 pooling."""
    n, h, w, channels = shape
    out_h, out_w = h - 4, w - 4
    conv = layers.Conv2d(1, channels, 5, dtype=dtype, rng=np.random.default_rng(1))
    act_layer, pool_layer = ACTIVATIONS[activation](), POOLS[pool](2)
    x = random((n, 1, h, w), dtype)
    y_ref = act_layer.forward(conv.forward(x))
    pooled_ref = pool_layer.forward(y_ref)
    codes = kernels.ACTIVATION_CODES[activation], kernels.POOL_CODES[pool]
    weight = conv.weight.data.reshape(channels, 25)
    y = np.full((n, channels, out_h, w), np.nan, dtype)        # the input's row width, w
    pooled = np.full(nhwc(pooled_ref).shape, np.nan, dtype)
    kernels.conv_single_channel_forward(x, weight, conv.bias.data, *codes, y, pooled)

    grad_pooled = random(pooled_ref.shape, dtype, seed=2)
    grad_x_ref = conv.backward(act_layer.backward(pool_layer.backward(grad_pooled)))
    grad_weight, grad_bias = np.ones((channels, 25), dtype), np.ones(channels, dtype)   # added to
    grad_z = np.full((channels, out_h, w), np.nan, dtype)
    grad_x = np.full(x.shape, np.nan, dtype)
    kernels.conv_single_channel_backward(x, weight, y, nhwc(grad_pooled), *codes, grad_weight,
                                         grad_bias, grad_z, grad_x, True)
    assert_close(f"conv1 direct {activation}/{pool} {shape}", {
        "y": (y[..., :out_w], y_ref), "pooled": (nchw(pooled), pooled_ref),
        "grad_x": (grad_x, grad_x_ref), "grad_weight": (grad_weight - 1, conv.weight.grad.reshape(channels, 25)),
        "grad_bias": (grad_bias - 1, conv.bias.grad)}, TOL[np.dtype(dtype)])
    assert np.all(y.reshape(n, channels, -1)[:, :, -4:] == 0)            # past the last window


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_conv_single_channel_lenet_shape(activation, pool): check_conv_single_channel(activation, pool, (3, 32, 32, 6), np.float32)
@pytest.mark.parametrize("pool", list(POOLS))
def test_conv_single_channel_odd_sizes_floor_mode(pool): check_conv_single_channel("tanh", pool, (2, 12, 9, 3))
def test_conv_single_channel_batch1_float64(): check_conv_single_channel("relu", "max", (1, 32, 32, 6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_a, transpose_b, beta", [(False, False, 0.0), (True, False, 1.0),
                                                            (False, True, 0.0), (True, True, 1.0)])
def test_gemm(transpose_a, transpose_b, beta, dtype):
    a, b, c = random((7, 5), dtype), random((5, 3), dtype, seed=1), random((7, 3), dtype, seed=2)
    a_stored = np.ascontiguousarray(a.T) if transpose_a else a
    b_stored = np.ascontiguousarray(b.T) if transpose_b else b
    ours = c.copy()
    kernels.gemm(a_stored, b_stored, ours, transpose_a, transpose_b, beta)
    assert_close("gemm", {"C": (ours, a @ b + beta * c)}, TOL[np.dtype(dtype)])


def test_permute_conv_weight():
    weight = random((16, 6, 5, 5))
    permuted = np.empty((16, 150))
    kernels.permute_conv_weight(weight.reshape(16, 150), 25, permuted)
    assert np.array_equal(permuted, weight.transpose(0, 2, 3, 1).reshape(16, 150))


def test_add_unpermuted_conv_weight_inverts_permute():
    weight, permuted = random((16, 150)), np.empty((16, 150))
    kernels.permute_conv_weight(weight, 25, permuted)
    restored = np.ones((16, 150))
    kernels.add_unpermuted_conv_weight(permuted, 25, restored)
    assert np.array_equal(restored, weight + 1)


# --------------------------------------------------------------------------------------------
# The whole network and the optimisers, numba backend vs numpy backend
# --------------------------------------------------------------------------------------------

def twin_models(activation="relu", pool="avg", dtype=np.float64, seed=5):
    return (LeNet5(activation=activation, pool=pool, dtype=dtype, seed=seed, backend="numpy"),
            LeNet5(activation=activation, pool=pool, dtype=dtype, seed=seed, backend="numba"))


def check_lenet5(activation, pool, dtype, batch_size, scale=1.0):
    """Logits, grad_input and all ten gradients, after two accumulating backward passes."""
    reference, model = twin_models(activation, pool, dtype)
    x = random((batch_size, 1, 32, 32), dtype, seed=batch_size) * scale
    labels = np.arange(batch_size) % 10
    pairs = {}
    for step in range(2):           # the second pass checks that gradients accumulate
        logits_ref, logits = reference.forward(x), model.forward(x)
        grad_ref = softmax_cross_entropy(logits_ref, labels)[1]
        pairs[f"logits{step}"] = (logits, logits_ref)
        pairs[f"grad_input{step}"] = (model.backward(grad_ref), reference.backward(grad_ref))
    pairs.update({"grad_" + name: (param.grad, ref.grad) for (name, param), ref
                  in zip(model.named_parameters(), reference.parameters())})
    assert_close(f"LeNet5 numba {activation}/{pool} {np.dtype(dtype)} N={batch_size}", pairs, TOL[np.dtype(dtype)])


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_lenet5_float64(activation, pool): check_lenet5(activation, pool, np.float64, 5)
@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_lenet5_float32(activation, pool): check_lenet5(activation, pool, np.float32, 6)
def test_lenet5_batch1(): check_lenet5("relu", "max", np.float64, 1)
def test_lenet5_batch_not_multiple_of_sub_batch(): check_lenet5("tanh", "avg", np.float64, 2 * kernels.SUB_BATCH + 3)
def test_lenet5_large_inputs(): check_lenet5("sigmoid", "avg", np.float32, 4, scale=50.0)


def test_lenet5_batch_size_changes_and_input_dtype_is_cast():
    reference, model = twin_models(dtype=np.float32)
    for batch_size in (3, 1, 7):
        x = random((batch_size, 1, 32, 32), np.float64, seed=batch_size)
        assert_close(f"N={batch_size}", {"logits": (model.forward(x), reference.forward(x))}, TOL[np.dtype(np.float32)])


def test_backward_without_input_gradient_and_before_forward():
    reference, model = twin_models()
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(np.zeros((2, 10)))
    x = random((3, 1, 32, 32))
    grad = softmax_cross_entropy(reference.forward(x), np.array([1, 2, 3]))[1]
    model.forward(x)
    assert model.backward(grad, input_grad=False) is None
    reference.backward(grad)
    assert_close("input_grad=False", {"grad": (model.flat_grad, reference.flat_grad)}, TOL[np.dtype(np.float64)])
    with pytest.raises(ValueError, match=r"grad_logits of shape \(3, 10\)"):
        model.backward(np.zeros((2, 10)))


def test_results_do_not_depend_on_thread_count():
    import numba

    _, model = twin_models()
    x = random((9, 1, 32, 32))
    results = []
    previous = numba.get_num_threads()
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(threads)
        model.zero_grad()
        logits = model.forward(x)
        model.backward(softmax_cross_entropy(logits, np.arange(9))[1])
        results.append((logits, model.flat_grad.copy()))
    numba.set_num_threads(previous)
    assert_close("1 vs all threads", {"logits": (results[-1][0], results[0][0]),
                                      "grad": (results[-1][1], results[0][1])}, TOL[np.dtype(np.float64)])


def train_twins(make_optimizer, dtype, steps=4):
    """Train a numpy and a numba model side by side; return both flat parameter buffers."""
    models = twin_models(dtype=dtype)
    optimizers = [make_optimizer(m.parameters()) for m in models]
    assert optimizers[0].fused_buffers is None and optimizers[1].fused_buffers is not None
    x, labels = random((4, 1, 32, 32), dtype), np.array([3, 1, 4, 1])
    for _ in range(steps):
        grad = None
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            logits = model.forward(x)
            grad = softmax_cross_entropy(logits, labels)[1] if grad is None else grad
            model.backward(grad)            # the same gradient into both, so steps compare exactly
            model.flat_grad[:] = models[0].flat_grad
            optimizer.step()
    return models, optimizers


OPTIMIZERS = {
    "adam": lambda p: Adam(p, lr=1e-2),
    "adam_weight_decay": lambda p: Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    "sgd": lambda p: SGD(p, lr=0.1),
    "sgd_momentum_dampening": lambda p: SGD(p, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "sgd_nesterov": lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_optimizer_is_bit_identical(name, dtype):
    (reference, model), (reference_opt, opt) = train_twins(OPTIMIZERS[name], dtype)
    assert np.array_equal(model.flat_data, reference.flat_data)
    for key, value in reference_opt.state_dict().items():
        assert np.array_equal(opt.state_dict()[key], value), key


def test_fused_optimizer_state_round_trip():
    """load_state_dict into a fused optimiser, then keep training: same as never stopping."""
    (reference, model), (reference_opt, opt) = train_twins(OPTIMIZERS["adam"], np.float64, steps=2)
    fresh = Adam(model.parameters(), lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    for optimizer in (fresh, reference_opt):
        optimizer.params[0].grad.fill(0.5)      # any gradient, the same for both
    model.flat_grad[:] = reference.flat_grad
    fresh.step(), reference_opt.step()
    assert np.array_equal(model.flat_data, reference.flat_data)


def test_optimizer_on_other_parameters_is_not_fused():
    model = LeNet5(backend="numba", seed=0)
    assert Adam(model.parameters()[1:]).fused_buffers is None        # not the whole buffer
    assert Adam(LeNet5(backend="numpy").parameters()).fused_buffers is None


# --------------------------------------------------------------------------------------------
# Choosing the backend, threads, warm-up
# --------------------------------------------------------------------------------------------

def test_engine_rejects_other_networks():
    from numpylenet.backend import NumbaLeNet5

    model = LeNet5(backend="numpy")
    model.fc2 = layers.Linear(84, 11)
    with pytest.raises(ValueError, match="written for LeNet-5's parameters"):
        NumbaLeNet5(model)


def test_backend_names():
    assert BACKENDS == ("numpy", "numba")
    assert LeNet5(backend="numpy").engine is None and LeNet5(backend="numba").engine is not None


def test_backend_default_and_environment(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    assert resolve_backend() == "numba" and LeNet5().backend == "numba"
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "numpy")
    assert resolve_backend() == "numpy" and LeNet5().backend == "numpy"
    assert LeNet5(backend="numba").backend == "numba"          # an explicit choice wins


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of numpy, numba"):
        LeNet5(backend="cuda")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "torch")
    with pytest.raises(ValueError, match=f"\\${ENVIRONMENT_VARIABLE} must be one of"):
        LeNet5()


def test_set_threads():
    import numba

    previous_numba, previous_blas = numba.get_num_threads(), kernels.blas_threads()
    try:
        set_threads(1)
        assert numba.get_num_threads() == 1 and kernels.blas_threads() == 1
        set_threads(64)
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
        with pytest.raises(ValueError, match="threads must be >= 1"):
            set_threads(0)
    finally:
        numba.set_num_threads(previous_numba)
        kernels.set_blas_threads(previous_blas)


def test_kernels_leave_blas_threads_alone():
    previous = kernels.blas_threads()
    kernels.set_blas_threads(2)
    try:
        model = LeNet5(backend="numba")
        model.backward(softmax_cross_entropy(model.forward(random((2, 1, 32, 32), np.float32)), np.array([0, 1]))[1])
        assert kernels.blas_threads() == 2
    finally:
        kernels.set_blas_threads(previous)


def test_starting_the_thread_pool_leaves_the_environment_alone():
    import os

    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    before = {name: os.environ.get(name) for name in names}
    kernels._start_thread_pool()
    assert {name: os.environ.get(name) for name in names} == before


def test_warmup_returns_seconds():
    seconds = kernels.warmup()
    assert isinstance(seconds, float) and seconds >= 0
