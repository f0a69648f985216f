"""Central-difference gradient checks in float64, independent of torch.

Every backward pass (grad_input and each parameter gradient) is compared with
(f(a + h) - f(a - h)) / 2h, perturbing one entry at a time. See numpylenet.compare.GRADCHECK_TOLERANCE.
"""

import numpy as np
import pytest

from helpers import assert_ok, check_gradients
from numpylenet import AvgPool2d, Conv2d, Flatten, LeNet5, Linear, MaxPool2d, ReLU, Sigmoid, Tanh
from numpylenet.compare import lenet5_vs_finite_differences, loss_vs_finite_differences

pytestmark = pytest.mark.usefixtures("single_thread")


def rng():
    return np.random.default_rng(2)


@pytest.mark.parametrize("make_layer, input_shape", [
    pytest.param(lambda: Conv2d(2, 3, 3, dtype=np.float64, rng=rng()), (2, 2, 5, 6), id="conv"),
    pytest.param(lambda: Conv2d(2, 3, (2, 3), stride=2, padding=1, dtype=np.float64, rng=rng()), (2, 2, 5, 6),
                 id="conv_stride2_padding"),
    pytest.param(lambda: Conv2d(1, 2, (3, 2), stride=(1, 2), padding=(2, 0), dtype=np.float64, rng=rng()),
                 (1, 1, 4, 7), id="conv_pairs_batch1"),
    pytest.param(lambda: AvgPool2d(2), (2, 2, 5, 7), id="avgpool"),
    pytest.param(lambda: AvgPool2d(3, stride=2), (1, 2, 7, 6), id="avgpool_overlapping"),
    pytest.param(lambda: MaxPool2d(2), (2, 2, 5, 7), id="maxpool"),
    pytest.param(lambda: MaxPool2d(3, stride=2), (1, 2, 7, 6), id="maxpool_overlapping"),
    pytest.param(lambda: ReLU(), (3, 2, 4, 4), id="relu"),
    pytest.param(lambda: Tanh(), (3, 2, 4, 4), id="tanh"),
    pytest.param(lambda: Sigmoid(), (3, 2, 4, 4), id="sigmoid"),
    pytest.param(lambda: Flatten(), (2, 3, 2, 2), id="flatten"),
    pytest.param(lambda: Linear(6, 4, dtype=np.float64, rng=rng()), (3, 6), id="linear"),
])
def test_layer_gradients_match_finite_differences(make_layer, input_shape):
    check_gradients(make_layer(), input_shape)


@pytest.mark.parametrize("batch, classes, scale", [(4, 10, 1.0), (1, 10, 1.0), (3, 5, 20.0)],
                         ids=["batch4", "batch1", "large_logits"])
def test_softmax_cross_entropy_gradient_matches_finite_differences(batch, classes, scale):
    generator = np.random.default_rng(3)
    logits = scale * generator.standard_normal((batch, classes))
    labels = generator.integers(0, classes, size=batch)
    assert_ok(loss_vs_finite_differences(logits, labels))


@pytest.mark.parametrize("activation, pool", [("tanh", "max"), ("sigmoid", "avg")])
def test_lenet5_gradients_match_finite_differences(activation, pool):
    """End to end through the whole network, on a random sample of 12 entries per parameter and
    (but for sigmoid, whose is too small) of the input gradient; the step and its error are
    discussed in :func:`numpylenet.compare.lenet5_vs_finite_differences`."""
    model = LeNet5(activation=activation, pool=pool, dtype=np.float64, seed=4)
    generator = np.random.default_rng(5)
    images = generator.standard_normal((2, 1, 32, 32))
    input_grad = activation != "sigmoid"
    rows = lenet5_vs_finite_differences(model, images, np.array([3, 7]), rng=generator, input_grad=input_grad,
                                        label=f"LeNet5 {activation}/{pool}")
    assert len(rows) == 10 + input_grad
    assert_ok(rows)
