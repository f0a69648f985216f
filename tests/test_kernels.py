"""The numba backend against the NumPy reference: every kernel, the whole network, the optimisers.

The NumPy layers are the truth here (they are themselves checked against torch and finite
differences in the core tests). Tolerances, relative to the largest reference entry as in
:mod:`helpers`: float64 1e-10 (both sides round differently only through summation order, which
lands near 1e-15); float32 2e-5 (sums of up to a few thousand products in another order, see
:data:`helpers.TOLERANCE`). Data-movement kernels (im2col, pooling) must agree exactly.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import TOLERANCE, assert_close
from numpylenet import SGD, Adam, LeNet5, layers, softmax_cross_entropy
from numpylenet.backend import (ENVIRONMENT_VARIABLE, available_cores, numba_unavailable_reason,
                                resolve_backend, set_threads)
from numpylenet.model import ACTIVATIONS, POOLS
from numpylenet.names import ACTIVATION_NAMES, BACKEND_NAMES, POOL_NAMES

if numba_unavailable_reason() is not None:
    pytest.skip(f"numba backend unavailable: {numba_unavailable_reason()}", allow_module_level=True)

from numpylenet import blas, engine, kernels  # noqa: E402  (only once we know numba imports)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (np.float32, np.float64)
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): TOLERANCE[np.dtype(np.float32)]}
COMBINATIONS = [(a, p) for a in ACTIVATION_NAMES for p in POOL_NAMES]
ODD_BATCH = 2 * kernels.SUB_BATCH + 3       # two whole sub-batches and a part of one


def random(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def codes(activation, pool="avg"):
    return kernels.Codes(kernels.ACTIVATION_CODES[activation], kernels.POOL_CODES[pool])


def tolerance(dtype):
    return TOL[np.dtype(dtype)]


# --------------------------------------------------------------------------------------------
# im2col / col2im channels-last, against layers.im2col / layers.col2im
# --------------------------------------------------------------------------------------------

def channels_last_cols(cols, channels, kh, kw):
    """The reference cols (C kh kw, N OH OW) as im2col_channels_last's (N OH OW, kh kw C)."""
    by_window = cols.reshape(channels, kh, kw, -1).transpose(3, 1, 2, 0)
    return np.ascontiguousarray(by_window.reshape(-1, kh * kw * channels))


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
                 tolerance(dtype))
    assert np.isclose(np.sum(reference * grad_cols), np.sum(nchw(grad_x_last) * x),
                      rtol=1e-4 if dtype == np.float32 else 1e-12)


def test_im2col_lenet_conv2(): check_im2col((2, 6, 14, 14), (5, 5), np.float32)
def test_im2col_odd_shape(): check_im2col((3, 2, 7, 9), (3, 2))
def test_im2col_batch1(): check_im2col((1, 3, 5, 6), (2, 4), np.float32)
def test_im2col_kernel_is_input(): check_im2col((2, 4, 5, 5), (5, 5))


# --------------------------------------------------------------------------------------------
# Pointwise and pooling kernels, against the layers
# --------------------------------------------------------------------------------------------

def check_bias_activation(activation, dtype, shape=(37, 6), scale=3.0):
    """bias_activation and activation_backward vs the activation layer's forward and backward."""
    z, bias = random(shape, dtype) * scale, random(shape[1:], dtype, seed=1)
    reference_layer = ACTIVATIONS[activation]()
    expected = reference_layer.forward(z + bias)
    ours = z.copy()
    kernels.bias_activation(ours, bias, kernels.ACTIVATION_CODES[activation])
    grad = random(shape, dtype, seed=2)
    expected_grad = reference_layer.backward(grad)
    ours_grad = grad.copy()
    kernels.activation_backward(ours_grad, ours, kernels.ACTIVATION_CODES[activation])
    assert_close(f"{activation} {np.dtype(dtype)}", {"forward": (ours, expected),
                                                  "backward": (ours_grad, expected_grad)}, tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_bias_activation(activation, dtype): check_bias_activation(activation, dtype)
def test_sigmoid_large_inputs(): check_bias_activation("sigmoid", np.float64, shape=(3, 4), scale=1e3)
def test_sigmoid_small_shape(): check_bias_activation("sigmoid", np.float64, shape=(3, 4))


def test_bias_identity_adds_the_bias_exactly():
    z, bias = random((5, 3)), random(3, seed=1)
    ours = z.copy()
    kernels.bias_activation(ours, bias, kernels.IDENTITY)
    assert np.array_equal(ours, z + bias)


def test_sigmoid_extreme_inputs_saturate_exactly():
    z = np.array([[-1e4, 1e4]])
    kernels.bias_activation(z, np.zeros(2), kernels.SIGMOID)
    assert np.array_equal(z, [[0.0, 1.0]])


def check_pool(activation, pool, shape, kernel, dtype=np.float64, transposed_out=False):
    """pool_forward and pool_activation_backward vs Pool2d then the activation's backward."""
    n, c, h, w = shape
    act_layer, pool_layer = ACTIVATIONS[activation](), POOLS[pool](kernel)
    x = random(shape, dtype)
    x[0, 0, :kernel[0], :kernel[1]] = -1    # relu: a window of ties at 0 (the first one wins, as in torch)
    y = act_layer.forward(x)
    pooled_ref = pool_layer.forward(y)
    oh, ow = pooled_ref.shape[2:]
    if transposed_out:                  # (N, C, OH, OW) storage seen as (N, OH, OW, C), as LeNet's pool2
        storage = np.full((n, c, oh, ow), np.nan, dtype)
        out = storage.transpose(0, 2, 3, 1)
    else:
        out = storage = np.full((n, oh, ow, c), np.nan, dtype)
    kernels.pool_forward(nhwc(y), kernels.POOL_CODES[pool], kernel, out)
    if pool == "max":                   # picking is exact; averaging rounds (sum * (1/k) vs mean)
        assert np.array_equal(nchw(out), pooled_ref)
    grad_pooled = random(pooled_ref.shape, dtype, seed=3)
    expected = act_layer.backward(pool_layer.backward(grad_pooled))
    grad_z = np.full((n, h, w, c), np.nan, dtype)
    kernels.pool_activation_backward(nhwc(grad_pooled), nhwc(y), codes(activation, pool), kernel, grad_z)
    assert_close(f"pool {activation}/{pool} {shape}", {"pooled": (nchw(out), pooled_ref),
                                                     "grad_z": (nchw(grad_z), expected)}, tolerance(dtype))


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_pool_lenet_shapes(activation, pool): check_pool(activation, pool, (2, 6, 28, 28), (2, 2), np.float32)
@pytest.mark.parametrize("pool", POOL_NAMES)
def test_pool_odd_sizes_floor_mode(pool): check_pool("tanh", pool, (3, 4, 7, 9), (2, 2))
@pytest.mark.parametrize("pool", POOL_NAMES)
def test_pool_nonsquare_window(pool): check_pool("sigmoid", pool, (1, 3, 8, 7), (3, 2))
def test_pool_transposed_output(): check_pool("relu", "avg", (2, 16, 10, 10), (2, 2), transposed_out=True)


# --------------------------------------------------------------------------------------------
# The layer kernels, against Conv2d / Linear followed by the activation (and pooling)
# --------------------------------------------------------------------------------------------

def reference_conv_block(in_channels, out_channels, activation, pool, x, grad_pooled, dtype):
    """Conv2d(in, out, 5), the activation and 2x2 pooling: the outputs, dL/dx and the conv's layer."""
    conv = layers.Conv2d(in_channels, out_channels, 5, dtype=dtype, rng=np.random.default_rng(1))
    act_layer, pool_layer = ACTIVATIONS[activation](), POOLS[pool](2)
    y = act_layer.forward(conv.forward(x))
    pooled = pool_layer.forward(y)
    grad_x = conv.backward(act_layer.backward(pool_layer.backward(grad_pooled(pooled.shape))))
    return y, pooled, grad_x, conv


def check_conv1(activation, pool, shape, dtype=np.float64, x=None):
    """conv1_forward / conv1_backward vs Conv2d(1, C, 5), the activation, 2x2 pooling, on the
    images ``x`` (default: random)."""
    n, h, w, channels = shape
    out_h, out_w = h - 4, w - 4
    x = random((n, 1, h, w), dtype) if x is None else x
    grad_pooled = random((n, channels, out_h // 2, out_w // 2), dtype, seed=2)
    y_ref, pooled_ref, grad_x_ref, conv = reference_conv_block(1, channels, activation, pool, x,
                                                               lambda shape: grad_pooled, dtype)
    conv1 = (conv.weight.data.reshape(channels, 25), conv.bias.data)
    y = np.full((n, channels, out_h, w), np.nan, dtype)        # the input's row width, w
    pooled = np.full(nhwc(pooled_ref).shape, np.nan, dtype)
    kernels.conv1_forward(x, conv1, codes(activation, pool), y=y, pooled=pooled)

    grad_conv1 = (np.ones((channels, 25), dtype), np.ones(channels, dtype))    # added to
    grad_z = np.full((channels, out_h, w), np.nan, dtype)
    grad_x = np.full(x.shape, np.nan, dtype)
    kernels.conv1_backward(nhwc(grad_pooled), x, y, conv1, codes(activation, pool), grad_conv1=grad_conv1,
                           grad_z=grad_z, grad_x=grad_x, input_grad=True)
    assert_close(f"conv1 {activation}/{pool} {shape}", {
        "y": (y[..., :out_w], y_ref), "pooled": (nchw(pooled), pooled_ref), "grad_x": (grad_x, grad_x_ref),
        "grad_weight": (grad_conv1[0] - 1, conv.weight.grad.reshape(channels, 25)),
        "grad_bias": (grad_conv1[1] - 1, conv.bias.grad)}, tolerance(dtype))
    assert np.all(y.reshape(n, channels, -1)[:, :, -4:] == 0)            # past the last window


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_conv1_lenet_shape(activation, pool): check_conv1(activation, pool, (3, 32, 32, 6), np.float32)
@pytest.mark.parametrize("pool", POOL_NAMES)
def test_conv1_odd_sizes_floor_mode(pool): check_conv1("tanh", pool, (2, 12, 9, 3))
def test_conv1_batch1_float64(): check_conv1("relu", "max", (1, 32, 32, 6))
@pytest.mark.parametrize("channels", [1, 2, 4, 5])
def test_conv1_channel_counts(channels): check_conv1("relu", "avg", (2, 14, 13, channels))
def test_conv1_max_pool_ties_go_to_the_first_pixel():
    # A blank image: every output of a channel is tanh(its bias), exactly, so every window is a
    # tie, and tanh's derivative there is not 0: the gradient must reach each window's first
    # pixel only, as in torch, which grad_x shows.
    check_conv1("tanh", "max", (2, 11, 12, 3), x=np.zeros((2, 1, 11, 12)))


def check_conv2(activation, pool, shape, dtype=np.float64, cols_ready=True):
    """conv2_forward / conv2_backward vs Conv2d(C_in, C_out, 5), the activation, 2x2 pooling; the
    backward pass on the im2col that the forward pass left (``cols_ready``), or forming it again
    from scratch filled with NaN."""
    n, in_channels, h, w, out_channels = shape
    out_h, out_w = h - 4, w - 4
    x = random((n, in_channels, h, w), dtype)
    grad_pooled = random((n, out_channels, out_h // 2, out_w // 2), dtype, seed=2)
    y_ref, pooled_ref, grad_x_ref, conv = reference_conv_block(in_channels, out_channels, activation,
                                                               pool, x, lambda shape: grad_pooled, dtype)
    weight = np.empty((out_channels, 25 * in_channels), dtype)              # in (i, j, c) order
    kernels.permute_conv_weight(conv.weight.data.reshape(out_channels, -1), 25, weight)
    cols = np.full(n * out_h * out_w * weight.shape[1], np.nan, dtype)
    y = np.full((n, out_h, out_w, out_channels), np.nan, dtype)
    pooled = np.full(pooled_ref.shape, np.nan, dtype)                    # (c, h, w) order, as pool2
    kernels.conv2_forward(nhwc(x), (weight, conv.bias.data), codes(activation, pool), cols=cols, y=y,
                          pooled=pooled)

    grad_conv2 = (np.ones_like(weight), np.ones(out_channels, dtype))  # added to
    grad_z = np.full(y.shape, np.nan, dtype)
    grad_x = np.full((n, h, w, in_channels), np.nan, dtype)
    if not cols_ready:
        cols[:] = np.nan
    kernels.conv2_backward(grad_pooled, nhwc(x), y, (weight, conv.bias.data), codes(activation, pool),
                           grad_conv2=grad_conv2, cols=cols, cols_ready=cols_ready, grad_z=grad_z,
                           grad_x=grad_x)
    # back to torch's (c, i, j) order
    grad_weight = (grad_conv2[0] - 1).reshape(out_channels, 25, in_channels).transpose(0, 2, 1)
    assert_close(f"conv2 {activation}/{pool} {shape}", {
        "y": (nchw(y), y_ref), "pooled": (pooled, pooled_ref), "grad_x": (nchw(grad_x), grad_x_ref),
        "grad_weight": (grad_weight.reshape(out_channels, -1), conv.weight.grad.reshape(out_channels, -1)),
        "grad_bias": (grad_conv2[1] - 1, conv.bias.grad)}, tolerance(dtype))


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_conv2_lenet_shape(activation, pool): check_conv2(activation, pool, (3, 6, 14, 14, 16), np.float32)
@pytest.mark.parametrize("pool", POOL_NAMES)
def test_conv2_odd_sizes_floor_mode(pool): check_conv2("sigmoid", pool, (2, 3, 11, 10, 5))
def test_conv2_batch1_float64(): check_conv2("relu", "max", (1, 6, 14, 14, 16))
@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_conv2_forms_its_im2col_again(activation, pool):
    check_conv2(activation, pool, (3, 6, 14, 14, 16), np.float32, cols_ready=False)


def check_dense(activation, shape, dtype=np.float64, parts=1):
    """dense_forward / dense_backward vs Linear(in, out) then the activation (None: fc2's identity)."""
    n, in_features, out_features = shape
    linear = layers.Linear(in_features, out_features, dtype=dtype, rng=np.random.default_rng(1))
    act_layer = ACTIVATIONS[activation]() if activation else layers.Flatten()   # Flatten: identity on 2-D
    code = kernels.ACTIVATION_CODES[activation] if activation else kernels.IDENTITY
    x, grad_y = random((n, in_features), dtype), random((n, out_features), dtype, seed=2)
    y_ref = act_layer.forward(linear.forward(x))
    grad_x_ref = linear.backward(act_layer.backward(grad_y))
    layer = (linear.weight.data, linear.bias.data)
    y = np.full((n, out_features), np.nan, dtype)
    kernels.dense_forward(x, layer, code, y=y)
    grad_layer = (np.ones_like(linear.weight.data), np.ones_like(linear.bias.data))   # added to
    grad_x = np.full(x.shape, np.nan, dtype)
    grad_z = grad_y.copy()
    kernels.dense_backward(grad_z, y, layer, code, grad_x=grad_x)
    for part in range(parts):       # rows split as weight_grads' threads split them
        kernels.dense_weight_grad(grad_z, x, grad_layer, part, parts)
    assert_close(f"dense {activation} {shape} in {parts} parts", {
        "y": (y, y_ref), "grad_x": (grad_x, grad_x_ref),
        "grad_weight": (grad_layer[0] - 1, linear.weight.grad),
        "grad_bias": (grad_layer[1] - 1, linear.bias.grad)}, tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_dense_conv3_shape(activation, dtype): check_dense(activation, (5, 400, 120), dtype)
def test_dense_fc2_identity(): check_dense(None, (4, 84, 10))
def test_dense_batch1_odd_widths(): check_dense("tanh", (1, 7, 3))
def test_dense_weight_grad_in_parts(): check_dense("relu", (6, 84, 10), parts=3)
def test_dense_weight_grad_more_parts_than_rows(): check_dense("sigmoid", (2, 5, 3), np.float32, parts=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_a, transpose_b, beta", [(False, False, 0.0), (True, False, 1.0),
                                                            (False, True, 0.0), (True, True, 1.0)])
def test_gemm(transpose_a, transpose_b, beta, dtype):
    a, b, c = random((7, 5), dtype), random((5, 3), dtype, seed=1), random((7, 3), dtype, seed=2)
    a_stored = np.ascontiguousarray(a.T) if transpose_a else a
    b_stored = np.ascontiguousarray(b.T) if transpose_b else b
    ours = c.copy()
    kernels.gemm(a_stored, b_stored, ours, transpose_a, transpose_b, beta)
    assert_close("gemm", {"C": (ours, a @ b + beta * c)}, tolerance(dtype))


def test_permute_conv_weight():
    weight = random((16, 6, 5, 5))
    permuted = np.empty((16, 150))
    kernels.permute_conv_weight(weight.reshape(16, 150), 25, permuted)
    assert np.array_equal(permuted, weight.transpose(0, 2, 3, 1).reshape(16, 150))


def test_parameter_views_are_the_models_parameters():
    model = LeNet5(backend="numpy", seed=0)
    views = kernels.parameter_views(model.flat_data)
    for (name, param), view in zip(model.named_parameters(), (array for pair in views for array in pair)):
        assert np.shares_memory(view, model.flat_data), name
        assert np.array_equal(view, param.data.reshape(view.shape)), name


def test_workspace_sizes_follow_the_network():
    """Every per-batch array has the shape of the NumPy layers' output it stands for."""
    model, x = LeNet5(backend="numpy", seed=0), random((3, 1, 32, 32), np.float32)
    work = kernels.make_workspace(3, 2, np.float32)
    outputs = {}
    for layer in model.layers:
        x = outputs[layer] = layer.forward(x)
    conv1, pool1, conv2, pool2, conv3, fc1, logits = (outputs[model.layers[index]]
                                                      for index in (1, 2, 4, 5, 8, 10, 11))
    assert work.conv1.shape[:3] == conv1.shape[:3] and work.pool1.shape == nhwc(pool1).shape
    assert work.conv2.shape == nhwc(conv2).shape and work.pool2.shape == pool2.shape
    assert (work.conv3.shape, work.fc1.shape, work.logits.shape) == (conv3.shape, fc1.shape, logits.shape)
    exact = {"labels": np.int64, "cols2_images": np.int64, "label_smoothing": np.float64,
             "losses": np.float64}
    assert all(array.dtype == exact.get(name, np.float32) for name, array in zip(work._fields, work))
    assert work.labels.shape == (3,) and work.losses.shape == (2,)
    assert (work.cols2_images == -1).all()          # no thread's im2col holds any image yet
    conv_parameters = sum(p.data.size for p in (*model.layers[0].parameters(), *model.layers[3].parameters()))
    assert work.conv_grads.shape == (2, conv_parameters) and kernels.CONV_PARAMETERS == conv_parameters


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
    label = f"LeNet5 numba {activation}/{pool} {np.dtype(dtype)} N={batch_size}"
    assert_close(label, pairs, tolerance(dtype))


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_lenet5_float64(activation, pool): check_lenet5(activation, pool, np.float64, 5)
@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_lenet5_float32(activation, pool): check_lenet5(activation, pool, np.float32, 6)
def test_lenet5_batch1(): check_lenet5("relu", "max", np.float64, 1)
def test_lenet5_batch_not_multiple_of_sub_batch(): check_lenet5("tanh", "avg", np.float64, ODD_BATCH)
def test_lenet5_large_inputs(): check_lenet5("sigmoid", "avg", np.float32, 4, scale=50.0)


def check_loss(dtype, batch_size, label_smoothing, scale=3.0, parts=1):
    """kernels.cross_entropy_rows vs loss.softmax_cross_entropy (itself checked against torch),
    on the batch's rows in ``parts`` slices, as the threads of a training step take them."""
    logits = random((batch_size, 10), dtype, seed=batch_size) * scale
    labels = np.random.default_rng(batch_size).integers(0, 10, batch_size)
    grad = np.full_like(logits, np.nan)
    total = 0.0
    for part in range(parts):
        rows = slice(part * batch_size // parts, (part + 1) * batch_size // parts)
        total += kernels.cross_entropy_rows(logits[rows], labels[rows], label_smoothing, batch_size,
                                            grad[rows])
    expected_loss, expected_grad = softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)
    assert_close(f"loss kernel {np.dtype(dtype)} N={batch_size} eps={label_smoothing} in {parts} parts",
                 {"loss": (np.array(total / batch_size), np.array(expected_loss)),
                  "grad_logits": (grad, expected_grad)}, tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_loss_kernel(dtype, label_smoothing): check_loss(dtype, ODD_BATCH, label_smoothing)
def test_loss_kernel_batch1(): check_loss(np.float32, 1, 0.1)
def test_loss_kernel_large_logits(): check_loss(np.float64, 8, 0.0, scale=1e4)
def test_loss_kernel_in_parts(): check_loss(np.float64, ODD_BATCH, 0.1, parts=3)


def test_loss_kernel_gives_nan_for_labels_out_of_range():
    """It runs inside the parallel region, where it cannot raise: a bad label's row is NaN (and
    nothing is written outside it); LeNet5.forward_backward refuses such labels before."""
    for bad in (-1, 10):
        grad = np.zeros((2, 10))
        loss = kernels.cross_entropy_rows(random((2, 10)), np.array([0, bad]), 0.0, 2, grad)
        assert np.isnan(loss) and np.isnan(grad[1]).all() and np.isfinite(grad[0]).all()
        with pytest.raises(ValueError, match="labels"):
            LeNet5(backend="numba").forward_backward(random((2, 1, 32, 32)), np.array([0, bad]))


def check_forward_backward(activation, pool, dtype, batch_size, label_smoothing=0.1):
    """LeNet5.forward_backward on both backends vs forward, the NumPy loss and backward."""
    reference, model = twin_models(activation, pool, dtype)
    x = random((batch_size, 1, 32, 32), dtype, seed=batch_size)
    labels = np.arange(batch_size) % 10
    loss_ref, grad_logits = softmax_cross_entropy(reference.forward(x), labels, label_smoothing=label_smoothing)
    reference.backward(grad_logits, input_grad=False)
    pairs = {}
    for backend in BACKEND_NAMES:
        fused = LeNet5(activation=activation, pool=pool, dtype=dtype, seed=5, backend=backend)
        loss = fused.forward_backward(x, labels, label_smoothing=label_smoothing)
        pairs[f"loss {backend}"] = (np.array(loss), np.array(loss_ref))
        pairs[f"grads {backend}"] = (fused.flat_grad.copy(), reference.flat_grad)
        again = fused.forward_backward(x, labels, label_smoothing=label_smoothing)    # accumulates
        pairs[f"second loss {backend}"] = (np.array(again), np.array(loss_ref))
        pairs[f"accumulated grads {backend}"] = (fused.flat_grad, 2 * reference.flat_grad)
    assert_close(f"forward_backward {activation}/{pool} {np.dtype(dtype)} N={batch_size}", pairs,
                 tolerance(dtype))


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_forward_backward_float64(activation, pool): check_forward_backward(activation, pool, np.float64, 5)
@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_forward_backward_float32(activation, pool): check_forward_backward(activation, pool, np.float32, 6)
def test_forward_backward_batch1(): check_forward_backward("relu", "max", np.float32, 1, 0.0)
def test_forward_backward_odd_batch(): check_forward_backward("tanh", "avg", np.float64, ODD_BATCH)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_forward_backward_refuses_bad_batches(backend):
    model = LeNet5(seed=0, backend=backend)
    x = random((2, 1, 32, 32), np.float32)
    for images, labels, message in [(x, np.array([0, 10]), "labels must lie in"),
                                    (x, np.array([0.0, 1.0]), "integer labels"),
                                    (x, np.array([0, 1, 2]), "labels of shape"),
                                    (x[:0], np.array([], int), "at least one|N >= 1"),
                                    (x[:, :, :31], np.array([0, 1]), "input of shape")]:
        with pytest.raises(ValueError, match=message):
            model.forward_backward(images, labels)
    with pytest.raises(ValueError, match="label_smoothing"):
        model.forward_backward(x, np.array([0, 1]), label_smoothing=1.5)


def test_lenet5_batch_size_changes_and_input_dtype_is_cast():
    reference, model = twin_models(dtype=np.float32)
    for batch_size in (3, 1, 7):
        x = random((batch_size, 1, 32, 32), np.float64, seed=batch_size)
        pairs = {"logits": (model.forward(x), reference.forward(x))}
        assert_close(f"N={batch_size}", pairs, tolerance(np.float32))


def test_backward_without_input_gradient_and_before_forward():
    reference, model = twin_models()
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(np.zeros((2, 10)))
    x = random((3, 1, 32, 32))
    grad = softmax_cross_entropy(reference.forward(x), np.array([1, 2, 3]))[1]
    model.forward(x)
    assert model.backward(grad, input_grad=False) is None
    reference.backward(grad)
    assert_close("input_grad=False", {"grad": (model.flat_grad, reference.flat_grad)}, tolerance(np.float64))
    with pytest.raises(ValueError, match=r"grad_logits of shape \(3, 10\)"):
        model.backward(np.zeros((2, 10)))


def test_backward_twice_after_one_forward():
    """Two backward passes from one forward pass add the same gradients twice (the second forms
    conv2's im2col again: the first overwrote it)."""
    reference, model = twin_models(activation="tanh", pool="max")
    x = random((ODD_BATCH, 1, 32, 32))
    grad_logits = softmax_cross_entropy(reference.forward(x), np.arange(ODD_BATCH) % 10)[1]
    reference.backward(grad_logits)
    model.forward(x)
    grads = [model.backward(grad_logits) for _ in range(2)]
    assert_close("backward twice", {"grad_x": (grads[1], grads[0]),
                                     "grads": (model.flat_grad, 2 * reference.flat_grad)},
                 tolerance(np.float64))


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
        grad = model.flat_grad.copy()
        model.zero_grad()
        loss = model.forward_backward(x, np.arange(9))
        results.append((logits, grad, np.array(loss), model.flat_grad.copy()))
    numba.set_num_threads(previous)
    assert_close("1 vs all threads", {name: (results[-1][i], results[0][i]) for i, name in
                                      enumerate(("logits", "grad", "training loss", "training grad"))},
                 tolerance(np.float64))


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
    fresh.step()
    reference_opt.step()
    assert np.array_equal(model.flat_data, reference.flat_data)


def test_optimizer_on_other_parameters_is_not_fused():
    model, other = LeNet5(backend="numba", seed=0), LeNet5(backend="numba", seed=1)
    assert Adam(model.parameters()).fused_buffers is not None
    assert Adam(model.parameters()[1:]).fused_buffers is None        # not the whole buffer
    assert Adam(model.parameters()[::-1]).fused_buffers is None      # not in the buffer's order
    assert Adam(model.parameters() + other.parameters()).fused_buffers is None
    assert Adam(LeNet5(backend="numpy").parameters()).fused_buffers is None


def step_with_gradients(optimizers, models, steps=3, dtype=np.float32):
    """The same random gradients into every model's flat_grad, then every optimiser steps."""
    for step in range(steps):
        grad = random(models[0].flat_grad.shape, dtype, seed=step)
        for model in models:
            model.flat_grad[:] = grad
        for optimizer in optimizers:
            optimizer.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unfused_reordered_parameters_give_the_fused_numbers(name):
    fused_model, model = (LeNet5(backend="numba", seed=3) for _ in range(2))
    fused, reordered = OPTIMIZERS[name](fused_model.parameters()), OPTIMIZERS[name](model.parameters()[::-1])
    assert fused.fused_buffers is not None and reordered.fused_buffers is None
    step_with_gradients([fused, reordered], [fused_model, model])
    assert np.array_equal(model.flat_data, fused_model.flat_data)
    assert not np.array_equal(model.flat_data, LeNet5(backend="numba", seed=3).flat_data)   # it moved


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unfused_two_models_give_the_fused_numbers(name):
    first, second, fused_first, fused_second = (LeNet5(backend="numba", seed=s) for s in (1, 2, 1, 2))
    joint = OPTIMIZERS[name](first.parameters() + second.parameters())
    fused = [OPTIMIZERS[name](model.parameters()) for model in (fused_first, fused_second)]
    assert joint.fused_buffers is None and all(f.fused_buffers is not None for f in fused)
    step_with_gradients([joint, *fused], [first, second, fused_first, fused_second])
    assert np.array_equal(first.flat_data, fused_first.flat_data)
    assert np.array_equal(second.flat_data, fused_second.flat_data)


# --------------------------------------------------------------------------------------------
# Choosing the backend, threads, warm-up
# --------------------------------------------------------------------------------------------

def test_engine_rejects_other_networks():
    model = LeNet5(backend="numpy")
    model.fc2 = layers.Linear(84, 11)
    with pytest.raises(ValueError, match="written for LeNet-5's parameters"):
        engine.NumbaLeNet5.for_model(model)


def test_backend_names():
    assert BACKEND_NAMES == ("numpy", "numba")
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


@pytest.fixture
def restore_threads():
    import numba

    previous_numba, previous_blas = numba.get_num_threads(), blas.blas_threads()
    yield
    numba.set_num_threads(previous_numba)
    blas.set_blas_threads(previous_blas)


def test_set_threads(restore_threads):
    import numba

    assert set_threads(1) == 1
    assert numba.get_num_threads() == 1 and blas.blas_threads() == 1
    set_threads(64)
    assert numba.get_num_threads() == min(numba.config.NUMBA_NUM_THREADS, available_cores())
    with pytest.raises(ValueError, match="threads must be >= 1"):
        set_threads(0)


def test_set_threads_caps_at_the_cores_available(restore_threads):
    """--threads 1000 once set BLAS to 64 threads on 2 cores: more threads than cores only wait."""
    import numba

    cores = len(os.sched_getaffinity(0))
    assert available_cores() == cores
    assert set_threads(1000) == cores
    assert blas.blas_threads() == cores
    assert numba.get_num_threads() == min(cores, numba.config.NUMBA_NUM_THREADS)


def test_kernels_leave_blas_threads_alone():
    previous = blas.blas_threads()
    blas.set_blas_threads(2)
    try:
        model = LeNet5(backend="numba")
        logits = model.forward(random((2, 1, 32, 32), np.float32))
        model.backward(softmax_cross_entropy(logits, np.array([0, 1]))[1])
        assert blas.blas_threads() == 2
    finally:
        blas.set_blas_threads(previous)


def test_starting_the_thread_pool_leaves_the_environment_alone():
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    before = {name: os.environ.get(name) for name in names}
    engine.start_thread_pool()
    assert {name: os.environ.get(name) for name in names} == before


def run_python(program: str, env: dict[str, str] | None = None) -> None:
    """Run ``program`` in a fresh interpreter at the repository's top, with ``env`` added to the
    environment; fail with its stderr."""
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr


def test_importing_the_kernels_starts_no_threads_and_leaves_the_environment_alone():
    run_python("import os\n"
               "before = dict(os.environ)\n"
               "import numpylenet.kernels, numpylenet.engine\n"
               "import numba.np.ufunc.parallel as parallel\n"
               "assert not parallel._is_initialized, 'the thread pool started at import'\n"
               "assert dict(os.environ) == before\n"
               "import numpylenet\n"
               "numpylenet.LeNet5(backend='numba')\n"
               "assert parallel._is_initialized, 'building an engine did not start the pool'\n"
               "assert dict(os.environ) == before\n")


@pytest.mark.parametrize("optimizer, unused", [("sgd", "adam_step"), ("adam", "sgd_step")])
def test_compile_prepares_only_the_runs_optimizer(optimizer, unused):
    """A run compiles its own optimiser's fused step and not the other one (in a fresh process:
    this one has compiled both); a training step then needs nothing more."""
    used = {"sgd": "sgd_step", "adam": "adam_step"}[optimizer]
    run_python("import numpy as np\n"
               "from numpylenet import SGD, Adam, LeNet5, kernels, softmax_cross_entropy\n"
               "from numpylenet.engine import NumbaLeNet5\n"
               f"NumbaLeNet5.compile(np.float32, {optimizer!r})\n"
               f"assert len(kernels.{used}.signatures) == 1\n"
               f"assert not kernels.{unused}.signatures, 'compiled the other optimiser too'\n"
               "passes = (kernels.on_threads, kernels.forward_images, kernels.loss_images,\n"
               "          kernels.backward_images, kernels.weight_grads)\n"
               "assert [len(kernel.signatures) for kernel in passes] == [1, 1, 1, 1, 1]\n"
               "model = LeNet5(seed=0, backend='numba')\n"
               f"optimizer = {{'sgd': SGD, 'adam': Adam}}[{optimizer!r}](model.parameters(), lr=0.1)\n"
               "logits = model.forward(np.zeros((5, 1, 32, 32), np.float32))\n"
               "model.backward(softmax_cross_entropy(logits, np.arange(5))[1], input_grad=False)\n"
               "optimizer.step()\n"
               "assert [len(kernel.signatures) for kernel in passes] == [1, 1, 1, 1, 1], \\\n"
               "    'a step compiled more'\n"
               f"assert len(kernels.{used}.signatures) == 1 and not kernels.{unused}.signatures\n")


def test_compile_refuses_an_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        engine.NumbaLeNet5.compile(np.float32, "rmsprop")


@pytest.mark.parametrize("dtype", ["float16", np.int64, ">f4", "nope", np.float16])
def test_compile_refuses_a_dtype_the_kernels_do_not_run(dtype):
    """float16 reached Numba, which printed 240 lines of typing errors."""
    with pytest.raises(ValueError, match="the numba kernels run float32 or float64"):
        engine.NumbaLeNet5.compile(dtype)


def test_warmup_takes_one_dtype_name_as_that_dtype(monkeypatch):
    """warmup("float32") compiled float32, then int64 ('l'), then failed on 'o': its characters."""
    compiled = []
    monkeypatch.setattr(engine.NumbaLeNet5, "compile", classmethod(lambda cls, dtype, **_: compiled.append(dtype)))
    engine.warmup("float32")
    engine.warmup(np.float64)        # a dtype object too: it was iterated ('type' object is not iterable)
    engine.warmup(np.dtype("float32"))
    assert compiled == ["float32", np.float64, np.dtype("float32")]


def test_warmup_compiles_everything_a_training_step_runs():
    """After warmup, training steps of both dtypes and both optimisers compile nothing new."""
    seconds = engine.warmup()
    assert isinstance(seconds, float) and seconds >= 0
    dispatchers = (kernels.on_threads, kernels.forward_images, kernels.loss_images, kernels.backward_images,
                   kernels.weight_grads, kernels.adam_step, kernels.sgd_step)
    compiled = [len(dispatcher.signatures) for dispatcher in dispatchers]
    for dtype in DTYPES:
        for make_optimizer in (OPTIMIZERS["adam"], OPTIMIZERS["sgd_nesterov"], OPTIMIZERS["sgd"]):
            model = LeNet5(activation="tanh", pool="max", dtype=dtype, seed=0, backend="numba")
            optimizer = make_optimizer(model.parameters())
            logits = model.forward(random((5, 1, 32, 32)))
            model.backward(softmax_cross_entropy(logits, np.arange(5))[1], input_grad=False)
            optimizer.step()
    assert [len(dispatcher.signatures) for dispatcher in dispatchers] == compiled


def test_a_cold_compile_has_a_helper_process_compile_the_backward_pass(tmp_path):
    """On an empty Numba cache the backward and weight-gradient passes are compiled by the helper
    process and only loaded here; everything else (the augmentation's kernel too, when asked) is
    compiled here, once; a training step then compiles nothing more and gives the numbers of a
    model compiled all in one process. The package is a copy, imported through the first entry
    of sys.path: the helper must compile that copy, not the one at the repository's top."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "numpylenet", elsewhere / "numpylenet", ignore=shutil.ignore_patterns("__pycache__"))
    run_python("import sys\n"
               f"sys.path.insert(0, {str(elsewhere)!r})\n"
               "import numpy as np\n"
               "import numpylenet\n"
               f"assert numpylenet.__file__.startswith({str(elsewhere)!r}), numpylenet.__file__\n"
               "from numpylenet import Adam, LeNet5, kernels\n"
               "from numpylenet.engine import NumbaLeNet5\n"
               "from numpylenet.augment_kernels import warp_bilinear_kernel\n"
               "NumbaLeNet5.compile(np.float32, 'adam', affine_augmentation=True)\n"
               "def counts(dispatcher):\n"
               "    return sum(dispatcher.stats.cache_hits.values()), sum(dispatcher.stats.cache_misses.values())\n"
               "helper_kernels = (kernels.backward_images, kernels.weight_grads)\n"
               "for from_the_helper in helper_kernels:\n"
               "    assert counts(from_the_helper) == (1, 0), (from_the_helper, counts(from_the_helper))\n"
               "for compiled_here in (kernels.forward_images, kernels.loss_images, kernels.on_threads,\n"
               "                      warp_bilinear_kernel):\n"
               "    assert counts(compiled_here) == (0, 1), (compiled_here, counts(compiled_here))\n"
               "model = LeNet5(seed=0, backend='numba')\n"
               "optimizer = Adam(model.parameters(), lr=0.1)\n"
               "x = np.random.default_rng(0).random((5, 1, 32, 32), np.float32)\n"
               "model.forward_backward(x, np.arange(5))\n"
               "optimizer.step()\n"
               "passes = (kernels.on_threads, kernels.forward_images, kernels.loss_images,\n"
               "          kernels.backward_images, kernels.weight_grads)\n"
               "assert [len(kernel.signatures) for kernel in passes] == [1, 1, 1, 1, 1]\n"
               f"np.save({str(tmp_path / 'weights.npy')!r}, model.flat_buffers()[0])\n",
               env={"NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    model = LeNet5(seed=0, backend="numba")     # compiled by this test session, in one process
    optimizer = Adam(model.parameters(), lr=0.1)
    model.forward_backward(np.random.default_rng(0).random((5, 1, 32, 32), np.float32), np.arange(5))
    optimizer.step()
    np.testing.assert_array_equal(np.load(tmp_path / "weights.npy"), model.flat_buffers()[0])


def test_a_warm_compile_starts_no_helper(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("started a helper process with the kernels already in the cache")

    monkeypatch.setattr(engine.subprocess, "Popen", no_process)
    engine.NumbaLeNet5.compile(np.float32, "sgd")


@pytest.mark.parametrize("executable", ["/nonexistent/python", "false"])
def test_a_helper_that_fails_leaves_the_compile_to_this_process(monkeypatch, executable):
    """A helper that cannot start, or exits with an error, costs nothing but its time: the
    kernels still end up compiled (here: loaded from this session's cache) and run."""
    import shutil

    monkeypatch.setattr(engine._CompileRun, "backward_wants_compiling_into_the_cache", lambda self: True)
    monkeypatch.setattr(engine.sys, "executable", shutil.which(executable) or executable)
    engine.NumbaLeNet5.compile(np.float64, "adam")
    model = LeNet5(seed=0, dtype=np.float64, backend="numba")
    assert np.isfinite(model.forward_backward(random((3, 1, 32, 32)), np.arange(3)))


@pytest.mark.parametrize("recipe, compiled", [("default", 1), ("speedrun", 0)])
def test_a_learner_compiles_the_affine_augmentation_only_when_its_run_uses_it(recipe, compiled):
    run_python("from numpylenet.augment_kernels import warp_bilinear_kernel\n"
               "from numpylenet.loop import NumpyLearner\n"
               "from numpylenet.recipes import make_config\n"
               f"NumpyLearner(make_config({recipe!r}, dataset='mnist-sample', backend='numba'))\n"
               f"assert len(warp_bilinear_kernel.signatures) == {compiled}, warp_bilinear_kernel.signatures\n")


def test_one_model_called_from_two_threads_gives_each_its_own_logits():
    """The engine has one workspace per model: calls from several Python threads take turns."""
    import threading

    model = LeNet5(dtype=np.float64, seed=0, backend="numba")
    batches = [random((64, 1, 32, 32), seed=seed) for seed in range(2)]
    expected = [model.forward(x) for x in batches]
    wrong = []

    def call(index):
        for _ in range(20):
            if not np.array_equal(model.forward(batches[index]), expected[index]):
                wrong.append(index)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong


def test_set_threads_holds_in_every_python_thread(monkeypatch):
    """Numba's own thread count is per Python thread; numpylenet's --threads is for the process."""
    import threading

    import numba

    from numpylenet import backend

    if available_cores() < 2 or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads to choose one of them")
    monkeypatch.setattr(engine, "_KERNEL_THREADS", None)
    previous = numba.get_num_threads()
    model, x, used = LeNet5(seed=0, backend="numba"), random((64, 1, 32, 32), np.float32), []
    try:
        backend.set_threads(1)
        worker = threading.Thread(target=lambda: used.append((model.forward(x), model.engine.threads)))
        worker.start()
        worker.join()
    finally:
        numba.set_num_threads(previous)
    assert used[0][1] == 1
