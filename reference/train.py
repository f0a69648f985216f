"""Train the torch LeNet with numpylenet's recipes and data: ``python -m reference.train [options]``.

The flags, the recipes, the batches, the learning-rate schedule, the loop, the checkpoints and the
outputs are ``numpylenet.train``'s own (this module only supplies a torch *learner* to it), so for
the same flags and seed the torch model sees exactly the pixels, in exactly the order, and at
exactly the learning rates that the NumPy model sees. It also starts from the same weights:
``numpylenet.LeNet5(seed=...)``'s initialisation is copied into the torch model. What remains
different is only the arithmetic: torch's kernels and torch.optim's Adam or SGD. That makes it the
baseline for the accuracy-parity benchmark (``benchmarks/parity.py``).

``--backend`` does not apply (torch computes); ``--threads`` sets ``torch.set_num_threads``.
``TorchLearner(config, compile=True)`` runs the model through ``torch.compile`` (the contender
"torch.compile" of ``benchmarks/time_to_accuracy.py``).
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from numpylenet.model import LeNet5
from numpylenet.names import DTYPE_NAMES
from numpylenet.optim import parse_state_key, state_key
from numpylenet.recipes import TrainConfig
from numpylenet.train import main as numpylenet_main
from reference.lenet import TorchLeNet5, copy_numpy_to_torch

__all__ = ["TorchLearner", "main"]

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# torch.optim's per-parameter state entries, named as numpylenet's optimisers name theirs.
BUFFERS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


class TorchLearner:
    """The notebook's LeNet (activation and pooling by name) trained by torch.optim.Adam or SGD.

    The optimiser state is exported in numpylenet's flat layout - ``step`` and one array per
    parameter and buffer, ``exp_avg.0`` ... - so checkpoints hold no torch objects.

    With ``compile=True`` the forward pass (and with it, through AOTAutograd, the backward pass)
    runs as ``torch.compile(model, dynamic=False)``: one static graph per batch shape, compiled on
    its first call. The optimiser stays torch.optim's eager step.
    """

    framework = "torch"
    compile_seconds = 0.0

    def __init__(self, config: TrainConfig, *, compile: bool = False):
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        _data_kernels_on_one_thread()
        mode = "torch.compile" if compile else "torch"
        self.threads = torch.get_num_threads()
        self.backend = f"{mode} {torch.__version__}, {self.threads} threads"
        self.kind = config.optimizer
        self.dtype = TORCH_DTYPES[config.dtype]
        self.model = TorchLeNet5(config.activation, config.pool).to(self.dtype)
        copy_numpy_to_torch(LeNet5(activation=config.activation, pool=config.pool,
                                   dtype=np.dtype(config.dtype), seed=config.seed, backend="numpy"),
                           self.model)
        self.forward = torch.compile(self.model, dynamic=False) if compile else self.model
        self.params = list(self.model.parameters())
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay, nesterov=config.nesterov)
        self.label_smoothing = config.label_smoothing
        self.steps = 0

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.forward(torch.from_numpy(x)), torch.from_numpy(y),
                               label_smoothing=self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.item()

    def logits(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.forward(torch.from_numpy(x)).numpy()

    def model_state(self) -> dict[str, np.ndarray]:
        return {name: value.detach().numpy().copy() for name, value in self.model.state_dict().items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        state = {"step": np.array(self.steps, dtype=np.int64)}
        for index, param in enumerate(self.params):
            for name in BUFFERS[self.kind]:
                buffer = self.optimizer.state.get(param, {}).get(name)
                if buffer is not None:
                    state[state_key(name, index)] = buffer.detach().numpy().copy()
        return state

    def load_state(self, model: dict[str, np.ndarray], optimizer: dict[str, np.ndarray] | None) -> None:
        try:
            self.model.load_state_dict({name: torch.from_numpy(np.asarray(value)).to(self.dtype)
                                        for name, value in model.items()})
        except RuntimeError as error:
            raise ValueError(" ".join(str(error).split())) from None
        if optimizer is None:
            return
        optimizer = dict(optimizer)
        self.steps = int(optimizer.pop("step"))
        per_param: dict[int, dict] = {}
        for key, value in optimizer.items():
            name, index = parse_state_key(key, BUFFERS[self.kind], len(self.params))
            per_param.setdefault(index, {})[name] = torch.from_numpy(np.array(value)).to(self.dtype)
        if self.kind == "adam":
            for entry in per_param.values():
                entry["step"] = torch.tensor(float(self.steps))
        self.optimizer.load_state_dict({"state": per_param,
                                        "param_groups": self.optimizer.state_dict()["param_groups"]})


def _data_kernels_on_one_thread() -> None:
    """Run the data pipeline's Numba kernel (the default recipe's affine augmentation) on one thread.

    It runs between torch's steps while torch's own OpenMP pool (torch bundles its own libgomp)
    still spins on the cores; a second pool of Numba threads waking up then fights it for them.
    Measured on the 2-core machine under load: 20 ms per batch of 64 with two Numba threads, 0.3
    ms with one, and a default-recipe epoch in torch at 84 images/s. On one thread the warp costs
    about 4 us an image, a few per cent of a torch training step.
    """
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(1)


DESCRIPTION = ("Train the PyTorch reference LeNet-5 with numpylenet.train's recipes, flags, data and "
               "outputs (the same batches for the same seed). --backend is accepted, so that both take the "
               "same command line, and ignored: torch computes (config.json's resolved.backend says so).")


def main(argv: list[str] | None = None) -> int:
    return numpylenet_main(argv, make_learner=TorchLearner, prog="python -m reference.train",
                           description=DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
