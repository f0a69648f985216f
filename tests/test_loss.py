"""softmax_cross_entropy against nn.CrossEntropyLoss (mean reduction, with and without label
smoothing) and hand-computed cases."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import assert_ok  # noqa: E402
from numpylenet import softmax_cross_entropy  # noqa: E402
from numpylenet.compare import loss_vs_torch  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def check_loss(logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0) -> None:
    """Loss and grad_logits against torch's mean cross entropy, in the logits' dtype."""
    loss, grad_logits = softmax_cross_entropy(logits.copy(), labels.copy(), label_smoothing=label_smoothing)
    assert np.isfinite(loss) and np.all(np.isfinite(grad_logits))
    assert grad_logits.dtype == logits.dtype and grad_logits.shape == logits.shape
    assert_ok(loss_vs_torch(logits, labels, label_smoothing=label_smoothing))


def random_case(batch, classes, scale=1.0, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((batch, classes))).astype(dtype)
    return logits, rng.integers(0, classes, size=batch).astype(np.int64)


@pytest.mark.parametrize("dtype", [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")])
@pytest.mark.parametrize("batch, classes, scale", [
    pytest.param(16, 10, 1.0, id="batch16"),
    pytest.param(1, 10, 1.0, id="batch1"),
    pytest.param(5, 2, 3.0, id="two_classes"),
    pytest.param(8, 10, 1e4, id="logits_1e4"),
    pytest.param(8, 10, 1e2, id="logits_1e2"),
])
def test_matches_torch(batch, classes, scale, dtype):
    check_loss(*random_case(batch, classes, scale, dtype))


@pytest.mark.parametrize("dtype", [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")])
@pytest.mark.parametrize("label_smoothing", [0.1, 0.25, 1.0])
@pytest.mark.parametrize("batch, classes, scale", [
    pytest.param(16, 10, 1.0, id="batch16"),
    pytest.param(1, 10, 1.0, id="batch1"),
    pytest.param(8, 10, 1e2, id="logits_1e2"),
])
def test_label_smoothing_matches_torch(batch, classes, scale, label_smoothing, dtype):
    check_loss(*random_case(batch, classes, scale, dtype), label_smoothing=label_smoothing)


def test_label_smoothing_hand_computed():
    """Equal logits: p = 1/C = the smoothed target's average, so loss = log C whatever eps, and the
    gradient is (1/C - q) / N with q = (1 - eps) onehot + eps / C."""
    labels, eps, classes = np.array([2, 0]), 0.3, 4
    loss, grad = softmax_cross_entropy(np.zeros((2, classes)), labels, label_smoothing=eps)
    target = (1 - eps) * np.eye(classes)[labels] + eps / classes
    assert abs(loss - np.log(classes)) <= 1e-15
    np.testing.assert_allclose(grad, (1 / classes - target) / 2, rtol=0, atol=1e-16)


@pytest.mark.parametrize("label_smoothing", ["0.1", None, True, np.array([0.1])])
def test_label_smoothing_that_is_not_a_real_number_is_a_type_error(label_smoothing):
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        softmax_cross_entropy(np.zeros((2, 10)), np.array([0, 1]), label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range(label_smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1]), label_smoothing=label_smoothing)


def test_all_logits_huge_and_equal():
    """A shift by 1e4 must cancel exactly: softmax is shift-invariant."""
    logits = np.full((3, 10), 1e4)
    labels = np.array([0, 4, 9])
    check_loss(logits, labels)
    loss, grad = softmax_cross_entropy(logits, labels)
    assert abs(loss - np.log(10)) <= 1e-12


def test_hand_computed_uniform_logits():
    """Equal logits: p = 1/C, so loss = log C and grad = (1/C - onehot) / N."""
    batch, classes = 4, 5
    labels = np.array([0, 1, 4, 1])
    loss, grad = softmax_cross_entropy(np.zeros((batch, classes)), labels)
    expected = (np.full((batch, classes), 1 / classes) - np.eye(classes)[labels]) / batch
    assert abs(loss - np.log(classes)) <= 1e-15
    np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-16)


def test_confident_wrong_answer_costs_the_logit_gap():
    """Logit 1e4 on the wrong class: loss = 1e4 - logit of the right class (log-sum-exp is the max)."""
    logits = np.array([[1e4, 0.0, 0.0]])
    loss, grad = softmax_cross_entropy(logits, np.array([1]))
    assert loss == pytest.approx(1e4, rel=1e-15)
    np.testing.assert_allclose(grad, [[1.0, -1.0, 0.0]], atol=1e-15)
