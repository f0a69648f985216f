"""The checks every core test goes through: compare with torch, compare with finite differences.

Relative error, everywhere in these tests, means the largest absolute difference scaled by the
largest magnitude of the reference tensor::

    relative_error(ours, ref) = max |ours - ref| / max(max |ref|, tiny)

Scaling by the tensor's largest entry (rather than entry by entry) keeps entries that are
legitimately near zero, such as gradients summed over many cancelling terms, from producing
meaningless huge ratios, while still flagging any error that matters at the tensor's own scale.

Each check prints one line per named tensor (run pytest with ``-s`` to see them), llm.c style::

    conv_stride2  grad_weight   max|diff| 4.4e-16   relative 1.1e-16   OK
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from numpylenet import Parameter

# float64 carries ~16 significant digits; the layers do short sums (<= a few thousand terms), so
# any honest implementation lands near 1e-15 and 1e-9 leaves room only for summation order.
# float32 has unit round-off u = 6e-8. A sum of K terms computed in a different order than
# torch's (im2col GEMM versus torch's own kernels) differs by about sqrt(K) * u * max|term| in
# practice and K * u in the worst case; with K <= 2400 here (the bias gradient of conv1 on a
# batch of two 28x28 maps) that is 3e-6 typical. 2e-5 relative to max|ref| keeps a 5x margin
# over that while still failing any real bug, which shows up as an O(1) relative error.
TOLERANCE = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-5}
TINY = np.finfo(np.float64).tiny


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max(max |reference|, tiny); inf if the shapes differ."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        return np.inf
    if ours.size == 0:
        return 0.0
    return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), TINY))


def assert_close(label: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]], tolerance: float) -> None:
    """Print one error line per named (ours, reference) pair and fail if any exceeds tolerance."""
    failures = []
    for name, (ours, reference) in pairs.items():
        ours, reference = np.asarray(ours), np.asarray(reference)
        error = relative_error(ours, reference)
        absolute = np.max(np.abs(ours - reference)) if ours.shape == reference.shape and ours.size else 0.0
        verdict = "OK" if error <= tolerance else "NOT OK"
        line = f"{label:<28} {name:<18} max|diff| {absolute:8.1e}   relative {error:8.1e}   {verdict}"
        print(line)
        if not error <= tolerance:      # written so that a NaN error fails too
            shapes = f"(shapes {ours.shape} vs {reference.shape})" if ours.shape != reference.shape else ""
            failures.append(f"{line} {shapes}")
    assert not failures, f"tolerance {tolerance:g} exceeded:\n" + "\n".join(failures)


def layer_parameters(layer) -> dict[str, Parameter]:
    """The layer's parameters by name ("weight", "bias"), which are also torch's names."""
    named = dict(layer.named_parameters())
    assert all(isinstance(value, Parameter) for value in named.values())
    return named


def torch_dtype(dtype):
    import torch

    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


def check_layer(make_ours: Callable, make_torch: Callable, input_shape: tuple[int, ...],
                dtype=np.float64, *, passes: int = 1, scale: float = 1.0, seed: int = 0,
                label: str = "") -> None:
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
    parameter p, as relative errors (see the module docstring) against ``TOLERANCE[dtype]``. The
    array our layer's forward saw is overwritten with NaN before its backward pass, which must
    therefore keep (a copy of) whatever it needs.
    """
    import torch

    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    ours = make_ours(dtype)
    reference = make_torch().to(torch_dtype(dtype))
    params = layer_parameters(ours)
    torch_params = dict(reference.named_parameters())
    assert sorted(params) == sorted(torch_params), f"parameters {sorted(params)} vs torch {sorted(torch_params)}"
    with torch.no_grad():
        for name, param in params.items():
            assert param.data.dtype == dtype and param.grad.dtype == dtype, f"{name} is not {dtype}"
            assert param.data.shape == tuple(torch_params[name].shape), f"{name} shape differs from torch"
            torch_params[name].copy_(torch.from_numpy(param.data))

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
        assert y.dtype == dtype and grad_input.dtype == dtype, f"float dtype changed: {y.dtype}, {grad_input.dtype}"
        pairs["output" + suffix] = (y, y_torch.detach().numpy())
        pairs["grad_input" + suffix] = (grad_input, x_torch.grad.numpy())
    for name, param in params.items():
        pairs["grad_" + name] = (param.grad, torch_params[name].grad.numpy())
    assert_close(label or type(ours).__name__, pairs, TOLERANCE[dtype])


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


# Central differences in float64 with h = 1e-6: truncation error h^2 |f'''| / 6 ~ 1e-13 and
# round-off ~ 1e-16 |f| / h ~ 1e-10 relative to the gradient's scale, so 1e-6 is safe and still
# catches any wrong formula (O(1) error) or wrong index (an O(1) error in some entry).
GRADCHECK_TOLERANCE = 1e-6


def check_gradients(layer, input_shape: tuple[int, ...], *, seed: int = 0, label: str = "") -> None:
    """Finite-difference check of grad_input and every parameter gradient of a float64 layer.

    The scalar checked is L(x, p) = sum(layer.forward(x) * upstream) for a fixed random upstream.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(input_shape)
    upstream = rng.standard_normal(layer.forward(x.copy()).shape)
    params = layer_parameters(layer)
    for param in params.values():
        param.grad[...] = 0
    layer.forward(x.copy())
    analytic = {"grad_input": layer.backward(upstream.copy())}
    analytic.update({"grad_" + name: param.grad.copy() for name, param in params.items()})

    def objective() -> float:
        return float(np.sum(layer.forward(x.copy()) * upstream))

    numeric = {"grad_input": numerical_gradient(objective, x)}
    numeric.update({"grad_" + name: numerical_gradient(objective, param.data) for name, param in params.items()})
    assert_close(label or type(layer).__name__, {name: (analytic[name], numeric[name]) for name in analytic},
                 GRADCHECK_TOLERANCE)
