"""Inference throughput: forward passes only, numpylenet against torch eager, images per second.

    python -m benchmarks.inference [--batch-sizes 1 1000] [--threads 2] [--repeats 5] [--quick] [--out DIR]

For each batch size, times ``LeNet5.forward`` (numba and numpy backends) and the notebook's torch
LeNet under ``torch.no_grad()`` (as ``reference.train`` evaluates), all with the same float32
weights and inputs, round-robin in one process (median of ``--repeats``, see
:mod:`benchmarks.common`). Reports images/s, the speed relative to torch, and the share of the
machine's FP32 peak (a forward pass is 0.83 MFLOP per image). Writes ``inference.json``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from benchmarks import common

NAME = "inference"


def forward_functions(batch_size: int, rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    """Framework -> a function computing the logits of one random batch (batch_size, 1, 32, 32)."""
    import torch

    from numpylenet import LeNet5
    from numpylenet.backend import numba_unavailable_reason
    from reference.lenet import TorchLeNet5, copy_numpy_to_torch

    x = rng.random((batch_size, 1, 32, 32), dtype=np.float32)
    functions = {}
    torch_model = TorchLeNet5()
    copy_numpy_to_torch(LeNet5(seed=0, backend="numpy"), torch_model)
    images = torch.from_numpy(x)

    def torch_forward():
        with torch.no_grad():
            return torch_model(images)

    functions["torch"] = torch_forward
    backends = ("numba", "numpy") if numba_unavailable_reason() is None else ("numpy",)
    for backend in backends:
        model = LeNet5(seed=0, backend=backend)
        functions[f"numpylenet ({backend})"] = lambda model=model: model.forward(x)
    return functions


def main(argv: list[str] | None = None) -> dict:
    flops = common.forward_flops_per_image()
    return common.throughput_main(argv, NAME, __doc__.splitlines()[0], forward_functions, flops,
                                  batch_sizes=[1, 1000], quick_batch_sizes=[1, 100],
                                  min_repeat_seconds=0.2,
                                  details={"forward_flops_per_image": flops})


if __name__ == "__main__":
    main()
