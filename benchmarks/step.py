"""Training throughput: one full training step, numpylenet (numba, numpy) against torch eager, torch.compile and JAX.

    python -m benchmarks.step [--batch-sizes 1 32 64 256] [--peers torch.compile jax] [--threads 2]
                              [--repeats 5] [--quick] [--out DIR]

A step is what training does per batch: zero the gradients, forward, softmax cross-entropy,
backward, one Adam update (lr 1e-3). Every framework starts from the same float32 weights
(numpylenet's ``LeNet5(seed=0)``) and trains on the same random batch, with as many threads as
Numba and BLAS (``--threads``):

* torch eager: the notebook's LeNet with ``F.cross_entropy`` and ``torch.optim.Adam``;
* torch.compile and, when ``jax`` is installed (``pip install -e '.[bench]'``), JAX: the peers of
  :mod:`benchmarks.peers` - the whole step in one ``torch.compile``d function, and ``jax.jit`` of
  ``jax.grad`` plus ``optax.adam``. Each compiles per batch size on its first calls, before the
  timing; a peer that cannot run is skipped with a one-line reason;
* numpylenet: ``model.zero_grad()``, ``model.forward_backward(x, labels)`` (forward, softmax
  cross-entropy, backward without dL/dx), ``Adam.step()``, exactly as
  :meth:`numpylenet.loop.NumpyLearner.train_step` trains.

All run round-robin in one process (median of ``--repeats``, see :mod:`benchmarks.common`). The
tables give every framework's images/s and share of the machine's FP32 peak (a training step is
2.26 MFLOP per image) side by side, then numpylenet's speed relative to each peer. Writes
``step.json``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from benchmarks import common, peers

NAME = "step"


def step_functions(x: np.ndarray, labels: np.ndarray, state: dict[str, np.ndarray] | None = None
                   ) -> dict[str, Callable[[], object]]:
    """Torch eager and numpylenet (numba when it runs here, numpy) -> a function doing one training
    step on (x (N, 1, 32, 32) float32, labels (N,)), each from the weights ``state`` (default
    :func:`benchmarks.peers.initial_state`)."""
    import torch
    import torch.nn.functional as F

    from numpylenet import Adam, LeNet5
    from numpylenet.backend import numba_unavailable_reason

    state = peers.initial_state() if state is None else state
    torch_model = peers.torch_model(state)
    torch_optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
    images, targets = torch.from_numpy(x), torch.from_numpy(labels)

    def torch_step():
        torch_optimizer.zero_grad()
        loss = F.cross_entropy(torch_model(images), targets)
        loss.backward()
        torch_optimizer.step()
        return loss

    functions = {"torch": torch_step}
    backends = ("numba", "numpy") if numba_unavailable_reason() is None else ("numpy",)
    for backend in backends:
        model = LeNet5(backend=backend)
        model.load_state_dict(state)
        optimizer = Adam(model.parameters(), lr=1e-3)

        def numpylenet_step(model=model, optimizer=optimizer):
            model.zero_grad()
            loss = model.forward_backward(x, labels)      # as NumpyLearner.train_step: no dL/dx
            optimizer.step()
            return loss

        functions[f"numpylenet ({backend})"] = numpylenet_step
    return functions


# Peers left out (peer -> why), filled while the contenders are built and published with them.
SKIPPED: dict[str, str] = {}


def batch_step_functions(batch_size: int, rng: np.random.Generator,
                         args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """:func:`step_functions` and the peers ``args.peers`` on a random batch: images
    (batch_size, 1, 32, 32) in [0, 1), labels 0..9."""
    x = rng.random((batch_size, 1, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 10, batch_size)
    state = peers.initial_state()
    functions = step_functions(x, labels, state)
    peers.add_peers(functions, peers.peer_builders(state, x, labels), args.peers, SKIPPED, batch_size)
    return functions


def main(argv: list[str] | None = None) -> dict:
    flops = common.training_flops_per_image()
    return common.throughput_main(argv, NAME, __doc__.splitlines()[0], batch_step_functions, flops,
                                  batch_sizes=[1, 32, 64, 256], quick_batch_sizes=[1, 32],
                                  min_repeat_seconds=0.3, warmup=3,
                                  details={"optimizer": "Adam(lr=1e-3)",
                                           "training_flops_per_image": flops,
                                           "skipped_peers": SKIPPED})


if __name__ == "__main__":
    main()
