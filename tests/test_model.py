"""LeNet5 against the torch reference, its state_dict contract, its initialisation and seeding."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import TOLERANCE, assert_close, assert_ok, torch_dtype
from numpylenet import LeNet5, softmax_cross_entropy
from numpylenet.backend import numba_unavailable_reason
from numpylenet.compare import lenet5_vs_torch
from numpylenet.names import ACTIVATION_NAMES, BACKEND_NAMES, POOL_NAMES

PARAMETER_SHAPES = {
    "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
    "conv3.weight": (120, 16, 5, 5), "conv3.bias": (120,),
    "fc1.weight": (84, 120), "fc1.bias": (84,),
    "fc2.weight": (10, 84), "fc2.bias": (10,),
}
COMBINATIONS = [(activation, pool) for activation in ACTIVATION_NAMES for pool in POOL_NAMES]

pytestmark = pytest.mark.usefixtures("single_thread")


def batch(size=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size, 1, 32, 32)).astype(dtype), rng.integers(0, 10, size=size)


def check_lenet5_against_torch(activation, pool, dtype, batch_size=4):
    """Our weights in the reference's torch model; compare logits, loss, grad_input and all ten gradients."""
    pytest.importorskip("torch")
    from reference import TorchLeNet5

    reference = TorchLeNet5(activation, pool).to(torch_dtype(dtype))
    model = LeNet5(activation=activation, pool=pool, dtype=dtype, seed=123)
    images, labels = batch(batch_size, dtype=dtype)
    rows = lenet5_vs_torch(model, reference, images, labels, label=f"LeNet5 {activation}/{pool}")
    assert len(rows) == 13
    assert_ok(rows)


@pytest.mark.parametrize("activation, pool", COMBINATIONS)
def test_matches_torch_float64(activation, pool):
    check_lenet5_against_torch(activation, pool, np.float64)


@pytest.mark.parametrize("activation, pool", [("relu", "avg"), ("tanh", "max")])
def test_matches_torch_float32(activation, pool):
    check_lenet5_against_torch(activation, pool, np.float32)


def test_matches_torch_batch1():
    check_lenet5_against_torch("relu", "max", np.float64, batch_size=1)


def test_generalised_reference_is_the_notebook_network():
    """TorchLeNet5("relu", "avg") must compute exactly what the notebook's LeNet computes."""
    torch = pytest.importorskip("torch")
    from reference import LeNet, TorchLeNet5

    notebook, general = LeNet().double(), TorchLeNet5("relu", "avg").double()
    general.load_state_dict(notebook.state_dict())
    images = torch.from_numpy(batch()[0])
    assert torch.equal(notebook(images), general(images))


def test_copy_helpers_round_trip_and_agree():
    """numpy -> torch -> numpy returns the same weights, and the copied torch model agrees with ours."""
    torch = pytest.importorskip("torch")
    from reference import LeNet, copy_numpy_to_torch, copy_torch_to_numpy

    model = LeNet5(dtype=np.float64, seed=7)
    reference = LeNet().double()
    copy_numpy_to_torch(model, reference)
    images = batch()[0]
    assert_close("copy numpy->torch", {"logits": (model.forward(images),
                                                  reference(torch.from_numpy(images)).detach().numpy())},
                 TOLERANCE[np.dtype(np.float64)])
    back = LeNet5(dtype=np.float64, seed=8)
    copy_torch_to_numpy(reference, back)
    for name, value in model.state_dict().items():
        assert np.array_equal(back.state_dict()[name], value), name


def test_copy_helpers_reject_a_different_network():
    torch = pytest.importorskip("torch")
    from reference import copy_numpy_to_torch

    class Wider(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 8, 5)

    with pytest.raises(ValueError, match="conv1.weight has shape"):
        copy_numpy_to_torch(LeNet5(seed=0), Wider())
    with pytest.raises(ValueError, match="fc2.bias is in the numpy model but not in the torch model"):
        copy_numpy_to_torch(LeNet5(seed=0), Wider())


def test_named_parameters_follow_torch_names_and_order():
    pytest.importorskip("torch")
    from reference import LeNet

    torch_names = [name for name, _ in LeNet().named_parameters()]
    model = LeNet5(seed=0)
    assert [name for name, _ in model.named_parameters()] == torch_names == list(PARAMETER_SHAPES)
    assert list(model.state_dict()) == torch_names
    assert [param for _, param in model.named_parameters()] == list(model.parameters())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_have_the_documented_shapes_and_dtype(dtype):
    model = LeNet5(dtype=dtype, seed=0)
    for name, param in model.named_parameters():
        assert param.data.shape == param.grad.shape == PARAMETER_SHAPES[name], name
        assert param.data.dtype == param.grad.dtype == dtype, name
    logits = model.forward(batch(3, dtype=dtype)[0])
    assert logits.shape == (3, 10) and logits.dtype == dtype


def test_default_dtype_is_float32():
    assert all(param.data.dtype == np.float32 for param in LeNet5(seed=0).parameters())


def test_call_is_forward():
    model = LeNet5(dtype=np.float64, seed=0)
    images = batch()[0]
    assert np.array_equal(model(images), model.forward(images))


def test_zero_grad_and_accumulation():
    model = LeNet5(dtype=np.float64, seed=0)
    images, labels = batch()
    model.zero_grad()
    model.backward(softmax_cross_entropy(model.forward(images), labels)[1])
    once = {name: param.grad.copy() for name, param in model.named_parameters()}
    model.backward(softmax_cross_entropy(model.forward(images), labels)[1])
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.grad, 2 * once[name], rtol=1e-14, atol=0, err_msg=name)
    model.zero_grad()
    assert all(not np.any(param.grad) for param in model.parameters())


def test_state_dict_round_trip():
    source, target = LeNet5(dtype=np.float64, seed=1), LeNet5(dtype=np.float64, seed=2)
    images = batch()[0]
    assert not np.array_equal(source.forward(images), target.forward(images))
    state = source.state_dict()
    assert {name: value.shape for name, value in state.items()} == PARAMETER_SHAPES
    target.load_state_dict(state)
    assert np.array_equal(source.forward(images), target.forward(images))


def test_state_dict_round_trip_through_npz(tmp_path):
    """A checkpoint is plain arrays: np.savez then np.load without pickle restores the model."""
    source, target = LeNet5(seed=1), LeNet5(seed=2)
    np.savez(tmp_path / "weights.npz", **source.state_dict())
    with np.load(tmp_path / "weights.npz", allow_pickle=False) as archive:
        target.load_state_dict(dict(archive))
    for name, value in source.state_dict().items():
        assert np.array_equal(target.state_dict()[name], value), name


@pytest.mark.parametrize("change, named", [
    pytest.param(lambda s: s.pop("fc1.bias"), "fc1.bias", id="missing_key"),
    pytest.param(lambda s: s.update({"fc3.weight": np.zeros((10, 10), np.float32)}), "fc3.weight", id="extra_key"),
    pytest.param(lambda s: s.update({"conv2.weight": np.zeros((16, 6, 3, 3), np.float32)}), "conv2.weight",
                 id="wrong_shape"),
    pytest.param(lambda s: s.update({"fc2.bias": np.zeros((1, 10), np.float32)}), "fc2.bias", id="wrong_rank"),
])
def test_load_state_dict_rejects_mismatches(change, named):
    state = LeNet5(seed=0).state_dict()
    change(state)
    model = LeNet5(seed=5)
    before = {name: value.copy() for name, value in model.state_dict().items()}
    with pytest.raises((ValueError, KeyError), match=named.replace(".", r"\.")):
        model.load_state_dict(state)
    for name, value in model.state_dict().items():
        assert np.array_equal(value, before[name]), f"a rejected load_state_dict changed {name}"


def available(backend):
    if backend == "numba" and numba_unavailable_reason() is not None:
        pytest.skip(numba_unavailable_reason())
    return backend


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_copy_trains_as_the_original_and_apart_from_it(backend):
    """copy.deepcopy and pickle keep every parameter a view of the copy's own buffers: the copy
    takes the same Adam steps as the original, and neither touches the other."""
    import copy
    import pickle

    from numpylenet import Adam

    model = LeNet5(dtype=np.float64, seed=0, backend=available(backend))
    images, labels = batch(size=8)
    model.forward_backward(images, labels)          # a used model: the engine has run
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    start = model.state_dict()
    for twin in [model, *copies]:
        optimizer = Adam(twin.parameters(), lr=1e-2)
        for _ in range(3):
            twin.zero_grad()
            twin.forward_backward(images, labels)
            optimizer.step()
    for twin in copies:
        assert type(twin) is LeNet5
        for (name, param), (_, original) in zip(twin.named_parameters(), model.named_parameters()):
            assert param.data.base is twin.flat_data and param.grad.base is twin.flat_grad, name
            assert np.array_equal(param.data, original.data) and not np.array_equal(param.data, start[name]), name


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_model_copied_with_its_optimizer_trains_as_the_original(backend, kind, how):
    """copy.deepcopy((model, optimizer)), as torch users checkpoint in memory: the optimiser copy
    must step the model copy (it held orphan copies of the parameters, and a step changed nothing).
    Truth: a model never copied, given the same two steps; the original is left alone."""
    import copy
    import pickle

    from numpylenet import SGD, Adam

    def pair():
        model = LeNet5(dtype=np.float64, seed=0, backend=available(backend))
        make = (lambda p: SGD(p, lr=0.1, momentum=0.9)) if kind == "sgd" else (lambda p: Adam(p, lr=1e-2))
        return model, make(model.parameters())

    def step(model, optimizer):
        optimizer.zero_grad()
        model.forward_backward(images, labels)
        optimizer.step()

    images, labels = batch(size=8)
    model, optimizer = pair()
    step(model, optimizer)                      # an optimiser with state to carry over
    twin, twin_optimizer = (copy.deepcopy((model, optimizer)) if how == "deepcopy"
                            else pickle.loads(pickle.dumps((model, optimizer))))
    assert all(p is q for p, q in zip(twin_optimizer.params, twin.parameters()))
    after_one = model.flat_data.copy()
    step(twin, twin_optimizer)
    never_copied = pair()
    step(*never_copied)
    step(*never_copied)
    np.testing.assert_array_equal(twin.flat_data, never_copied[0].flat_data)
    np.testing.assert_array_equal(model.flat_data, after_one)


def test_a_copy_of_a_subclass_is_of_that_subclass():
    import copy

    class Wider(LeNet5):
        pass

    assert type(copy.deepcopy(Wider(seed=0, backend="numpy"))) is Wider


@pytest.mark.skipif(numba_unavailable_reason() is not None, reason="numba backend unavailable")
def test_a_numba_model_pickled_after_use_runs_in_another_process(tmp_path):
    """The engine holds the addresses of code compiled in this process: a pickle must not carry them."""
    import pickle

    model = LeNet5(seed=0, backend="numba")
    images, _ = batch(size=5, dtype=np.float32)
    expected = model.forward(images)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    np.save(tmp_path / "images.npy", images)
    script = ("import pickle, sys, numpy as np\n"
              "folder = sys.argv[1]\n"
              "model = pickle.load(open(folder + '/model.pkl', 'rb'))\n"
              "np.save(folder + '/logits.npy', model.forward(np.load(folder + '/images.npy')))\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "logits.npy"), expected)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_assigning_a_parameter_s_data_or_grad_reaches_the_model(backend):
    """``p.data = values`` and ``p.grad = values`` act on both backends alike: the new weights
    are used, a zeroed gradient makes a step change nothing; a wrong shape is refused."""
    from numpylenet import SGD

    model = LeNet5(dtype=np.float64, seed=0, backend=available(backend))
    twin = LeNet5(dtype=np.float64, seed=0, backend="numpy")
    images, labels = batch(size=4)
    model.fc2.bias.data = np.full(10, 5.0)
    twin.load_state_dict({**twin.state_dict(), "fc2.bias": np.full(10, 5.0)})
    assert np.array_equal(model.forward(images), twin.forward(images))
    optimizer = SGD(model.parameters(), lr=0.1)
    model.forward_backward(images, labels)
    before = model.state_dict()
    for param in model.parameters():
        param.grad = np.zeros_like(param.grad)
    optimizer.step()
    for name, value in model.state_dict().items():
        assert np.array_equal(value, before[name]), name
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        model.fc2.bias.data = np.zeros(11)
    with pytest.raises(ValueError, match="grad"):
        model.fc2.bias.grad = None


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_rejected_training_batch_leaves_the_last_forward_pass_in_place(backend):
    """forward_backward with a bad label raises before any pass runs: backward then still
    follows the forward pass before it, exactly as in a model that never saw the bad batch."""
    if backend == "numba" and numba_unavailable_reason() is not None:
        pytest.skip(numba_unavailable_reason())
    images, _ = batch(size=7)
    grad_logits = np.random.default_rng(1).standard_normal((7, 10))
    model, twin = LeNet5(dtype=np.float64, seed=0, backend=backend), LeNet5(dtype=np.float64, seed=0, backend=backend)
    model.forward(images)
    twin.forward(images)
    with pytest.raises(ValueError, match="label"):
        model.forward_backward(images[:3], np.array([0, 1, 10]))
    assert np.array_equal(model.backward(grad_logits), twin.backward(grad_logits))
    for (name, param), (_, twin_param) in zip(model.named_parameters(), twin.named_parameters()):
        assert np.array_equal(param.grad, twin_param.grad), name


@pytest.mark.parametrize("value", [
    pytest.param(np.full((10,), np.nan, np.float32), id="nan"),
    pytest.param(np.full((10,), np.inf, np.float64), id="inf"),
    pytest.param(np.zeros((10,), np.float16), id="float16"),
    pytest.param(np.zeros((10,), np.uint64), id="uint64"),
    pytest.param(np.zeros((10,), np.complex64), id="complex"),
    pytest.param(np.full((10,), 1e300), id="inf_in_float32"),
])
def test_load_state_dict_rejects_non_finite_or_non_float_weights(value):
    """A NaN weight would give chance-level "accuracy" beside a NaN loss, and float16, integer or
    complex weights would be converted silently: refuse them, naming the parameter, changing nothing.
    (1e300 is a finite float64, but inf in this float32 model.)"""
    state = LeNet5(seed=0).state_dict()
    state["fc2.bias"] = value
    model = LeNet5(seed=5)
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"fc2\.bias"):
        model.load_state_dict(state)
    for name, kept in model.state_dict().items():
        assert np.array_equal(kept, before[name]), name


def fan_in(name):
    shape = PARAMETER_SHAPES[name.replace(".bias", ".weight")]
    return int(np.prod(shape[1:]))


def kolmogorov_smirnov_uniform(samples):
    """The KS distance between the samples and U(0, 1)."""
    ordered = np.sort(samples)
    n = ordered.size
    return max(np.max(np.arange(1, n + 1) / n - ordered), np.max(ordered - np.arange(n) / n))


def test_initialisation_is_torch_default_uniform():
    """Every entry ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Conv2d / nn.Linear initialise.

    Bounds are checked exactly. Uniformity is checked with the Kolmogorov-Smirnov distance on
    every tensor of >= 100 entries; 1.95 / sqrt(n) is the 0.1% critical value, and the seed is
    fixed, so the check is deterministic and a correct init passes with a wide margin while a
    wrong bound (e.g. 1/fan_in, or Kaiming's sqrt(6/fan_in)) or a normal distribution fails.
    """
    model = LeNet5(dtype=np.float64, seed=0)
    for name, param in model.named_parameters():
        bound = 1 / np.sqrt(fan_in(name))
        assert np.all(np.abs(param.data) <= bound), f"{name} leaves +-1/sqrt({fan_in(name)})"
        if param.data.size >= 100:
            distance = kolmogorov_smirnov_uniform((param.data.ravel() / bound + 1) / 2)
            assert distance <= 1.95 / np.sqrt(param.data.size), f"{name} is not uniform: KS distance {distance:.3g}"


def test_seed_reproducibility():
    first, again, other = LeNet5(seed=3), LeNet5(seed=3), LeNet5(seed=4)
    for name, value in first.state_dict().items():
        assert np.array_equal(value, again.state_dict()[name]), name
        assert not np.array_equal(value, other.state_dict()[name]), name


def test_core_imports_without_torch():
    """numpylenet must run where torch is not installed: block the import and train one step."""
    program = ("import sys; sys.modules['torch'] = None\n"
               "import numpy as np, numpylenet\n"
               "model = numpylenet.LeNet5(seed=0)\n"
               "loss, grad = numpylenet.softmax_cross_entropy(model(np.zeros((2, 1, 32, 32), np.float32)), "
               "np.array([1, 2]))\n"
               "model.backward(grad); numpylenet.SGD(model.parameters(), lr=0.1).step()\n"
               "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", program], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# Both backends: the same inputs accepted, the same rejected, the same way
# --------------------------------------------------------------------------------------------

def backends():
    """Every backend, numba skipped (with the reason) where it cannot run."""
    reason = numba_unavailable_reason()
    return [pytest.param(name, marks=pytest.mark.skipif(name == "numba" and reason is not None,
                                                        reason=f"numba backend unavailable: {reason}"))
            for name in BACKEND_NAMES]


@pytest.mark.parametrize("backend", backends())
def test_backward_does_not_depend_on_the_caller_keeping_x(backend):
    """model(x); x[:] = 0; model.backward(g) gives the gradients of the x that went forward."""
    images, labels = batch(5)
    untouched, model = (LeNet5(dtype=np.float64, seed=1, backend=backend) for _ in range(2))
    grad_logits = softmax_cross_entropy(untouched.forward(images), labels)[1]
    expected_input_grad = untouched.backward(grad_logits)
    x = images.copy()
    model.forward(x)
    x[:] = 0
    pairs = {"grad_input": (model.backward(grad_logits), expected_input_grad)}
    pairs.update({"grad_" + name: (param.grad, twin.grad) for (name, param), twin
                  in zip(model.named_parameters(), untouched.parameters())})
    assert_close(f"x overwritten after forward ({backend})", pairs, 0.0)


@pytest.mark.parametrize("backend", backends())
def test_returned_logits_and_input_gradients_are_the_caller_s(backend):
    """What forward and backward return stays as returned: a later call of the same batch size
    does not overwrite it (the numba engine keeps its results in buffers it reuses)."""
    model = LeNet5(dtype=np.float64, seed=0, backend=backend)
    (first_images, labels), (second_images, _) = batch(4, seed=1), batch(4, seed=2)
    grad_logits = softmax_cross_entropy(model.forward(first_images), labels)[1]
    logits = model.forward(first_images)
    grad_input = model.backward(grad_logits)
    kept_logits, kept_grad_input = logits.copy(), grad_input.copy()
    model.forward(second_images)
    model.backward(2 * grad_logits)
    assert np.array_equal(logits, kept_logits) and np.array_equal(grad_input, kept_grad_input)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_gives_empty_results(backend, dtype):
    """As torch: no images in, logits (0, 10) and dL/dx (0, 1, 32, 32) out, no gradient added."""
    model = LeNet5(dtype=dtype, seed=0, backend=backend)
    logits = model.forward(np.zeros((0, 1, 32, 32), np.float64))
    assert logits.shape == (0, 10) and logits.dtype == dtype
    grad_input = model.backward(np.zeros((0, 10), dtype))
    assert grad_input.shape == (0, 1, 32, 32) and grad_input.dtype == dtype
    assert not np.any(model.flat_grad)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("grad, message", [
    pytest.param(np.zeros((2, 10)), r"got float64 array of shape \(2, 10\)", id="batch_size"),
    pytest.param(np.zeros((3, 9)), r"got float64 array of shape \(3, 9\)", id="classes"),
    pytest.param(np.zeros(30), r"got float64 array of shape \(30,\)", id="rank1"),
    pytest.param(np.zeros((3, 10), np.int64), r"got int64 array of shape \(3, 10\)", id="integers"),
    pytest.param([["a"] * 10] * 3, r"got <U1 array of shape \(3, 10\)", id="strings"),
])
def test_backward_rejects_a_bad_gradient_alike_on_both_backends(backend, grad, message):
    model = LeNet5(seed=0, backend=backend)
    model.forward(batch(3, dtype=np.float32)[0])
    expected = r"^LeNet5.backward expected floating-point grad_logits of shape \(3, 10\), "
    with pytest.raises(ValueError, match=expected + message):
        model.backward(grad)
    assert not np.any(model.flat_grad)


@pytest.mark.parametrize("backend", backends())
def test_backward_before_forward_is_refused_alike_on_both_backends(backend):
    with pytest.raises(RuntimeError, match="^LeNet5.backward called before forward$"):
        LeNet5(seed=0, backend=backend).backward(np.zeros((2, 10), np.float32))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", list(PARAMETER_SHAPES))
def test_a_nan_weight_gives_a_nan_loss(backend, name):
    """Diverged weights always show in the loss, which is what stops a run (the numba kernels,
    compiled with fastmath, follow no NaN rule of their own; this is what they must still do)."""
    model = LeNet5(activation="relu", pool="max", seed=0, backend=backend)
    dict(model.named_parameters())[name].data.reshape(-1)[0] = np.nan
    images, labels = batch(8, dtype=np.float32)
    assert np.isnan(softmax_cross_entropy(model.forward(images), labels)[0])
