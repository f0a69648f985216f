"""Every layer against its torch.nn twin: output, grad_input and parameter gradients.

One case per line: (our layer, torch layer) built from the same arguments, and the input shape.
Each case runs in float64 (relative error <= 1e-9) and float32 (see helpers.TOLERANCE).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from helpers import check_layer  # noqa: E402
from numpylenet import (AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid,  # noqa: E402
                        Tanh)

pytestmark = pytest.mark.usefixtures("single_thread")


def weighted(ours, theirs, *args, **kwargs):
    """A layer with parameters: ours gets the dtype and a seeded rng, torch the same arguments."""
    return (lambda dtype: ours(*args, **kwargs, dtype=dtype, rng=np.random.default_rng(1)),
            lambda: theirs(*args, **kwargs))


def stateless(ours, theirs, *args, **kwargs):
    return (lambda dtype: ours(*args, **kwargs), lambda: theirs(*args, **kwargs))


# Pooling geometries, each run through both AvgPool2d and MaxPool2d: (args, kwargs, input, id).
POOL_GEOMETRIES = [
    ((2,), {}, (2, 3, 8, 8), "2"),
    ((2,), {}, (2, 3, 7, 9), "odd_sizes"),
    ((2,), {}, (1, 1, 5, 5), "batch1"),
    ((3,), {"stride": 2}, (2, 2, 9, 8), "overlapping"),
    ((2,), {"stride": 3}, (2, 2, 10, 11), "gaps"),
    (((2, 3),), {"stride": (1, 2)}, (2, 2, 7, 8), "pairs"),
]
POOLS = {"avgpool": (AvgPool2d, nn.AvgPool2d), "maxpool": (MaxPool2d, nn.MaxPool2d)}

CASES = [
    pytest.param(*weighted(Conv2d, nn.Conv2d, 1, 6, 5), (2, 1, 32, 32), id="conv_lenet_conv1"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 6, 16, 5), (2, 6, 14, 14), id="conv_lenet_conv2"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 16, 120, 5), (3, 16, 5, 5), id="conv_kernel_covers_input"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 3, 8, 3), (4, 3, 10, 10), id="conv_multichannel"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 2, 5, 3), (1, 2, 7, 7), id="conv_batch1"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 4, 6, 1), (2, 4, 5, 5), id="conv_1x1"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 3, 4, 3, stride=2), (2, 3, 11, 11), id="conv_stride2"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 3, 4, 3, stride=2), (2, 3, 10, 10), id="conv_stride2_floor"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 2, 3, 3, stride=(2, 1)), (2, 2, 9, 8), id="conv_stride_pair"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 3, 4, 3, padding=1), (2, 3, 8, 8), id="conv_padding"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 3, 4, (3, 5), padding=(1, 2)), (2, 3, 6, 7), id="conv_padding_pair"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 2, 3, 3), (2, 2, 7, 12), id="conv_nonsquare_input"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 2, 3, (2, 4)), (2, 2, 8, 9), id="conv_nonsquare_kernel"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 3, 5, (3, 2), stride=(2, 3), padding=(1, 2)), (2, 3, 9, 10),
                 id="conv_everything_pairs"),
    pytest.param(*weighted(Conv2d, nn.Conv2d, 2, 2, 3, padding=2), (1, 2, 2, 2), id="conv_padding_makes_room"),
    *[pytest.param(*stateless(*classes, *args, **kwargs), input_shape, id=f"{pool}_{name}")
      for pool, classes in POOLS.items() for args, kwargs, input_shape, name in POOL_GEOMETRIES],
    pytest.param(*stateless(ReLU, nn.ReLU), (2, 3, 5, 7), id="relu"),
    pytest.param(*stateless(ReLU, nn.ReLU), (4, 9), id="relu_2d"),
    pytest.param(*stateless(Tanh, nn.Tanh), (2, 3, 5, 7), id="tanh"),
    pytest.param(*stateless(Tanh, nn.Tanh), (4, 9), id="tanh_2d"),
    pytest.param(*stateless(Sigmoid, nn.Sigmoid), (2, 3, 5, 7), id="sigmoid"),
    pytest.param(*stateless(Sigmoid, nn.Sigmoid), (4, 9), id="sigmoid_2d"),
    pytest.param(*stateless(Flatten, nn.Flatten), (2, 3, 4, 5), id="flatten"),
    pytest.param(*stateless(Flatten, nn.Flatten), (1, 120, 1, 1), id="flatten_lenet_conv3"),
    pytest.param(*weighted(Linear, nn.Linear, 120, 84), (5, 120), id="linear_lenet_fc1"),
    pytest.param(*weighted(Linear, nn.Linear, 7, 3), (1, 7), id="linear_batch1"),
    pytest.param(*weighted(Linear, nn.Linear, 3, 11), (6, 3), id="linear_widening"),
]

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_ours, make_torch, input_shape", CASES)
def test_layer_matches_torch(make_ours, make_torch, input_shape, dtype):
    check_layer(make_ours, make_torch, input_shape, dtype)


# Saturating inputs: sigmoid/tanh must stay finite and exact where exp(-x) overflows.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_ours, make_torch", [stateless(Sigmoid, nn.Sigmoid), stateless(Tanh, nn.Tanh)],
                         ids=["sigmoid", "tanh"])
def test_activation_saturated(make_ours, make_torch, dtype):
    check_layer(make_ours, make_torch, (4, 50), dtype, scale=300.0)


# Parameter gradients accumulate over backward calls, as torch's .grad does.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_ours, make_torch, input_shape", [
    pytest.param(*weighted(Conv2d, nn.Conv2d, 3, 4, 3, stride=2, padding=1), (2, 3, 9, 9), id="conv"),
    pytest.param(*weighted(Linear, nn.Linear, 5, 4), (3, 5), id="linear"),
])
def test_parameter_gradients_accumulate(make_ours, make_torch, input_shape, dtype):
    check_layer(make_ours, make_torch, input_shape, dtype, passes=2)


# All-equal input: every window ties, and torch sends each window's gradient to its first
# (row-major) element; overlapping windows then add up on shared elements.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("args, kwargs", [((2,), {}), ((3,), {"stride": 2}), ((2,), {"stride": 1})],
                         ids=["2", "overlapping", "stride1"])
def test_maxpool_ties_go_to_the_first_maximum(args, kwargs, dtype):
    check_layer(*stateless(MaxPool2d, nn.MaxPool2d, *args, **kwargs), (2, 2, 7, 8), dtype, scale=0.0)


# NaN follows torch's rules: ReLU passes the gradient at a NaN input (torch's threshold_backward
# zeroes it only where y <= 0, which NaN is not), and in a max-pooling window a NaN beats every
# number and a later NaN beats an earlier one (torch's kernel: "val > maxval or isnan(val)").
NAN, INF = np.nan, np.inf


def check_nan_routing(ours, theirs, x: np.ndarray) -> None:
    """Output and grad_input (upstream all ones) equal torch's exactly, NaN in the same places."""
    x_torch = torch.from_numpy(x.copy()).requires_grad_()
    y_torch = theirs(x_torch)
    y_torch.backward(torch.ones_like(y_torch))
    y = ours.forward(x.copy())
    grad_input = ours.backward(np.ones_like(y))
    np.testing.assert_array_equal(y, y_torch.detach().numpy())
    np.testing.assert_array_equal(grad_input, x_torch.grad.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_at_nan_passes_the_gradient_as_torch(dtype):
    check_nan_routing(ReLU(), nn.ReLU(), np.array([[NAN, -1.0, 0.0, 2.0, INF, -INF]], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [[NAN, 1, NAN, 2], [1, NAN, 3, NAN], [NAN, NAN, NAN, NAN], [5, 5, NAN, 5],
                                    [NAN, 5, 5, 1], [-INF] * 4, [NAN, -INF, 1, 2]],
                         ids=lambda window: "_".join(str(v) for v in window))
def test_maxpool_routes_nan_windows_as_torch(window, dtype):
    check_nan_routing(MaxPool2d(2), nn.MaxPool2d(2), np.array(window, dtype).reshape(1, 1, 2, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_routes_nan_in_overlapping_windows_as_torch(dtype):
    x = np.array([[NAN, 1, 2, NAN], [3, NAN, 4, 4], [4, 4, 4, NAN], [NAN, 0, 1, 2]], dtype).reshape(1, 1, 4, 4)
    check_nan_routing(MaxPool2d(3, stride=1), nn.MaxPool2d(3, stride=1), x)
    check_nan_routing(MaxPool2d(2, stride=1), nn.MaxPool2d(2, stride=1), x)
