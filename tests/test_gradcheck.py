"""Central-difference gradient checks in float64, independent of torch.

Every backward pass (grad_input and each parameter gradient) is compared with
(f(a + h) - f(a - h)) / 2h, perturbing one entry at a time. See helpers.GRADCHECK_TOLERANCE.
"""

import numpy as np
import pytest

from helpers import GRADCHECK_TOLERANCE, assert_close, check_gradients, numerical_gradient
from numpylenet import (AvgPool2d, Conv2d, Flatten, LeNet5, Linear, MaxPool2d, ReLU, Sigmoid, Tanh,
                        softmax_cross_entropy)

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
    _, analytic = softmax_cross_entropy(logits, labels)
    numeric = numerical_gradient(lambda: float(softmax_cross_entropy(logits, labels)[0]), logits)
    assert_close("softmax_cross_entropy", {"grad_logits": (analytic, numeric)}, GRADCHECK_TOLERANCE)


@pytest.mark.parametrize("activation, pool", [("tanh", "max"), ("sigmoid", "avg")])
def test_lenet5_gradients_match_finite_differences(activation, pool):
    """End to end through the whole network, on a random sample of 12 entries per parameter.

    Step 1e-4, not 1e-6: early-layer gradients of a sigmoid network are ~1e-4, so the round-off
    of the loss (~1e-16 * 2.3 / h) must stay small next to them; the truncation error
    (h^2 / 6 times the third derivative) stays far below the tolerance (measured: <= 4e-8).
    """
    model = LeNet5(activation=activation, pool=pool, dtype=np.float64, seed=4)
    generator = np.random.default_rng(5)
    images = generator.standard_normal((2, 1, 32, 32))
    labels = np.array([3, 7])

    def loss() -> float:
        return float(softmax_cross_entropy(model.forward(images), labels)[0])

    model.zero_grad()
    _, grad_logits = softmax_cross_entropy(model.forward(images), labels)
    model.backward(grad_logits)
    pairs = {}
    for name, param in model.named_parameters():
        flat = param.data.reshape(-1)  # a view: perturbing it perturbs the model
        assert np.shares_memory(flat, param.data)
        picked = generator.choice(flat.size, size=min(12, flat.size), replace=False)
        numeric = [numerical_gradient(loss, flat[index:index + 1], step=1e-4)[0] for index in picked]
        pairs["grad_" + name] = (param.grad.reshape(-1)[picked], np.array(numeric))
    assert_close(f"LeNet5 {activation}/{pool}", pairs, GRADCHECK_TOLERANCE)
