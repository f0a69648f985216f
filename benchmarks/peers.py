"""The frameworks a user might pick instead of numpylenet, set up for the speed benchmarks.

:mod:`benchmarks.step` and :mod:`benchmarks.inference` time numpylenet against these peers, all
from the same float32 weights (numpylenet's ``LeNet5(seed=0)``) on the same batches:

* ``torch``: torch eager, the notebook's LeNet (:class:`reference.lenet.TorchLeNet5`);
* ``torch.compile``: the same model with the *whole* training step - zero_grad, forward, loss,
  backward, ``optimizer.step`` - in one ``torch.compile``d function (default mode, inductor's C++
  backend, ``dynamic=False``: one static graph per batch size, compiled on its first call, tens
  of seconds each); for inference the compiled model under ``torch.inference_mode``;
* ``jax``: when ``jax`` and ``optax`` import (the ``bench`` extra), ``jax.jit`` of a function
  computing ``jax.grad`` of the softmax cross-entropy of the same LeNet-5 and an
  ``optax.adam(1e-3)`` update; for inference ``jax.jit`` of the forward. Its threads come from
  ``XLA_FLAGS``, which :func:`benchmarks.common.set_threads` sets before jax is imported.

:mod:`benchmarks.time_to_accuracy` trains whole recipes with :class:`JaxLearner`, JAX's
counterpart of ``reference.train.TorchLearner``.

The peers are optional: :func:`add_peers` builds each one asked for, and a peer that cannot be
built or fails its first (compiling) call is left out with one printed line saying why, so the
benchmark goes on without it. Before JAX is timed, :func:`check_jax_forward` checks that its
forward pass equals numpylenet's on the same weights, so a wrong JAX model cannot be benchmarked.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping, Sequence

import numpy as np

__all__ = ["initial_state", "torch_model", "torch_compiled_step",
           "torch_compiled_forward", "jax_unavailable_reason", "jax_params", "jax_logits",
           "JaxLearner", "jax_step", "jax_forward", "check_jax_forward", "peer_builders", "add_peers"]

# JAX's float32 forward against numpylenet's: different summation orders, nothing more.
JAX_FORWARD_RTOL, JAX_FORWARD_ATOL = 1e-4, 1e-5


def initial_state(seed: int = 0) -> dict[str, np.ndarray]:
    """The float32 weights every framework starts from: ``LeNet5(seed=seed)``'s, by torch's names
    (conv1.weight (6, 1, 5, 5) ... fc2.bias (10,))."""
    from numpylenet import LeNet5

    return LeNet5(seed=seed, backend="numpy").state_dict()


def torch_model(state: Mapping[str, np.ndarray]):
    """The notebook's torch LeNet-5 (ReLU, average pooling) holding the weights ``state``."""
    import torch

    from reference.lenet import TorchLeNet5

    model = TorchLeNet5()
    model.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state.items()})
    return model


def _allow_a_graph_per_batch_size() -> None:
    """Let TorchDynamo keep compiling: every batch size (and every new model, optimiser and step
    closure of the benchmark) recompiles the same code objects, and past ``recompile_limit``
    (8) Dynamo silently falls back to eager - which would time torch eager under the name
    torch.compile."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def torch_compiled_step(state: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray, *,
                        backend: str = "inductor") -> Callable[[], object]:
    """One torch training step (zero_grad, forward, cross-entropy, backward, Adam lr 1e-3) on
    x (N, 1, 32, 32), labels (N,), all inside one ``torch.compile(backend=backend)`` function.

    ``backend="eager"`` traces with TorchDynamo but runs eager kernels: seconds instead of
    inductor's tens of seconds, which is what the tests use to check the wiring.
    """
    import torch
    import torch.nn.functional as F

    _allow_a_graph_per_batch_size()
    model = torch_model(state)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, targets = torch.from_numpy(x), torch.from_numpy(labels)

    @torch.compile(backend=backend, dynamic=False)
    def step(images, targets):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        return loss

    return lambda: step(images, targets)


def torch_compiled_forward(state: Mapping[str, np.ndarray], x: np.ndarray, *,
                           backend: str = "inductor") -> Callable[[], object]:
    """The logits (N, 10) of x (N, 1, 32, 32) from the ``torch.compile``d model, in inference mode."""
    import torch

    _allow_a_graph_per_batch_size()
    model = torch.compile(torch_model(state), backend=backend, dynamic=False)
    images = torch.from_numpy(x)

    def forward():
        with torch.inference_mode():
            return model(images)

    return forward


def jax_unavailable_reason() -> str | None:
    """Why JAX cannot be benchmarked here (None: it can)."""
    try:
        import jax  # noqa: F401
        import optax  # noqa: F401
    except ImportError as error:
        return f"{error.name or error} is not installed (pip install -e '.[bench]')"
    return None


def jax_params(state: Mapping[str, np.ndarray]) -> dict:
    """``state`` (torch's names and layouts: conv weights OIHW, linear weights (out, in)) as a
    dict of float32 jax arrays, the pytree that :func:`jax_logits` and optax work on."""
    import jax.numpy as jnp

    return {name: jnp.asarray(value, dtype=jnp.float32) for name, value in state.items()}


def jax_logits(params: Mapping, x, activation: str = "relu", pool: str = "avg"):
    """LeNet-5's forward pass in JAX: x (N, 1, 32, 32) -> logits (N, 10).

    conv (``lax.conv_general_dilated``, NCHW input, OIHW weights, no padding) + bias, the
    activation (relu, tanh or sigmoid), 2x2 pooling (avg or max) as a reshape and a mean or max,
    as in the notebook: 32 -> 28 -> 14 -> 10 -> 5 -> 1, then fc1 (120 -> 84) + the activation
    and fc2 (84 -> 10).
    """
    import jax

    act = {"relu": jax.nn.relu, "tanh": jax.numpy.tanh, "sigmoid": jax.nn.sigmoid}[activation]

    def conv_act(h, name):
        h = jax.lax.conv_general_dilated(h, params[f"{name}.weight"], window_strides=(1, 1),
                                         padding="VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return act(h + params[f"{name}.bias"][None, :, None, None])

    def pooled(h):                             # (N, C, H, W) -> (N, C, H/2, W/2)
        n, c, height, width = h.shape
        windows = h.reshape(n, c, height // 2, 2, width // 2, 2)
        return windows.mean(axis=(3, 5)) if pool == "avg" else windows.max(axis=(3, 5))

    h = pooled(conv_act(x, "conv1"))           # (N, 6, 14, 14)
    h = pooled(conv_act(h, "conv2"))           # (N, 16, 5, 5)
    h = conv_act(h, "conv3").reshape(h.shape[0], 120)
    h = act(h @ params["fc1.weight"].T + params["fc1.bias"])
    return h @ params["fc2.weight"].T + params["fc2.bias"]


class JaxLearner:
    """A recipe's run in JAX, written as a JAX user would: :func:`jax_logits` from numpylenet's
    initial weights for the seed, ``jax.jit`` of the label-smoothed cross-entropy's gradient and
    an optax update, the learning rate set at every step (``optax.inject_hyperparams``). The
    update is torch.optim's: Adam (``optax.adam``, torch's defaults) or SGD with momentum and
    Nesterov (``optax.sgd``: the same momentum buffer, starting at the first gradient), weight
    decay as torch's L2 term added to the gradient first (``optax.add_decayed_weights``).

    What :mod:`benchmarks.time_to_accuracy` needs of a learner, as
    :class:`reference.train.TorchLearner` offers it: ``train_step(x, y, lr)`` -> the batch's loss
    (waited for), ``logits(x)``, ``backend``, ``framework``. float32 only (JAX's default). The
    compiled functions are shared by every learner of the same settings, so that one learner can
    compile them for another (one graph per batch shape, on its first call).

    With SGD it follows torch's trajectory to float32 round-off (losses within 2e-7 relative over
    ten steps of the default recipe); with Adam within 1e-4, float32 noise in near-zero gradients
    being scaled up by Adam's normalisation. Max pooling differs: JAX shares a window's gradient
    among tied maxima, torch gives it to the first (the recipes pool by averaging).
    """

    framework = "jax"

    def __init__(self, config):
        import jax

        from numpylenet import LeNet5

        if config.dtype != "float32":
            raise ValueError(f"the JAX learner runs float32 only, not {config.dtype}")
        self.backend = f"jax {jax.__version__} jit"
        self.params = jax_params(LeNet5(activation=config.activation, pool=config.pool, seed=config.seed,
                                        backend="numpy").state_dict())
        self._step, self._forward, optimizer = _jax_functions(
            config.activation, config.pool, config.label_smoothing, config.optimizer, config.momentum,
            config.nesterov, config.weight_decay)
        self.optimizer_state = optimizer.init(self.params)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One step on x (N, 1, 32, 32), labels y (N,) at learning rate ``lr``; the loss."""
        self.params, self.optimizer_state, loss = self._step(self.params, self.optimizer_state, x,
                                                             y.astype(np.int32), np.float32(lr))
        return float(loss)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The logits (N, 10) of x (N, 1, 32, 32)."""
        return np.asarray(self._forward(self.params, x))


@functools.lru_cache(maxsize=None)
def _jax_functions(activation: str, pool: str, label_smoothing: float, optimizer: str, momentum: float,
                   nesterov: bool, weight_decay: float):
    """(jitted training step, jitted forward, optax transformation) for these settings."""
    import jax
    import optax

    def make_update(learning_rate):
        update = (optax.adam(learning_rate) if optimizer == "adam" else
                  optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
        return optax.chain(optax.add_decayed_weights(weight_decay), update)

    transformation = optax.inject_hyperparams(make_update)(learning_rate=0.0)

    def loss_function(params, images, labels):
        logits = jax_logits(params, images, activation, pool)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()

    @jax.jit
    def step(params, state, images, labels, learning_rate):
        loss, grads = jax.value_and_grad(loss_function)(params, images, labels)
        state.hyperparams["learning_rate"] = learning_rate
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    forward = jax.jit(functools.partial(jax_logits, activation=activation, pool=pool))
    return step, forward, transformation


def jax_step(state: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray) -> Callable[[], object]:
    """One JAX training step on x (N, 1, 32, 32), labels (N,): ``jax.jit`` of the gradient of
    the mean softmax cross-entropy and an ``optax.adam(1e-3)`` update; each call carries the
    weights and the optimiser state on to the next and waits for the result
    (``jax.block_until_ready``), so a timed call measures the work, not its dispatch."""
    import jax
    import optax

    optimizer = optax.adam(1e-3)

    def loss_function(params, images, targets):
        logits = jax_logits(params, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(params, optimizer_state, images, targets):
        loss, grads = jax.value_and_grad(loss_function)(params, images, targets)
        updates, optimizer_state = optimizer.update(grads, optimizer_state, params)
        return optax.apply_updates(params, updates), optimizer_state, loss

    params = jax_params(state)
    carried = {"params": params, "optimizer": optimizer.init(params)}
    images, targets = jax.device_put(x), jax.device_put(labels.astype(np.int32))

    def run():
        carried["params"], carried["optimizer"], loss = step(carried["params"], carried["optimizer"],
                                                             images, targets)
        return jax.block_until_ready(loss)

    return run


def jax_forward(state: Mapping[str, np.ndarray], x: np.ndarray) -> Callable[[], object]:
    """The logits (N, 10) of x (N, 1, 32, 32) from ``jax.jit(jax_logits)``, waited for."""
    import jax

    forward, params, images = jax.jit(jax_logits), jax_params(state), jax.device_put(x)
    return lambda: jax.block_until_ready(forward(params, images))


def check_jax_forward(state: Mapping[str, np.ndarray], x: np.ndarray) -> float:
    """Check that :func:`jax_logits` equals numpylenet's NumPy forward on the weights ``state``
    and x (N, 1, 32, 32), float32, within rtol 1e-4 (atol 1e-5); return the largest difference.

    Raises AssertionError naming the difference when they disagree.
    """
    from numpylenet import LeNet5

    model = LeNet5(backend="numpy")
    model.load_state_dict(state)
    expected = model.forward(x)
    got = np.asarray(jax_logits(jax_params(state), x))
    # One-line messages: add_peers prints the first line as the reason for skipping JAX.
    if got.shape != expected.shape:
        raise AssertionError(f"JAX's LeNet-5 forward differs from numpylenet's: logits of shape "
                             f"{got.shape}, expected {expected.shape}")
    largest = float(np.max(np.abs(got - expected)))
    if not np.allclose(got, expected, rtol=JAX_FORWARD_RTOL, atol=JAX_FORWARD_ATOL):
        raise AssertionError(f"JAX's LeNet-5 forward differs from numpylenet's: largest difference "
                             f"{largest:.3g} (rtol {JAX_FORWARD_RTOL:g}, atol {JAX_FORWARD_ATOL:g})")
    return largest


def peer_builders(state: Mapping[str, np.ndarray], x: np.ndarray,
                  labels: np.ndarray | None = None) -> dict[str, Callable[[], Callable[[], object]]]:
    """Peer -> a function building that peer's timed function on x (N, 1, 32, 32): a training
    step when ``labels`` (N,) are given, else a forward pass. JAX's builder first runs
    :func:`check_jax_forward` on x."""
    def build_jax():
        check_jax_forward(state, x)
        return jax_forward(state, x) if labels is None else jax_step(state, x, labels)

    return {"torch.compile": (lambda: torch_compiled_forward(state, x)) if labels is None
            else (lambda: torch_compiled_step(state, x, labels)),
            "jax": build_jax}


def add_peers(functions: MutableMapping[str, Callable[[], object]],
              builders: Mapping[str, Callable[[], Callable[[], object]]], peers: Sequence[str],
              skipped: MutableMapping[str, str], batch_size: int) -> None:
    """Add to ``functions`` each of ``peers`` that ``builders`` can build and that survives its
    first call (torch.compile and jax.jit compile there, so this is where they fail).

    A peer left out is recorded in ``skipped`` (peer -> reason), printed in one line with the
    reason, and not tried again at other batch sizes; the benchmark goes on without it.
    """
    for peer in peers:
        if peer in skipped:
            continue
        reason = jax_unavailable_reason() if peer == "jax" else None
        if reason is None:
            try:
                function = builders[peer]()
                # Compile for this batch size before timing: torch.compile compiles again on the
                # second call, which meets the optimiser state that the first one created.
                function()
                function()
            except Exception as error:     # any failure of an optional peer: report it, carry on
                lines = str(error).strip().splitlines()
                reason = f"{type(error).__name__} at batch {batch_size}" + (f": {lines[0]}" if lines else "")
        if reason is not None:
            skipped[peer] = reason
            print(f"skipping peer {peer}: {reason}", flush=True)
            continue
        functions[peer] = function
