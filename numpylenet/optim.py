"""Optimisers with torch.optim's exact update rules: Adam and SGD (momentum, nesterov)."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .backend import fused_adam_step, fused_parameter_buffers, fused_sgd_step
from .layers import Parameter

__all__ = ["Optimizer", "Adam", "SGD"]


def _require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``; written ``not 0 <= x`` so NaN fails."""
    if not condition:
        raise ValueError(message)


class Optimizer:
    """Base class: holds the parameters and named per-parameter state buffers.

    Subclasses list their state buffers in ``buffer_names``; each is a list with one array per
    parameter (or ``None`` before the first step), so ``state_dict`` can save them as flat arrays
    named ``"<buffer>.<index>"`` that ``np.savez`` stores and ``np.load`` reads without pickle.
    """

    buffer_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if not all(isinstance(p, Parameter) for p in self.params):
            raise ValueError("optimizer expects an iterable of numpylenet.Parameter")
        _require(0.0 <= lr, f"Invalid learning rate: {lr}")
        self.lr = lr
        self.step_count = 0
        for name in self.buffer_names:
            setattr(self, name, [None] * len(self.params))
        # A numba-backend model's parameters tile one flat buffer: then step() is one fused loop.
        self.fused_buffers = fused_parameter_buffers(self.params)

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
                    state[f"{name}.{index}"] = buffer.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned; unknown keys or wrong shapes raise ValueError."""
        state = dict(state)
        if "step" not in state:
            raise ValueError("optimizer state is missing 'step'")
        step_count = int(np.asarray(state.pop("step")))
        buffers = {name: [None] * len(self.params) for name in self.buffer_names}
        for key, value in state.items():
            name, _, index = key.rpartition(".")
            if name not in buffers or not index.isdigit() or int(index) >= len(self.params):
                raise ValueError(f"unexpected key {key!r} in optimizer state")
            param = self.params[int(index)]
            if np.shape(value) != param.data.shape:
                raise ValueError(f"optimizer state {key!r} has shape {np.shape(value)}, "
                                 f"expected {param.data.shape}")
            buffers[name][int(index)] = np.array(value, dtype=param.data.dtype)
        self.step_count = step_count
        for name, values in buffers.items():
            setattr(self, name, values)


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
    """

    buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        beta1, beta2 = betas
        _require(0.0 <= eps, f"Invalid epsilon value: {eps}")
        _require(0.0 <= beta1 < 1.0, f"Invalid beta parameter at index 0: {beta1}")
        _require(0.0 <= beta2 < 1.0, f"Invalid beta parameter at index 1: {beta2}")
        _require(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        self.betas, self.eps, self.weight_decay = (beta1, beta2), eps, weight_decay

    def step(self) -> None:
        beta1, beta2 = self.betas
        self.step_count += 1
        if self.fused_buffers is not None:
            return fused_adam_step(self, *self.fused_buffers)
        t = self.step_count
        step_size = self.lr / (1 - beta1 ** t)
        bias_correction2_sqrt = np.sqrt(1 - beta2 ** t)
        for index, p in enumerate(self.params):
            grad = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.exp_avg[index] is None:
                self.exp_avg[index] = np.zeros_like(p.data)
                self.exp_avg_sq[index] = np.zeros_like(p.data)
            m, v = self.exp_avg[index], self.exp_avg_sq[index]
            m += (1 - beta1) * (grad - m)          # = beta1 m + (1 - beta1) g, torch's lerp form
            v *= beta2
            v += (1 - beta2) * grad * grad
            denominator = np.sqrt(v) / bias_correction2_sqrt + self.eps
            p.data -= step_size * (m / denominator)


class SGD(Optimizer):
    """Stochastic gradient descent, exactly as ``torch.optim.SGD`` computes it.

    For each parameter p with gradient g::

        g = g + weight_decay * p
        if momentum != 0:
            b = g                                       on the first step
            b = momentum * b + (1 - dampening) * g      afterwards
            g = g + momentum * b   if nesterov   else   b
        p = p - lr * g
    """

    buffer_names = ("momentum_buffer",)

    def __init__(self, params: Iterable[Parameter], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr)
        _require(0.0 <= momentum, f"Invalid momentum value: {momentum}")
        _require(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        _require(not nesterov or (momentum > 0 and dampening == 0),
                 "Nesterov momentum requires a momentum and zero dampening")
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def step(self) -> None:
        self.step_count += 1
        if self.fused_buffers is not None:
            return fused_sgd_step(self, *self.fused_buffers)
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
