"""Bad inputs raise ValueError whose message names the shape that was expected.

One case per line: the layer, the bad input (shape and dtype), and a piece of text the message
must contain so the user can see what shape the layer wanted.
"""

import numpy as np
import pytest

from numpylenet import (AvgPool2d, Conv2d, Flatten, LeNet5, Linear, MaxPool2d, Parameter, ReLU, Sigmoid,
                        Tanh, softmax_cross_entropy)

pytestmark = pytest.mark.usefixtures("single_thread")


def check_rejects(layer, shape, dtype, expected_text):
    bad_input = np.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError) as error:
        layer.forward(bad_input)
    message = str(error.value)
    assert expected_text in message, f"{message!r} does not name the expected shape {expected_text!r}"
    print(f"{type(layer).__name__:<10} {str(shape):<18} {np.dtype(dtype).name:<8} -> {message}")


@pytest.mark.parametrize("make_layer, shape, dtype, expected_text", [
    pytest.param(lambda: Conv2d(3, 4, 3), (3, 8, 8), np.float32, "(N, 3, H, W)", id="conv_rank3"),
    pytest.param(lambda: Conv2d(3, 4, 3), (1, 2, 3, 8, 8), np.float32, "(N, 3, H, W)", id="conv_rank5"),
    pytest.param(lambda: Conv2d(3, 4, 3), (2, 1, 8, 8), np.float32, "(N, 3, H, W)", id="conv_wrong_channels"),
    pytest.param(lambda: Conv2d(1, 6, 5), (2, 1, 4, 9), np.float32, "(N, 1, H, W)", id="conv_too_short"),
    pytest.param(lambda: Conv2d(1, 6, (3, 5)), (2, 1, 9, 4), np.float32, "(N, 1, H, W)", id="conv_too_narrow"),
    pytest.param(lambda: Conv2d(1, 6, 5, padding=1), (2, 1, 2, 9), np.float32, "(N, 1, H, W)",
                 id="conv_too_small_even_padded"),
    pytest.param(lambda: Conv2d(3, 4, 3), (2, 3, 8, 8), np.int64, "(N, 3, H, W)", id="conv_int64"),
    pytest.param(lambda: Conv2d(1, 4, 3), (2, 1, 8, 8), np.uint8, "(N, 1, H, W)", id="conv_uint8"),
    pytest.param(lambda: AvgPool2d(2), (4, 8, 8), np.float32, "(N, C, H, W)", id="avgpool_rank3"),
    pytest.param(lambda: AvgPool2d(3), (2, 1, 2, 8), np.float32, "(N, C, H, W)", id="avgpool_too_small"),
    pytest.param(lambda: AvgPool2d(2), (2, 1, 8, 8), np.int32, "(N, C, H, W)", id="avgpool_int32"),
    pytest.param(lambda: MaxPool2d(2), (8, 8), np.float64, "(N, C, H, W)", id="maxpool_rank2"),
    pytest.param(lambda: MaxPool2d((2, 4)), (2, 1, 8, 3), np.float64, "(N, C, H, W)", id="maxpool_too_narrow"),
    pytest.param(lambda: MaxPool2d(2), (2, 1, 8, 8), np.int64, "(N, C, H, W)", id="maxpool_int64"),
    pytest.param(lambda: Linear(5, 3), (2, 4), np.float32, "(N, 5)", id="linear_wrong_features"),
    pytest.param(lambda: Linear(5, 3), (5,), np.float32, "(N, 5)", id="linear_rank1"),
    pytest.param(lambda: Linear(5, 3), (2, 5, 1), np.float32, "(N, 5)", id="linear_rank3"),
    pytest.param(lambda: Linear(5, 3), (2, 5), np.int64, "(N, 5)", id="linear_int64"),
    pytest.param(lambda: ReLU(), (2, 5), np.int64, "floating-point", id="relu_int64"),
    pytest.param(lambda: Tanh(), (2, 5), np.int32, "floating-point", id="tanh_int32"),
    pytest.param(lambda: Sigmoid(), (2, 5), np.uint8, "floating-point", id="sigmoid_uint8"),
    pytest.param(lambda: Flatten(), (), np.float32, "(N, d1, ...)", id="flatten_scalar"),
    pytest.param(lambda: Flatten(), (5,), np.float32, "(N, d1, ...)", id="flatten_rank1"),
    pytest.param(lambda: Flatten(), (2, 3, 4), np.int64, "(N, d1, ...)", id="flatten_int64"),
    pytest.param(lambda: LeNet5(seed=0), (2, 1, 28, 28), np.float32, "(N, 1, 32, 32)", id="lenet_mnist_28x28"),
    pytest.param(lambda: LeNet5(seed=0), (2, 3, 32, 32), np.float32, "(N, 1, 32, 32)", id="lenet_rgb"),
    pytest.param(lambda: LeNet5(seed=0), (1, 32, 32), np.float32, "(N, 1, 32, 32)", id="lenet_no_batch_axis"),
    pytest.param(lambda: LeNet5(seed=0), (2, 1, 32, 32), np.uint8, "(N, 1, 32, 32)", id="lenet_uint8"),
])
def test_bad_input_is_rejected(make_layer, shape, dtype, expected_text):
    check_rejects(make_layer(), shape, dtype, expected_text)


@pytest.mark.parametrize("logits, labels", [
    pytest.param(np.zeros(10), np.array([1]), id="logits_rank1"),
    pytest.param(np.zeros((2, 10), np.int64), np.array([1, 2]), id="integer_logits"),
    pytest.param(np.zeros((2, 10)), np.array([1, 2, 3]), id="label_count"),
    pytest.param(np.zeros((2, 10)), np.array([1.0, 2.0]), id="float_labels"),
    pytest.param(np.zeros((2, 10)), np.array([1, 10]), id="label_out_of_range"),
    pytest.param(np.zeros((2, 10)), np.array([-1, 0]), id="negative_label"),
])
def test_bad_loss_input_is_rejected(logits, labels):
    with pytest.raises(ValueError):
        softmax_cross_entropy(logits, labels)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: LeNet5(activation="softmax"), id="lenet_activation"),
    pytest.param(lambda: LeNet5(pool="min"), id="lenet_pool"),
    pytest.param(lambda: LeNet5(dtype=np.int32), id="lenet_int_dtype"),
    pytest.param(lambda: LeNet5(dtype=None), id="lenet_dtype_none"),        # NumPy's None is float64
    pytest.param(lambda: Linear(3, 2, dtype=None), id="linear_dtype_none"),
    pytest.param(lambda: Parameter([1.0, 2.0]), id="parameter_list"),       # failed later, in step()
    pytest.param(lambda: Parameter(np.arange(3)), id="parameter_int"),
    pytest.param(lambda: Conv2d(1, 6, 0), id="conv_zero_kernel"),
    pytest.param(lambda: Conv2d(1, 6, 3, stride=0), id="conv_zero_stride"),
    pytest.param(lambda: Conv2d(1, 6, 3, padding=-1), id="conv_negative_padding"),
    pytest.param(lambda: Conv2d(1, 6, (3, 3, 3)), id="conv_kernel_triple"),
    pytest.param(lambda: MaxPool2d(2, stride=0), id="maxpool_zero_stride"),
    pytest.param(lambda: Linear(0, 3), id="linear_zero_features"),
])
def test_bad_configuration_is_rejected(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("make_layer, input_shape, grad_shape", [
    pytest.param(lambda: Conv2d(3, 4, 3), (2, 3, 6, 6), (4, 2, 4, 4), id="conv_batch_and_channels_swapped"),
    pytest.param(lambda: Conv2d(3, 4, 3), (2, 3, 6, 6), (2, 4, 16), id="conv_flattened"),
    pytest.param(lambda: AvgPool2d(2), (2, 3, 4, 4), (3, 2, 2, 2), id="avgpool_swapped"),
    pytest.param(lambda: MaxPool2d(2), (2, 3, 4, 4), (2, 3, 2, 1), id="maxpool_too_few"),
    pytest.param(lambda: ReLU(), (3,), (3, 1), id="relu_broadcastable"),
    pytest.param(lambda: Tanh(), (2, 5), (5,), id="tanh_broadcastable"),
    pytest.param(lambda: Flatten(), (2, 3, 4), (2, 3, 4), id="flatten_not_flat"),
    pytest.param(lambda: Linear(5, 3), (2, 5), (2, 1), id="linear_broadcastable"),
    pytest.param(lambda: Linear(5, 3), (2, 5), (3, 2), id="linear_transposed"),
])
def test_a_gradient_not_of_the_output_s_shape_is_rejected_before_any_grad_changes(make_layer, input_shape,
                                                                                    grad_shape):
    """Broadcastable or same-size gradients were accepted and gave wrong dW and dx (Linear's
    matmul error came after it had added into weight.grad)."""
    layer = make_layer()
    y = layer.forward(np.ones(input_shape, np.float32))
    before = [p.grad.copy() for p in layer.parameters()]
    with pytest.raises(ValueError, match="expected a float gradient of the output's shape"):
        layer.backward(np.ones(grad_shape, np.float32))
    assert all(np.array_equal(p.grad, old) for p, old in zip(layer.parameters(), before))
    with pytest.raises(ValueError, match="got int64"):
        layer.backward(np.ones(y.shape, np.int64))
