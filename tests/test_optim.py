"""Adam and SGD against torch.optim: whole training trajectories, rejections, state round trips."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import assert_close  # noqa: E402
from numpylenet import SGD, Adam, LeNet5, softmax_cross_entropy  # noqa: E402
from numpylenet.backend import numba_unavailable_reason  # noqa: E402
from numpylenet.names import BACKEND_NAMES  # noqa: E402
from reference import TorchLeNet5, copy_torch_to_numpy  # noqa: E402

TRAJECTORY_TOLERANCE = 1e-8
OPTIMIZERS = {"adam": (Adam, torch.optim.Adam), "sgd": (SGD, torch.optim.SGD)}

pytestmark = pytest.mark.usefixtures("single_thread")


def batches(steps, size=8, seed=0):
    """The same random (images, labels) batches for both sides."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size, 1, 32, 32)), rng.integers(0, 10, size=size)) for _ in range(steps)]


def numpy_step(model, optimizer, images, labels):
    optimizer.zero_grad()
    loss, grad_logits = softmax_cross_entropy(model.forward(images), labels)
    model.backward(grad_logits)
    optimizer.step()
    return float(loss)


def torch_step(model, optimizer, images, labels):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
    loss.backward()
    optimizer.step()
    return loss.item()


def check_trajectory(kind, steps, activation="tanh", pool="max", lr_schedule=None, **hyper):
    """Train both from the same weights on the same batches; compare every loss and the end weights.

    ``lr_schedule(step) -> lr`` (optional) sets ``.lr`` on ours and ``param_groups[0]["lr"]`` on
    torch's before each step, checking that a mutable learning rate behaves the same.
    """
    ours_class, torch_class = OPTIMIZERS[kind]
    torch.manual_seed(0)
    reference = TorchLeNet5(activation, pool).double()
    model = LeNet5(activation=activation, pool=pool, dtype=np.float64, seed=0)
    copy_torch_to_numpy(reference, model)
    optimizer = ours_class(model.parameters(), **hyper)
    torch_optimizer = torch_class(reference.parameters(), **hyper)

    losses, torch_losses = [], []
    for step, (images, labels) in enumerate(batches(steps)):
        if lr_schedule is not None:
            optimizer.lr = torch_optimizer.param_groups[0]["lr"] = lr_schedule(step)
        losses.append(numpy_step(model, optimizer, images, labels))
        torch_losses.append(torch_step(reference, torch_optimizer, images, labels))
    # Each step's loss is checked on its own, so the report says where a trajectory first drifts.
    pairs = {f"loss[{step}]": (ours, theirs) for step, (ours, theirs) in enumerate(zip(losses, torch_losses))}
    torch_params = dict(reference.named_parameters())
    pairs.update({name: (param.data, torch_params[name].detach().numpy())
                  for name, param in model.named_parameters()})
    # The losses must actually move, or agreeing trajectories would prove nothing about the updates.
    assert abs(losses[-1] - losses[0]) > 1e-3, "the trajectory barely moved"
    assert_close(f"{kind} {hyper}", pairs, TRAJECTORY_TOLERANCE)


# The tests use tanh/max by default: smooth activations make a trajectory sensitive to every
# update, and max pooling exercises the routing of gradients. One case runs the seed's relu/avg.
@pytest.mark.parametrize("kind, steps, hyper", [
    pytest.param("adam", 100, {}, id="adam_defaults"),
    pytest.param("adam", 100, {"lr": 3e-3, "weight_decay": 1e-2}, id="adam_weight_decay"),
    pytest.param("adam", 100, {"lr": 2e-3, "betas": (0.8, 0.99), "eps": 1e-6}, id="adam_betas_eps"),
    pytest.param("sgd", 50, {"lr": 0.05}, id="sgd_plain"),
    pytest.param("sgd", 50, {"lr": 0.02, "momentum": 0.9}, id="sgd_momentum"),
    pytest.param("sgd", 50, {"lr": 0.02, "momentum": 0.9, "nesterov": True}, id="sgd_nesterov"),
    pytest.param("sgd", 50, {"lr": 0.02, "momentum": 0.9, "dampening": 0.5}, id="sgd_dampening"),
    pytest.param("sgd", 50, {"lr": 0.02, "momentum": 0.8, "weight_decay": 1e-2}, id="sgd_weight_decay"),
    pytest.param("sgd", 50, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
                 id="sgd_nesterov_weight_decay"),     # the default recipe's optimiser
])
def test_trajectory_matches_torch(kind, steps, hyper):
    check_trajectory(kind, steps, **hyper)


def test_trajectory_seed_network_relu_avg():
    check_trajectory("adam", 100, activation="relu", pool="avg")


def test_trajectory_with_changing_learning_rate():
    check_trajectory("sgd", 50, lr=0.05, momentum=0.9, lr_schedule=lambda step: 0.05 * 0.5 ** (step // 10))


@pytest.mark.parametrize("kind, hyper", [
    pytest.param("sgd", {"lr": -0.1}, id="sgd_negative_lr"),
    pytest.param("sgd", {"lr": 0.1, "momentum": -0.5}, id="sgd_negative_momentum"),
    pytest.param("sgd", {"lr": 0.1, "weight_decay": -1e-4}, id="sgd_negative_weight_decay"),
    pytest.param("sgd", {"lr": 0.1, "nesterov": True}, id="sgd_nesterov_without_momentum"),
    pytest.param("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True},
                 id="sgd_nesterov_with_dampening"),
    pytest.param("adam", {"lr": -1e-3}, id="adam_negative_lr"),
    pytest.param("adam", {"eps": -1e-8}, id="adam_negative_eps"),
    pytest.param("adam", {"betas": (1.0, 0.999)}, id="adam_beta1_one"),
    pytest.param("adam", {"betas": (0.9, 1.0)}, id="adam_beta2_one"),
    pytest.param("adam", {"betas": (-0.1, 0.999)}, id="adam_beta1_negative"),
    pytest.param("adam", {"betas": (0.9, -0.5)}, id="adam_beta2_negative"),
    pytest.param("adam", {"weight_decay": -1e-2}, id="adam_negative_weight_decay"),
    pytest.param("adam", {"lr": float("nan")}, id="adam_nan_lr"),
])
def test_rejects_what_torch_rejects(kind, hyper):
    ours_class, torch_class = OPTIMIZERS[kind]
    with pytest.raises(ValueError):
        torch_class([torch.nn.Parameter(torch.zeros(2))], **hyper)
    with pytest.raises(ValueError):
        ours_class(LeNet5(seed=0).parameters(), **hyper)


@pytest.mark.parametrize("kind, hyper", [
    pytest.param("sgd", {"lr": "0.1"}, id="sgd_lr_string"),
    pytest.param("sgd", {"lr": None}, id="sgd_lr_none"),
    pytest.param("adam", {"lr": np.array([1e-3])}, id="adam_lr_array"),     # numba: TypeError at step()
    pytest.param("sgd", {"lr": 0.1, "momentum": [0.9]}, id="sgd_momentum_list"),
    pytest.param("sgd", {"lr": 0.1, "nesterov": "yes", "momentum": 0.9}, id="sgd_nesterov_string"),
    pytest.param("adam", {"betas": ("0.9", 0.999)}, id="adam_beta_string"),
    pytest.param("adam", {"eps": True}, id="adam_eps_bool"),
])
def test_a_hyperparameter_that_is_not_one_real_number_is_a_type_error(kind, hyper):
    """The backends took such values each their own way: one trained, the other raised at step()."""
    with pytest.raises(TypeError, match="must be"):
        OPTIMIZERS[kind][0](LeNet5(seed=0).parameters(), **hyper)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_the_same_parameter_twice_is_refused(kind):
    """It was stepped twice per step (torch warns that this will become an error)."""
    params = LeNet5(seed=0).parameters()
    with pytest.raises(ValueError, match="more than once"):
        OPTIMIZERS[kind][0](params + params[:1], lr=0.1)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_zero_dimensional_array_or_tensor_is_a_learning_rate(backend):
    """What torch accepts as one number (a 0-d tensor), and a NumPy scalar, train as that number."""
    results = []
    for lr in (0.05, np.float32(0.05), np.array(0.05), torch.tensor(0.05)):
        model = LeNet5(seed=0, dtype=np.float64, backend=backend)
        optimizer = SGD(model.parameters(), lr=lr, momentum=0.9)
        model.forward_backward(np.ones((2, 1, 32, 32)), np.array([1, 2]))
        optimizer.step()
        results.append(model.flat_data.copy())
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-6)


@pytest.mark.parametrize("kind, hyper", [
    pytest.param("sgd", {"lr": 0.0}, id="sgd_zero_lr"),
    pytest.param("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, id="sgd_nesterov"),
    pytest.param("sgd", {"lr": 0.1, "dampening": 0.5}, id="sgd_dampening_without_momentum"),
    pytest.param("adam", {"lr": 0.0, "betas": (0.0, 0.0), "eps": 0.0}, id="adam_edges"),
])
def test_accepts_what_torch_accepts(kind, hyper):
    ours_class, torch_class = OPTIMIZERS[kind]
    torch_class([torch.nn.Parameter(torch.zeros(2))], **hyper)
    ours_class(LeNet5(seed=0).parameters(), **hyper)


@pytest.mark.parametrize("kind, hyper", [
    pytest.param("adam", {"lr": 1e-3, "weight_decay": 1e-3}, id="adam"),
    pytest.param("sgd", {"lr": 0.02, "momentum": 0.9, "nesterov": True}, id="sgd_nesterov"),
])
def test_state_dict_round_trip_continues_identically(kind, hyper):
    """Save model and optimiser mid-training through np.savez (no pickle); the restored copy
    must then take exactly the same steps as the original."""
    ours_class, _ = OPTIMIZERS[kind]
    data = batches(10)
    model = LeNet5(activation="tanh", pool="max", dtype=np.float64, seed=0)
    optimizer = ours_class(model.parameters(), **hyper)
    for images, labels in data[:5]:
        numpy_step(model, optimizer, images, labels)

    checkpoint = io.BytesIO()
    np.savez(checkpoint, **{"model/" + k: v for k, v in model.state_dict().items()},
             **{"optim/" + k: v for k, v in optimizer.state_dict().items()})
    checkpoint.seek(0)
    with np.load(checkpoint, allow_pickle=False) as archive:
        saved = dict(archive)
    restored = LeNet5(activation="tanh", pool="max", dtype=np.float64, seed=99)
    restored.load_state_dict({k[len("model/"):]: v for k, v in saved.items() if k.startswith("model/")})
    restored_optimizer = ours_class(restored.parameters(), **hyper)
    restored_optimizer.load_state_dict({k[len("optim/"):]: v for k, v in saved.items() if k.startswith("optim/")})

    for images, labels in data[5:]:
        assert numpy_step(model, optimizer, images, labels) == numpy_step(restored, restored_optimizer, images,
                                                                          labels)
    for (name, param), (_, twin) in zip(model.named_parameters(), restored.named_parameters()):
        assert np.array_equal(param.data, twin.data), name


@pytest.mark.parametrize("kind, hyper", [("adam", {"lr": 1e-3}), ("sgd", {"lr": 0.1, "momentum": 0.9})])
@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    numba_unavailable_reason() is not None, reason="numba backend unavailable"))])
def test_state_dict_is_a_snapshot_that_later_steps_leave_alone(kind, hyper, backend):
    """state_dict() then more steps: the dict still holds the state it was taken at, so loading
    it rewinds the optimiser (the fused numba path updates its buffers in place)."""
    model = LeNet5(dtype=np.float64, seed=0, backend=backend)
    optimizer = OPTIMIZERS[kind][0](model.parameters(), **hyper)
    (first, first_labels), (second, second_labels) = batches(2)
    numpy_step(model, optimizer, first, first_labels)
    state = optimizer.state_dict()
    kept = {name: np.array(value, copy=True) for name, value in state.items()}
    numpy_step(model, optimizer, second, second_labels)
    assert state.keys() == kept.keys()
    for name, value in state.items():
        assert np.array_equal(value, kept[name]), f"{name} changed after the snapshot"


@pytest.mark.parametrize("kind, hyper, buffers", [("sgd", {"lr": 0.05, "momentum": 0.9}, ("momentum_buffer",)),
                                                   ("adam", {"lr": 1e-3}, ("exp_avg", "exp_avg_sq"))])
@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    numba_unavailable_reason() is not None, reason="numba backend unavailable"))])
def test_a_model_s_parameters_in_another_order_step_and_save_as_torch_s(kind, hyper, buffers, backend):
    """All of a model's parameters, but reversed: each still gets its own update and its own state
    entry, as in torch.optim (the fused loop of a numba model assumes the model's order)."""
    ours_class, torch_class = OPTIMIZERS[kind]
    torch.manual_seed(0)
    reference = TorchLeNet5("relu", "avg").double()
    model = LeNet5(dtype=np.float64, seed=0, backend=backend)
    copy_torch_to_numpy(reference, model)
    ours, theirs = model.parameters()[::-1], list(reference.parameters())[::-1]
    optimizer, torch_optimizer = ours_class(ours, **hyper), torch_class(theirs, **hyper)
    for images, labels in batches(3):
        numpy_step(model, optimizer, images, labels)
        torch_step(reference, torch_optimizer, images, labels)
    state = optimizer.state_dict()
    pairs = {f"param {index}": (p.data, q.detach().numpy()) for index, (p, q) in enumerate(zip(ours, theirs))}
    pairs.update({f"{name}.{index}": (state[f"{name}.{index}"], torch_optimizer.state[q][name].numpy())
                  for index, q in enumerate(theirs) for name in buffers})
    assert_close(f"{kind}, parameters reversed ({backend})", pairs, TRAJECTORY_TOLERANCE)


def test_optimizer_load_state_dict_rejects_foreign_state():
    model = LeNet5(dtype=np.float64, seed=0)
    optimizer = Adam(model.parameters())
    numpy_step(model, optimizer, *batches(1)[0])
    state = optimizer.state_dict()
    buffer_key = next(key for key, value in state.items() if np.ndim(value) > 0)
    with pytest.raises(ValueError, match=buffer_key):
        Adam(model.parameters()).load_state_dict({**state, buffer_key: np.zeros(3)})
    with pytest.raises(ValueError, match="bogus"):
        Adam(model.parameters()).load_state_dict({**state, "bogus": np.zeros(1)})


@pytest.mark.parametrize("change, message", [
    pytest.param(lambda s: s.update(step=np.array([1, 2])), "step", id="step_shape_2"),
    pytest.param(lambda s: s.update(step=np.array(1.5)), "step", id="step_float"),
    pytest.param(lambda s: s.update(step=np.array(-1)), "step", id="step_negative"),
    pytest.param(lambda s: s.update({"exp_avg.0": np.full_like(s["exp_avg.0"], np.nan)}), "exp_avg.0", id="nan_buffer"),
    pytest.param(lambda s: s.update({"exp_avg.0": s["exp_avg.0"].astype(np.complex128)}), "exp_avg.0",
                 id="complex_buffer"),
    pytest.param(lambda s: s.pop("exp_avg_sq.3"), "has exp_avg.3 but not exp_avg_sq.3", id="half_a_pair"),
    pytest.param(lambda s: s["exp_avg_sq.2"].__setitem__(0, -1.0), "exp_avg_sq.2' holds negative", id="negative_square"),
])
def test_optimizer_load_state_dict_rejects_bad_values(change, message):
    """A documented ValueError (never a TypeError) naming the entry, and the old state kept."""
    model = LeNet5(dtype=np.float64, seed=0)
    optimizer = Adam(model.parameters())
    numpy_step(model, optimizer, *batches(1)[0])
    state = optimizer.state_dict()
    change(state)
    target = Adam(model.parameters())
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert target.step_count == 0 and all(buffer is None for buffer in target.exp_avg)


def test_optimizer_load_state_dict_rejects_values_that_overflow_the_parameter_dtype():
    """1e300 is a finite float64 but inf in a float32 model: refused, not loaded as inf."""
    model = LeNet5(seed=0)                                   # float32
    state = {"step": np.array(1), "exp_avg.9": np.zeros(10), "exp_avg_sq.9": np.full(10, 1e300)}
    optimizer = Adam(model.parameters())
    with pytest.raises(ValueError, match=r"exp_avg_sq\.9 holds values too large for float32"):
        optimizer.load_state_dict(state)
    assert optimizer.step_count == 0 and all(buffer is None for buffer in optimizer.exp_avg_sq)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    numba_unavailable_reason() is not None, reason="numba backend unavailable"))])
def test_sgd_after_a_partial_state_starts_each_missing_buffer_at_the_gradient(backend):
    """A state holding conv1.weight's momentum buffer only: torch's SGD steps that parameter
    with b = momentum b + (1 - dampening) g and starts every other one at b = g. So must ours,
    in the NumPy loop and in the fused loop of a numba model."""
    hyper = {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}
    torch.manual_seed(0)
    reference = TorchLeNet5("relu", "avg").double()
    model = LeNet5(dtype=np.float64, seed=0, backend=backend)
    copy_torch_to_numpy(reference, model)
    buffer = np.random.default_rng(1).standard_normal(model.parameters()[0].data.shape)
    optimizer, torch_optimizer = SGD(model.parameters(), **hyper), torch.optim.SGD(reference.parameters(), **hyper)
    optimizer.load_state_dict({"step": np.array(3), "momentum_buffer.0": buffer})
    torch_optimizer.state[next(reference.parameters())]["momentum_buffer"] = torch.from_numpy(buffer.copy())
    losses = [(numpy_step(model, optimizer, images, labels), torch_step(reference, torch_optimizer, images, labels))
              for images, labels in batches(2)]
    assert_close(f"SGD after a partial state ({backend})",
                 {"losses": tuple(np.array(side) for side in zip(*losses)),
                  **{name: (param.data, torch_param.detach().numpy()) for (name, param), torch_param
                     in zip(model.named_parameters(), reference.parameters())}}, TRAJECTORY_TOLERANCE)
