"""Comparing our tensors with an independent truth: torch, or central finite differences.

This is the one comparison helper behind both ``python -m numpylenet.check`` and the test suite
(``tests/helpers.py`` imports it), so the tool a learner runs and the tests CI runs cannot drift.

Relative error, everywhere, means the largest absolute difference scaled by the largest magnitude
of the reference tensor::

    relative_error(ours, ref) = max |ours - ref| / max(max |ref|, tiny)

Scaling by the tensor's largest entry (rather than entry by entry) keeps entries that are
legitimately near zero, such as gradients summed over many cancelling terms, from producing
meaningless huge ratios, while still flagging any error that matters at the tensor's own scale.

Every comparison returns one :class:`Comparison` per named tensor, printed llm.c style::

    Conv2d(3, 4, 3) grad_weight        torch float64  (4, 3, 3, 3)     4.4e-16   1.1e-16     1e-09  OK

torch is imported only inside the functions that need it: the finite-difference half works
without it. The torch models here are built from ``torch.nn`` directly, never from ``reference/``
(which imports numpylenet, not the other way round).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .layers import Parameter
from .loss import softmax_cross_entropy
from .optim import SGD, Adam

__all__ = [
    "TOLERANCE", "GRADCHECK_TOLERANCE", "relative_error", "Comparison", "HEADER", "compare",
    "assert_close", "assert_ok", "torch_dtype", "layer_parameters", "copy_parameters_to_torch",
    "layer_vs_torch", "numerical_gradient", "layer_vs_finite_differences", "loss_vs_torch",
    "loss_vs_finite_differences", "torch_lenet5", "lenet5_vs_torch", "lenet5_vs_finite_differences",
    "optimizer_vs_torch", "optimizer_vs_formula",
]

# float64 carries ~16 significant digits; the layers do short sums (<= a few thousand terms), so
# any honest implementation lands near 1e-15 and 1e-9 leaves room only for summation order.
# float32 has unit round-off u = 6e-8. A sum of K terms computed in a different order than
# torch's (im2col GEMM versus torch's own kernels) differs by about sqrt(K) * u * max|term| in
# practice and K * u in the worst case; with K <= 2400 here (the bias gradient of conv1 on a
# batch of two 28x28 maps) that is 3e-6 typical. 2e-5 relative to max|ref| keeps a 5x margin
# over that while still failing any real bug, which shows up as an O(1) relative error.
TOLERANCE = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-5}

# Central differences in float64 with h = 1e-6: truncation error h^2 |f'''| / 6 ~ 1e-13 and
# round-off ~ 1e-16 |f| / h ~ 1e-10 relative to the gradient's scale, so 1e-6 is safe and still
# catches any wrong formula (O(1) error) or wrong index (an O(1) error in some entry).
GRADCHECK_TOLERANCE = 1e-6

TINY = np.finfo(np.float64).tiny
FLOAT64 = np.dtype(np.float64)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max(max |reference|, tiny); inf if the shapes differ."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        return math.inf
    if ours.size == 0:
        return 0.0
    return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), TINY))


# --------------------------------------------------------------------------------------------
# One row of the report
# --------------------------------------------------------------------------------------------

WHAT_WIDTH, AGAINST_WIDTH, SHAPE_WIDTH = 58, 14, 15
HEADER = (f"{'what':<{WHAT_WIDTH}} {'against':<{AGAINST_WIDTH}} {'shape':<{SHAPE_WIDTH}} "
          f"{'max abs':>9} {'max rel':>9} {'tolerance':>10}")


@dataclass(frozen=True)
class Comparison:
    """One named tensor of ours against its reference.

    Attributes
    ----------
    what : the tensor, named with what produced it ("Conv2d(3, 4, 3) grad_weight").
    against : the reference ("torch float64", "finite diff."), or "" when ``what`` says it.
    shape : our tensor's shape, or "ours vs reference" when they differ.
    max_abs, max_rel : max |ours - ref| and :func:`relative_error` (inf if the shapes differ).
    tolerance : the largest ``max_rel`` that passes.
    note : why the row failed when no number says it (an exception the check raised).
    """

    what: str
    against: str
    shape: str
    max_abs: float
    max_rel: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance      # False for NaN and for inf

    def line(self) -> str:
        verdict = "OK" if self.ok else "NOT OK"
        note = f"  {self.note}" if self.note else ""
        return (f"{self.what:<{WHAT_WIDTH}} {self.against:<{AGAINST_WIDTH}} {self.shape:<{SHAPE_WIDTH}} "
                f"{self.max_abs:9.1e} {self.max_rel:9.1e} {self.tolerance:10.0e}  {verdict}{note}")


def compare(label: str, pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], tolerance: float,
            against: str = "") -> list[Comparison]:
    """One :class:`Comparison` per named ``(ours, reference)`` pair, ``what`` = label + name."""
    rows = []
    for name, (ours, reference) in pairs.items():
        ours, reference = np.asarray(ours), np.asarray(reference)
        if ours.shape == reference.shape:
            absolute = float(np.max(np.abs(ours.astype(np.float64) - reference))) if ours.size else 0.0
            shape = str(ours.shape)
        else:
            absolute, shape = math.inf, f"{ours.shape} vs {reference.shape}"
        rows.append(Comparison(f"{label} {name}".strip(), against, shape, absolute,
                               relative_error(ours, reference), tolerance))
    return rows


def assert_ok(rows: list[Comparison]) -> None:
    """Print every row; raise AssertionError listing the rows over their tolerance."""
    for row in rows:
        print(row.line())
    failures = [row.line() for row in rows if not row.ok]
    if failures:
        raise AssertionError("tolerance exceeded:\n" + "\n".join(failures))


def assert_close(label: str, pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], tolerance: float) -> None:
    """Print one error line per named (ours, reference) pair and fail if any exceeds tolerance."""
    assert_ok(compare(label, pairs, tolerance))


def _require(condition: bool, message: str) -> None:
    """A structural check of a comparison (names, dtypes): AssertionError, as a failed comparison."""
    if not condition:
        raise AssertionError(message)


# --------------------------------------------------------------------------------------------
# Against torch
# --------------------------------------------------------------------------------------------

def torch_dtype(dtype):
    """The torch dtype of a NumPy float dtype."""
    import torch

    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


def layer_parameters(layer) -> dict[str, Parameter]:
    """The layer's parameters by name ("weight", "bias"), which are also torch's names."""
    named = dict(layer.named_parameters())
    _require(all(isinstance(value, Parameter) for value in named.values()),
             f"{type(layer).__name__}.named_parameters must yield numpylenet Parameters")
    return named


def copy_parameters_to_torch(params: Mapping[str, Parameter], module) -> dict:
    """Copy our parameters into the torch module's parameters of the same names; return those.

    The names, shapes and dtype must match exactly (AssertionError otherwise), so a check can never
    compare against a torch model with different weights.
    """
    import torch

    torch_params = dict(module.named_parameters())
    _require(sorted(params) == sorted(torch_params),
             f"parameters {sorted(params)} vs torch {sorted(torch_params)}")
    with torch.no_grad():
        for name, param in params.items():
            _require(param.data.dtype == param.grad.dtype, f"{name}: data {param.data.dtype}, grad {param.grad.dtype}")
            _require(param.data.shape == tuple(torch_params[name].shape),
                     f"{name} has shape {param.data.shape}, torch's {tuple(torch_params[name].shape)}")
            torch_params[name].copy_(torch.from_numpy(np.ascontiguousarray(param.data)))
    return torch_params


def layer_vs_torch(make_ours: Callable, make_torch: Callable, input_shape: tuple[int, ...],
                   dtype=np.float64, *, passes: int = 1, scale: float = 1.0, seed: int = 0,
                   label: str = "") -> list[Comparison]:
    """Run our layer and the torch layer with identical weights; compare everything.

    Parameters
    ----------
    make_ours : callable(dtype) -> our layer
    make_torch : callable() -> torch.nn.Module with the same parameter names as ours
    input_shape : shape of the random input x (standard normal times ``scale``)
    dtype : np.float64 or np.float32, for both sides
    passes : number of forward/backward passes, each on fresh x and a fresh upstream gradient;
        with passes > 1 the parameter gradients compared are the sums over all passes, which is
        what torch's accumulating ``.grad`` holds.

    Compared: the output y, grad_input = dL/dx for L = sum(y * upstream) and dL/dp for every
    parameter p, as relative errors against ``TOLERANCE[dtype]``. The array our layer's forward
    saw is overwritten with NaN before its backward pass, which must therefore keep (a copy of)
    whatever it needs.
    """
    import torch

    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    ours = make_ours(dtype)
    reference = make_torch().to(torch_dtype(dtype))
    params = layer_parameters(ours)
    for name, param in params.items():
        _require(param.data.dtype == dtype and param.grad.dtype == dtype, f"{name} is not {dtype}")
    torch_params = copy_parameters_to_torch(params, reference)

    pairs = {}
    for index in range(passes):
        suffix = f"[{index}]" if passes > 1 else ""
        x = (scale * rng.standard_normal(input_shape)).astype(dtype)
        x_torch = torch.from_numpy(x.copy()).requires_grad_()
        # Ours gets a copy (a layer that wrote into its input must not hide it from the comparison),
        # overwritten with NaN after forward: backward must not depend on the caller keeping x.
        # (y is copied first: an output may be a view of the input, as Flatten's is, and torch's.)
        x_ours = x.copy()
        y = ours.forward(x_ours).copy()
        x_ours[...] = np.nan
        y_torch = reference(x_torch)
        upstream = rng.standard_normal(y.shape).astype(dtype)
        grad_input = ours.backward(upstream.copy())
        y_torch.backward(torch.from_numpy(upstream))
        _require(y.dtype == dtype and grad_input.dtype == dtype,
                 f"float dtype changed: {y.dtype}, {grad_input.dtype}")
        pairs["output" + suffix] = (y, y_torch.detach().numpy())
        pairs["grad_input" + suffix] = (grad_input, x_torch.grad.numpy())
    for name, param in params.items():
        pairs["grad_" + name] = (param.grad, torch_params[name].grad.numpy())
    return compare(label or type(ours).__name__, pairs, TOLERANCE[dtype], f"torch {dtype}")


def loss_vs_torch(logits: np.ndarray, labels: np.ndarray, label: str = "softmax_cross_entropy", *,
                  label_smoothing: float = 0.0) -> list[Comparison]:
    """The loss and grad_logits against ``nn.CrossEntropyLoss(label_smoothing=...)`` (mean), in the
    logits' dtype."""
    import torch

    loss, grad_logits = softmax_cross_entropy(logits.copy(), labels.copy(), label_smoothing=label_smoothing)
    logits_torch = torch.from_numpy(logits.copy()).requires_grad_()
    loss_torch = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)(
        logits_torch, torch.from_numpy(labels.astype(np.int64)))
    loss_torch.backward()
    pairs = {"loss": (np.float64(loss), loss_torch.item()), "grad_logits": (grad_logits, logits_torch.grad.numpy())}
    return compare(label, pairs, TOLERANCE[logits.dtype], f"torch {logits.dtype}")


def torch_lenet5(activation: str = "relu", pool: str = "avg"):
    """LeNet-5 built from ``torch.nn`` with our parameter names (conv1.weight ... fc2.bias).

    The architecture is written out here from the seed notebook, not read from our model, so a
    layer missing from or misplaced in ``LeNet5.layers`` shows up as a difference.
    """
    from collections import OrderedDict

    from torch import nn

    def activation_layer():
        return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]()

    def pool_layer():
        return {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[pool](2)

    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 6, 5)), ("act1", activation_layer()), ("pool1", pool_layer()),
        ("conv2", nn.Conv2d(6, 16, 5)), ("act2", activation_layer()), ("pool2", pool_layer()),
        ("conv3", nn.Conv2d(16, 120, 5)), ("act3", activation_layer()), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(120, 84)), ("act4", activation_layer()),
        ("fc2", nn.Linear(84, 10)),
    ]))


def lenet5_vs_torch(model, torch_model, images: np.ndarray, labels: np.ndarray, *,
                    label: str = "LeNet5") -> list[Comparison]:
    """Our LeNet5 against a torch LeNet-5 given our weights: logits, loss, grad_input, 10 gradients.

    ``torch_model`` is any ``torch.nn.Module`` with our parameter names (:func:`torch_lenet5`, or
    the notebook's ``reference.LeNet``), in the dtype of ``model``; its weights are overwritten.
    """
    import torch

    torch_params = copy_parameters_to_torch(dict(model.named_parameters()), torch_model)
    logits = model.forward(images.copy())
    loss, grad_logits = softmax_cross_entropy(logits, labels)
    model.zero_grad()
    grad_input = model.backward(grad_logits)

    images_torch = torch.from_numpy(images.copy()).requires_grad_()
    logits_torch = torch_model(images_torch)
    loss_torch = torch.nn.functional.cross_entropy(logits_torch, torch.from_numpy(labels.astype(np.int64)))
    loss_torch.backward()

    pairs = {"logits": (logits, logits_torch.detach().numpy()), "loss": (loss, loss_torch.item()),
             "grad_input": (grad_input, images_torch.grad.numpy())}
    pairs.update({"grad_" + name: (param.grad, torch_params[name].grad.numpy())
                  for name, param in model.named_parameters()})
    return compare(label, pairs, TOLERANCE[model.dtype], f"torch {model.dtype}")


# --------------------------------------------------------------------------------------------
# Against central finite differences (float64, no torch)
# --------------------------------------------------------------------------------------------

def numerical_gradient(objective: Callable[[], float], array: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Central differences (f(a + h e_i) - f(a - h e_i)) / 2h, perturbing ``array`` in place."""
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        plus = objective()
        array[index] = original - step
        minus = objective()
        array[index] = original
        gradient[index] = (plus - minus) / (2 * step)
    return gradient


def layer_vs_finite_differences(layer, input_shape: tuple[int, ...], *, seed: int = 0,
                                label: str = "") -> list[Comparison]:
    """Finite-difference check of grad_input and every parameter gradient of a float64 layer.

    The scalar checked is L(x, p) = sum(layer.forward(x) * upstream) for a fixed random upstream.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape)
    upstream = rng.standard_normal(layer.forward(x.copy()).shape)
    params = layer_parameters(layer)
    for name, param in params.items():
        _require(param.data.dtype == FLOAT64, f"finite differences need float64, {name} is {param.data.dtype}")
        param.grad[...] = 0
    layer.forward(x.copy())
    analytic = {"grad_input": layer.backward(upstream.copy())}
    analytic.update({"grad_" + name: param.grad.copy() for name, param in params.items()})

    def objective() -> float:
        return float(np.sum(layer.forward(x.copy()) * upstream))

    numeric = {"grad_input": numerical_gradient(objective, x)}
    numeric.update({"grad_" + name: numerical_gradient(objective, param.data) for name, param in params.items()})
    return compare(label or type(layer).__name__, {name: (analytic[name], numeric[name]) for name in analytic},
                   GRADCHECK_TOLERANCE, "finite diff.")


def loss_vs_finite_differences(logits: np.ndarray, labels: np.ndarray,
                               label: str = "softmax_cross_entropy") -> list[Comparison]:
    """grad_logits of :func:`softmax_cross_entropy` against central differences of its loss (float64)."""
    logits = np.array(logits, dtype=np.float64)
    _, analytic = softmax_cross_entropy(logits, labels)
    numeric = numerical_gradient(lambda: float(softmax_cross_entropy(logits, labels)[0]), logits)
    return compare(label, {"grad_logits": (analytic, numeric)}, GRADCHECK_TOLERANCE, "finite diff.")


def lenet5_vs_finite_differences(model, images: np.ndarray, labels: np.ndarray, *, entries: int = 12,
                                 step: float = 1e-4, rng: np.random.Generator | int | None = 0,
                                 input_grad: bool = True, label: str = "LeNet5") -> list[Comparison]:
    """End to end through a float64 LeNet5 and the loss, on ``entries`` random entries per tensor.

    Checked: each parameter's gradient and (if ``input_grad``) grad_input, against central
    differences of the mean cross-entropy loss. Step 1e-4, not 1e-6: early-layer gradients of a
    sigmoid network are ~1e-4, so the round-off of the loss (~1e-16 * 2.3 / h ~ 3e-12) must stay
    small next to them; the truncation error (h^2 / 6 times the third derivative) stays far below
    the tolerance (measured: <= 4e-8). A sigmoid network's input gradient (~1e-6) is too small for
    that round-off (measured: 2e-6 relative): check it on tanh or ReLU networks (~1e-9).
    """
    _require(model.dtype == FLOAT64, f"finite differences need a float64 model, got {model.dtype}")
    rng = np.random.default_rng(rng)
    images = np.array(images, dtype=np.float64)

    def loss() -> float:
        return float(softmax_cross_entropy(model.forward(images), labels)[0])

    model.zero_grad()
    _, grad_logits = softmax_cross_entropy(model.forward(images), labels)
    grad_input = model.backward(grad_logits)
    tensors = [("grad_" + name, param.data, param.grad) for name, param in model.named_parameters()]
    if input_grad:
        tensors.append(("grad_input", images, grad_input))
    pairs = {}
    for name, array, analytic in tensors:
        flat = array.reshape(-1)  # a view: perturbing it perturbs the model (or the images)
        _require(np.shares_memory(flat, array), f"{name} is not contiguous")
        picked = rng.choice(flat.size, size=min(entries, flat.size), replace=False)
        numeric = [numerical_gradient(loss, flat[index:index + 1], step=step)[0] for index in picked]
        pairs[name] = (analytic.reshape(-1)[picked], np.array(numeric))
    return compare(label, pairs, GRADCHECK_TOLERANCE, "finite diff.")


# --------------------------------------------------------------------------------------------
# Optimiser steps: against torch.optim, and against the formulas of the papers (float64)
# --------------------------------------------------------------------------------------------

OPTIMIZERS = {"adam": Adam, "sgd": SGD}


def _flatten(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(array).reshape(-1) for array in arrays])


def _split(flat: np.ndarray, params: list[Parameter]) -> list[np.ndarray]:
    """``flat`` cut into arrays shaped like ``params``, in order."""
    sizes = np.cumsum([p.data.size for p in params])[:-1]
    return [piece.reshape(p.data.shape) for piece, p in zip(np.split(flat, sizes), params)]


def _our_updates(kind: str, hyper: dict, params: list[Parameter], gradients: list[np.ndarray]) -> list[np.ndarray]:
    """Run our optimiser one step per flat gradient; each step's change of the flat parameters."""
    optimizer = OPTIMIZERS[kind](params, **hyper)
    updates = []
    for gradient in gradients:
        for param, piece in zip(params, _split(gradient, params)):
            param.grad[...] = piece
        before = _flatten(p.data for p in params)
        optimizer.step()
        updates.append(_flatten(p.data for p in params) - before)
    return updates


def _torch_updates(kind: str, hyper: dict, params: list[Parameter], gradients: list[np.ndarray]) -> list[np.ndarray]:
    """The same steps with torch.optim on copies of ``params``."""
    import torch

    torch_params = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in params]
    optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind](torch_params, **hyper)
    updates = []
    for gradient in gradients:
        for param, piece in zip(torch_params, _split(gradient, params)):
            param.grad = torch.from_numpy(piece.copy())
        before = _flatten(p.detach().numpy() for p in torch_params)
        optimizer.step()
        updates.append(_flatten(p.detach().numpy() for p in torch_params) - before)
    return updates


def _formula_updates(kind: str, hyper: dict, initial: np.ndarray, gradients: list[np.ndarray]) -> list[np.ndarray]:
    """The updates as the papers write them, in float64 (torch's defaults where ``hyper`` is silent).

    Adam (Kingma & Ba, with L2 weight decay added to the gradient)::

        g = g + wd p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    SGD with momentum (Sutskever et al.; Nesterov as torch writes it)::

        g = g + wd p;  b = g (first step), else b = momentum b + (1 - dampening) g
        p = p - lr (g + momentum b if nesterov else b)
    """
    weight_decay, lr = hyper.get("weight_decay", 0.0), hyper.get("lr", 1e-3)
    p, state, updates = initial.astype(np.float64), {}, []
    for t, g in enumerate(gradients, start=1):
        g = g.astype(np.float64) + weight_decay * p
        if kind == "adam":
            beta1, beta2 = hyper.get("betas", (0.9, 0.999))
            state["m"] = beta1 * state.get("m", 0.0) + (1 - beta1) * g
            state["v"] = beta2 * state.get("v", 0.0) + (1 - beta2) * g * g
            m_hat, v_hat = state["m"] / (1 - beta1 ** t), state["v"] / (1 - beta2 ** t)
            update = -lr * m_hat / (np.sqrt(v_hat) + hyper.get("eps", 1e-8))
        else:
            momentum = hyper.get("momentum", 0.0)
            if momentum:
                state["b"] = g if t == 1 else momentum * state["b"] + (1 - hyper.get("dampening", 0.0)) * g
                g = g + momentum * state["b"] if hyper.get("nesterov", False) else state["b"]
            update = -lr * g
        p = p + update
        updates.append(update)
    return updates


def _update_pairs(ours: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    return {f"update {step}": pair for step, pair in enumerate(zip(ours, reference), start=1)}


def optimizer_vs_torch(kind: str, hyper: dict, params: list[Parameter], gradients: list[np.ndarray], *,
                       label: str) -> list[Comparison]:
    """Steps of our Adam or SGD (``kind``) against torch.optim's, from the same parameters and gradients.

    Compared: each step's update (the change of all parameters, flattened), which exposes an error
    in the step far better than the parameters themselves, whose size hides it. The parameters
    are changed in place.
    """
    dtype = params[0].data.dtype
    theirs = _torch_updates(kind, hyper, params, gradients)
    ours = _our_updates(kind, hyper, params, gradients)
    return compare(label, _update_pairs(ours, theirs), TOLERANCE[dtype], f"torch {dtype}")


def optimizer_vs_formula(kind: str, hyper: dict, params: list[Parameter], gradients: list[np.ndarray], *,
                         label: str) -> list[Comparison]:
    """Steps of our float64 Adam or SGD against the update formulas of the papers (no torch)."""
    _require(params[0].data.dtype == FLOAT64, f"the formula check needs float64, got {params[0].data.dtype}")
    theirs = _formula_updates(kind, hyper, _flatten(p.data for p in params), gradients)
    ours = _our_updates(kind, hyper, params, gradients)
    return compare(label, _update_pairs(ours, theirs), TOLERANCE[FLOAT64], "the formula")
