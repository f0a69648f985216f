"""Inference throughput and latency: forward passes only, numpylenet against torch eager, torch.compile and JAX.

    python -m benchmarks.inference [--batch-sizes 1 1000] [--peers torch.compile jax] [--threads 2]
                                   [--repeats 5] [--quick] [--out DIR]

For each batch size, times the logits of one random batch from every framework, all with the same
float32 weights (numpylenet's ``LeNet5(seed=0)``) and inputs, round-robin in one process (median
of ``--repeats``, see :mod:`benchmarks.common`):

* ``LeNet5.forward``, numba and numpy backends;
* torch eager: the notebook's LeNet under ``torch.no_grad()`` (as ``reference.train`` evaluates);
* the peers of :mod:`benchmarks.peers`: the ``torch.compile``d model under
  ``torch.inference_mode()``, and ``jax.jit`` of the JAX forward when ``jax`` is installed
  (each compiled per batch size before the timing; skipped with a one-line reason if it fails).

Reports each framework's images/s and share of the machine's FP32 peak (a forward pass is
0.83 MFLOP per image) side by side, the latency at batch 1 (median microseconds per call), and
numpylenet's speed relative to each peer. Writes ``inference.json``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from benchmarks import common, peers

NAME = "inference"
# Peers left out (peer -> why), filled while the contenders are built and published with them.
SKIPPED: dict[str, str] = {}


def forward_functions(batch_size: int, rng: np.random.Generator,
                      args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """Framework -> a function computing the logits (batch_size, 10) of one random batch
    (batch_size, 1, 32, 32): torch eager, numpylenet's backends, and ``args.peers``."""
    import torch

    from numpylenet import LeNet5
    from numpylenet.backend import numba_unavailable_reason

    x = rng.random((batch_size, 1, 32, 32), dtype=np.float32)
    state = peers.initial_state()
    torch_model = peers.torch_model(state)
    images = torch.from_numpy(x)

    def torch_forward():
        with torch.no_grad():
            return torch_model(images)

    functions = {"torch": torch_forward}
    backends = ("numba", "numpy") if numba_unavailable_reason() is None else ("numpy",)
    for backend in backends:
        model = LeNet5(backend=backend)
        model.load_state_dict(state)
        functions[f"numpylenet ({backend})"] = lambda model=model: model.forward(x)
    peers.add_peers(functions, peers.peer_builders(state, x), args.peers, SKIPPED,
                    batch_size)
    return functions


def main(argv: list[str] | None = None) -> dict:
    flops = common.forward_flops_per_image()
    return common.throughput_main(argv, NAME, __doc__.splitlines()[0], forward_functions, flops,
                                  batch_sizes=[1, 1000], quick_batch_sizes=[1, 100],
                                  min_repeat_seconds=0.2, latency_batch=1,
                                  details={"forward_flops_per_image": flops, "skipped_peers": SKIPPED})


if __name__ == "__main__":
    main()
