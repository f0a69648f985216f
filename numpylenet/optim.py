"""Optimisers with torch.optim's exact update rules: Adam and SGD (momentum, nesterov).

Fused updates: given exactly the parameters of one numba-backend :class:`numpylenet.LeNet5`,
in order (``Adam(model.parameters())``), an optimiser finds the model's flat buffers through
:meth:`~numpylenet.LeNet5.flat_buffers` (see :func:`find_fused_buffers`) and updates all of them
in one Numba loop (:mod:`numpylenet.engine`) that rounds exactly as the NumPy loop below. For any
other list - a subset, another order, two models' parameters, a numpy-backend model - it runs the
NumPy loop. Either way ``state_dict()`` holds one array per parameter and buffer.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .layers import Parameter, check_weights, weights_as

__all__ = ["Optimizer", "Adam", "SGD", "AdamStep", "SGDSettings", "find_fused_buffers", "state_key",
           "parse_state_key", "check_state"]


def _require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``; written ``not 0 <= x`` so NaN fails."""
    if not condition:
        raise ValueError(message)


def _real(value, name: str) -> float:
    """``value`` as a float if it is one real number (int, float, NumPy scalar or 0-d array, a
    0-d torch tensor); TypeError for anything else - a string, None, a bool, several values -
    which the two backends would otherwise each take or refuse in their own way."""
    array = None if isinstance(value, (bool, np.bool_, str, bytes)) or value is None else np.asarray(value)
    if array is None or array.ndim != 0 or array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(array)


def state_key(buffer: str, index: int) -> str:
    """The state_dict key of buffer ``buffer`` of parameter ``index``: ``"<buffer>.<index>"``."""
    return f"{buffer}.{index}"


def parse_state_key(key: str, buffer_names: Sequence[str], num_params: int) -> tuple[str, int]:
    """(buffer, index) of a :func:`state_key`, if ``buffer`` is one of ``buffer_names`` and
    0 <= index < ``num_params``; ValueError otherwise."""
    buffer, _, index = key.rpartition(".")
    if buffer not in buffer_names or not index.isdigit() or int(index) >= num_params:
        raise ValueError(f"unexpected key {key!r} in optimizer state")
    return buffer, int(index)


def find_fused_buffers(params: Sequence[Parameter]) -> tuple[np.ndarray, np.ndarray] | None:
    """``model.flat_buffers()`` if ``params`` are exactly ``model.parameters()`` - the same
    Parameter objects, all of them, in order (views of those buffers, which assignments to their
    ``.data`` and ``.grad`` write into) - for a numba-backend LeNet5 ``model``; else None.

    The model is the one that packed the first parameter (``params[0].owner``); then one loop
    over its flat buffers updates exactly these parameters.
    """
    model = getattr(params[0], "owner", None)
    if model is None or model.backend != "numba":
        return None
    own = model.parameters()
    if len(own) != len(params) or any(p is not q for p, q in zip(params, own)):
        return None
    return model.flat_buffers()


def check_state(state: Mapping[str, np.ndarray]) -> None:
    """ValueError unless ``step`` (if present) is a scalar integer >= 0 and every other entry is a
    finite float32 or float64 array. Names and shapes are the optimiser's own to check."""
    step = state.get("step")
    if step is not None:
        step = np.asarray(step)
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise ValueError(f"optimizer state 'step' must be a scalar integer >= 0, "
                             f"got {step.dtype} of shape {step.shape}")
    check_weights({name: value for name, value in state.items() if name != "step"}, "optimizer state")


class Optimizer:
    """Base class: holds the parameters and named per-parameter state buffers.

    Subclasses list their state buffers in ``buffer_names``; each is a list with one array per
    parameter (or ``None`` before the first step), so ``state_dict`` can save them as flat arrays
    named ``"<buffer>.<index>"`` that ``np.savez`` stores and ``np.load`` reads without pickle.
    Those in ``non_negative_buffers`` (running means of squares) cannot hold a negative value.
    """

    buffer_names: tuple[str, ...] = ()
    non_negative_buffers: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if not all(isinstance(p, Parameter) for p in self.params):
            raise ValueError("optimizer expects an iterable of numpylenet.Parameter")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("optimizer got a parameter more than once: each step would update it "
                             "once per appearance")
        lr = _real(lr, "lr")
        _require(0.0 <= lr, f"Invalid learning rate: {lr}")
        self.lr = lr
        self.step_count = 0
        for name in self.buffer_names:
            setattr(self, name, [None] * len(self.params))
        # A numba-backend model's parameters tile one flat buffer: then step() is one fused loop.
        self.fused_buffers = find_fused_buffers(self.params)
        self._flat_states: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy``: without the fused buffers, which are the model's and are
        found again from the copied parameters (:meth:`__setstate__`), nor the flat state arrays,
        packed again from the per-parameter buffers at the next step."""
        state = dict(self.__dict__)
        state["fused_buffers"], state["_flat_states"] = None, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.fused_buffers = find_fused_buffers(self.params)

    def zero_grad(self) -> None:
        """Set every parameter's gradient to zero, in place."""
        for p in self.params:
            p.grad.fill(0)

    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """The optimiser's state: ``step`` and every initialised buffer, as NumPy arrays."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for name in self.buffer_names:
            for index, buffer in enumerate(getattr(self, name)):
                if buffer is not None:
                    state[state_key(name, index)] = buffer.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned. ValueError, and nothing restored, for unknown keys,
        wrong shapes, a ``step`` that is not a scalar integer >= 0, buffers that are not float32/
        float64 arrays finite in their parameter's dtype, or a parameter with some of its buffers
        but not all (Adam's ``exp_avg.i`` without ``exp_avg_sq.i``)."""
        state = dict(state)
        if "step" not in state:
            raise ValueError("optimizer state is missing 'step'")
        check_state(state)
        step_count = int(state.pop("step"))
        buffers = {name: [None] * len(self.params) for name in self.buffer_names}
        for key, value in state.items():
            name, index = parse_state_key(key, self.buffer_names, len(self.params))
            param = self.params[index]
            if np.shape(value) != param.data.shape:
                raise ValueError(f"optimizer state {key!r} has shape {np.shape(value)}, "
                                 f"expected {param.data.shape}")
            buffers[name][index] = weights_as(value, param.data.dtype, "optimizer state", key)
            if name in self.non_negative_buffers and (buffers[name][index] < 0).any():
                # sqrt of it would be NaN at the next step: a corrupt state, not a diverged run
                raise ValueError(f"optimizer state {key!r} holds negative values; it is a mean of squares")
        for index in range(len(self.params)):
            held = [name for name in self.buffer_names if buffers[name][index] is not None]
            if held and len(held) < len(self.buffer_names):
                lacking = [state_key(name, index) for name in self.buffer_names if name not in held]
                raise ValueError(f"optimizer state has {state_key(held[0], index)} but not {', '.join(lacking)}")
        self.step_count = step_count
        for name, values in buffers.items():
            setattr(self, name, values)

    def _partly_initialised(self, name: str) -> bool:
        """Whether the buffer list ``name`` holds arrays for some parameters and not for others (a
        partial state loaded), which a fused loop, with one first-step flag for all, cannot step."""
        missing = [buffer is None for buffer in getattr(self, name)]
        return any(missing) and not all(missing)

    def _flat_state(self, name: str) -> tuple[np.ndarray, bool]:
        """The per-parameter buffer list ``name`` as one flat array shaped like the fused
        parameter buffer (its entries become views of it), and whether it was empty before (no
        step taken yet). New or loaded buffers are packed into it once."""
        buffers = getattr(self, name)
        flat = self._flat_states.get(name)
        if flat is not None and all(b is not None and b.base is flat for b in buffers):
            return flat, False
        empty = all(b is None for b in buffers)
        flat = np.zeros_like(self.fused_buffers[0])
        offset = 0
        for index, p in enumerate(self.params):
            view = flat[offset:offset + p.data.size].reshape(p.data.shape)
            if buffers[index] is not None:
                view[...] = buffers[index]
            buffers[index] = view
            offset += p.data.size
        self._flat_states[name] = flat
        return flat, empty


class AdamStep(NamedTuple):
    """The scalars of Adam's step t, the same for every parameter: computed once, by
    :meth:`Adam.step_scalars`, for the NumPy loop and the fused Numba loop alike."""
    step_size: float                # lr / (1 - beta1^t)
    bias_correction2_sqrt: float    # sqrt(1 - beta2^t), a NumPy float64 (see Adam.step)
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


class SGDSettings(NamedTuple):
    """SGD's hyper-parameters, as the fused Numba loop takes them."""
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


class Adam(Optimizer):
    """Adam (Kingma & Ba), exactly as ``torch.optim.Adam`` computes it (amsgrad=False).

    For each parameter p with gradient g, at step t = 1, 2, ...::

        g = g + weight_decay * p                  (L2 penalty added to the gradient)
        m = beta1 * m + (1 - beta1) * g           (first moment; m_0 = 0)
        v = beta2 * v + (1 - beta2) * g^2         (second moment; v_0 = 0)
        m_hat = m / (1 - beta1^t)                 (bias correction: m and v start at 0, so early
        v_hat = v / (1 - beta2^t)                  averages are biased towards 0)
        p = p - lr * m_hat / (sqrt(v_hat) + eps)

    eps is added AFTER bias-correcting sqrt(v), as torch does; adding it to v or before the
    correction gives a visibly different trajectory in the first steps.

    Numba counterpart: ``kernels.adam_step``, the same lines over a whole flat buffer (used when
    the parameters are exactly one numba model's, see :func:`find_fused_buffers`).
    """

    buffer_names = ("exp_avg", "exp_avg_sq")
    non_negative_buffers = ("exp_avg_sq",)

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        beta1, beta2 = (_real(beta, f"betas[{index}]") for index, beta in enumerate(betas))
        eps, weight_decay = _real(eps, "eps"), _real(weight_decay, "weight_decay")
        _require(0.0 <= eps, f"Invalid epsilon value: {eps}")
        _require(0.0 <= beta1 < 1.0, f"Invalid beta parameter at index 0: {beta1}")
        _require(0.0 <= beta2 < 1.0, f"Invalid beta parameter at index 1: {beta2}")
        _require(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        self.betas, self.eps, self.weight_decay = (beta1, beta2), eps, weight_decay

    def step_scalars(self) -> AdamStep:
        """The scalars of step ``step_count``: m_hat / (sqrt(v_hat) + eps) times lr is
        step_size * m / (sqrt(v) / bias_correction2_sqrt + eps), as torch computes it.

        ``bias_correction2_sqrt`` stays a NumPy float64: dividing a float32 array by it forms the
        denominator in float64 (NumPy's promotion), and the fused loop rounds the same, so the
        two backends agree. torch's float32 Adam forms it in float32: float32 weights then differ
        from torch's by a unit in the last place here and there (float64 runs are unaffected)."""
        beta1, beta2 = self.betas
        t = self.step_count
        return AdamStep(step_size=self.lr / (1 - beta1 ** t),
                        bias_correction2_sqrt=np.sqrt(np.float64(1 - beta2 ** t)),
                        beta1=beta1, beta2=beta2, eps=self.eps, weight_decay=self.weight_decay)

    def step(self) -> None:
        self.step_count += 1
        scalars = self.step_scalars()
        if self.fused_buffers is not None:
            from .engine import fused_adam_step     # only a numba-backend model's parameters get here
            (exp_avg, _), (exp_avg_sq, _) = self._flat_state("exp_avg"), self._flat_state("exp_avg_sq")
            return fused_adam_step(*self.fused_buffers, exp_avg, exp_avg_sq, scalars)
        beta1, beta2 = self.betas
        for index, p in enumerate(self.params):
            grad = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.exp_avg[index] is None:
                self.exp_avg[index] = np.zeros_like(p.data)
                self.exp_avg_sq[index] = np.zeros_like(p.data)
            m, v = self.exp_avg[index], self.exp_avg_sq[index]
            m += (1 - beta1) * (grad - m)          # = beta1 m + (1 - beta1) g, torch's lerp form
            v *= beta2
            v += (1 - beta2) * grad * grad
            denominator = np.sqrt(v) / scalars.bias_correction2_sqrt + self.eps
            p.data -= scalars.step_size * (m / denominator)


class SGD(Optimizer):
    """Stochastic gradient descent, exactly as ``torch.optim.SGD`` computes it.

    For each parameter p with gradient g::

        g = g + weight_decay * p
        if momentum != 0:
            b = g                                       on the first step
            b = momentum * b + (1 - dampening) * g      afterwards
            g = g + momentum * b   if nesterov   else   b
        p = p - lr * g

    Numba counterpart: ``kernels.sgd_step``, the same lines over a whole flat buffer (used when
    the parameters are exactly one numba model's, see :func:`find_fused_buffers`).
    """

    buffer_names = ("momentum_buffer",)

    def __init__(self, params: Iterable[Parameter], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr)
        momentum, dampening = _real(momentum, "momentum"), _real(dampening, "dampening")
        weight_decay = _real(weight_decay, "weight_decay")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        _require(0.0 <= momentum, f"Invalid momentum value: {momentum}")
        _require(math.isfinite(dampening), f"Invalid dampening value: {dampening}")
        _require(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        _require(not nesterov or (momentum > 0 and dampening == 0),
                 "Nesterov momentum requires a momentum and zero dampening")
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def step(self) -> None:
        self.step_count += 1
        # SGD starts a momentum buffer at b = g, not at 0: after a partial state, the NumPy loop
        # takes this step (then every buffer exists, and the fused loop the next ones).
        if self.fused_buffers is not None and not self._partly_initialised("momentum_buffer"):
            from .engine import fused_sgd_step      # only a numba-backend model's parameters get here
            buffer, first_step = (self._flat_state("momentum_buffer") if self.momentum
                                  else (self.fused_buffers[0][:0], False))
            settings = SGDSettings(self.lr, self.momentum, self.dampening, self.weight_decay, self.nesterov)
            return fused_sgd_step(*self.fused_buffers, buffer, settings, first_step)
        for index, p in enumerate(self.params):
            grad = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.momentum:
                buffer = self.momentum_buffer[index]
                if buffer is None:
                    buffer = self.momentum_buffer[index] = grad.copy()
                else:
                    buffer *= self.momentum
                    buffer += (1 - self.dampening) * grad
                grad = grad + self.momentum * buffer if self.nesterov else buffer
            p.data -= self.lr * grad
