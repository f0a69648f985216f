"""Training throughput: one full training step, numpylenet (numba, numpy) against torch eager.

    python -m benchmarks.step [--batch-sizes 1 32 64 256] [--threads 2] [--repeats 5] [--quick] [--out DIR]

A step is what training does per batch: zero the gradients, forward, softmax cross-entropy,
backward, one Adam update (lr 1e-3). All contenders start from the same float32 weights and train
on the same random batch; torch is the notebook's LeNet with ``nn.CrossEntropyLoss`` and
``torch.optim.Adam``, with as many threads as Numba and BLAS (``--threads``). Contenders run
round-robin in one process and the median of ``--repeats`` is reported (see
:mod:`benchmarks.common`), with images/s, the speed relative to torch and the share of the
machine's FP32 peak (a training step is 2.26 MFLOP per image). Writes ``step.json``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from benchmarks import common

NAME = "step"


def step_functions(x: np.ndarray, labels: np.ndarray) -> dict[str, Callable[[], object]]:
    """Framework -> a function doing one training step on (x (N, 1, 32, 32), labels (N,))."""
    import torch

    from numpylenet import Adam, LeNet5, softmax_cross_entropy
    from numpylenet.backend import numba_unavailable_reason
    from reference.lenet import TorchLeNet5, copy_numpy_to_torch

    torch_model = TorchLeNet5()
    copy_numpy_to_torch(LeNet5(seed=0, backend="numpy"), torch_model)
    torch_optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
    loss_function = torch.nn.CrossEntropyLoss()
    images, targets = torch.from_numpy(x), torch.from_numpy(labels)

    def torch_step():
        torch_optimizer.zero_grad()
        loss = loss_function(torch_model(images), targets)
        loss.backward()
        torch_optimizer.step()
        return loss

    functions = {"torch": torch_step}
    backends = ("numba", "numpy") if numba_unavailable_reason() is None else ("numpy",)
    for backend in backends:
        model = LeNet5(seed=0, backend=backend)
        optimizer = Adam(model.parameters(), lr=1e-3)

        def numpylenet_step(model=model, optimizer=optimizer):
            model.zero_grad()
            loss, grad_logits = softmax_cross_entropy(model.forward(x), labels)
            model.backward(grad_logits, input_grad=False)     # torch's step skips dL/dx too
            optimizer.step()
            return loss

        functions[f"numpylenet ({backend})"] = numpylenet_step
    return functions


def batch_step_functions(batch_size: int, rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    """:func:`step_functions` on a random batch: images (batch_size, 1, 32, 32), labels 0..9."""
    return step_functions(rng.random((batch_size, 1, 32, 32), dtype=np.float32),
                          rng.integers(0, 10, batch_size))


def main(argv: list[str] | None = None) -> dict:
    flops = common.training_flops_per_image()
    return common.throughput_main(argv, NAME, __doc__.splitlines()[0], batch_step_functions, flops,
                                  batch_sizes=[1, 32, 64, 256], quick_batch_sizes=[1, 32],
                                  min_repeat_seconds=0.3, warmup=3,
                                  details={"optimizer": "Adam(lr=1e-3)",
                                           "training_flops_per_image": flops})


if __name__ == "__main__":
    main()
