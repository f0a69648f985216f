"""The PyTorch side of every parity check: the seed notebook's LeNet and weight copying.

``LeNet`` is the network exactly as the seed notebook (``cnns_1_notebook``) writes it: ReLU after
every layer but the last and average pooling. ``TorchLeNet5`` is the same module with the activation
and the pooling chosen by name, mirroring ``numpylenet.LeNet5(activation=..., pool=...)``.

Both share the notebook's parameter names, so a ``state_dict`` moves between them and
``numpylenet.LeNet5`` unchanged::

    conv1.weight (6, 1, 5, 5)     conv1.bias (6,)
    conv2.weight (16, 6, 5, 5)    conv2.bias (16,)
    conv3.weight (120, 16, 5, 5)  conv3.bias (120,)
    fc1.weight   (84, 120)        fc1.bias   (84,)
    fc2.weight   (10, 84)         fc2.bias   (10,)

This package needs torch; ``numpylenet`` itself never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from numpylenet.names import ACTIVATION_NAMES, POOL_NAMES

# The torch function for each name of numpylenet.names.ACTIVATION_NAMES and POOL_NAMES
# (tests/test_layout.py checks that every name has one).
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
POOLS = {"avg": F.avg_pool2d, "max": F.max_pool2d}


class LeNet(nn.Module):
    """The seed notebook's LeNet-5, verbatim: input (N, 1, 32, 32) -> logits (N, 10)."""

    def __init__(self):
        super(LeNet, self).__init__()

        # conv1: 1 input channel, 6 output channels, 5x5 kernel
        self.conv1 = nn.Conv2d(1, 6, 5)

        # conv2: 6 input channels, 16 output channels, 5x5 kernel
        self.conv2 = nn.Conv2d(6, 16, 5)

        # conv3: 16 input channels of 5x5, 120 outputs of 1x1
        self.conv3 = nn.Conv2d(16, 120, 5)

        # fc1: 120 inputs, 84 outputs
        self.fc1 = nn.Linear(120, 84)
        # fc2: 84 inputs, 10 outputs (the digits)
        self.fc2 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.avg_pool2d(x, 2)

        x = F.relu(self.conv2(x))
        x = F.avg_pool2d(x, 2)

        x = F.relu(self.conv3(x))

        x = x.view(-1, 120)

        x = F.relu(self.fc1(x))

        # No softmax: nn.CrossEntropyLoss takes the raw logits.
        x = self.fc2(x)
        return x


class TorchLeNet5(LeNet):
    """The notebook's LeNet with the activation and the pooling chosen by name.

    Parameters
    ----------
    activation : one of numpylenet.names.ACTIVATION_NAMES: "relu", "tanh", "sigmoid"
        Applied after conv1, conv2, conv3 and fc1, as in ``numpylenet.LeNet5``.
    pool : one of numpylenet.names.POOL_NAMES: "avg", "max"
        2x2 pooling with stride 2 after the first two activations.
    """

    def __init__(self, activation: str = "relu", pool: str = "avg"):
        super().__init__()
        if activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATION_NAMES)}, got {activation!r}")
        if pool not in POOL_NAMES:
            raise ValueError(f"pool must be one of {', '.join(POOL_NAMES)}, got {pool!r}")
        self.activation = ACTIVATIONS[activation]
        self.pool = POOLS[pool]

    def forward(self, x):
        x = self.pool(self.activation(self.conv1(x)), 2)
        x = self.pool(self.activation(self.conv2(x)), 2)
        x = self.activation(self.conv3(x)).view(-1, 120)
        x = self.activation(self.fc1(x))
        return self.fc2(x)


def _check_same_layout(ours: Mapping[str, tuple], theirs: Mapping[str, tuple], source: str,
                       target: str) -> None:
    """Raise ValueError unless both name -> shape maps agree, naming every difference."""
    problems = [f"{name} is in the {source} model but not in the {target} model"
                for name in ours if name not in theirs]
    problems += [f"{name} is in the {target} model but not in the {source} model"
                 for name in theirs if name not in ours]
    problems += [f"{name} has shape {ours[name]} in the {source} model but {theirs[name]} in the "
                 f"{target} model" for name in ours if name in theirs and ours[name] != theirs[name]]
    if problems:
        raise ValueError("cannot copy weights: " + "; ".join(problems))


def copy_numpy_to_torch(model, torch_model: nn.Module) -> None:
    """Copy every parameter of a ``numpylenet.LeNet5`` into a torch LeNet, in place.

    Values are cast to the torch model's dtype; the names and shapes must match exactly.
    """
    source = model.state_dict()
    target = torch_model.state_dict()
    _check_same_layout({k: tuple(v.shape) for k, v in source.items()},
                       {k: tuple(v.shape) for k, v in target.items()}, "numpy", "torch")
    with torch.no_grad():
        for name, value in source.items():
            target[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def copy_torch_to_numpy(torch_model: nn.Module, model) -> None:
    """Copy every parameter of a torch LeNet into a ``numpylenet.LeNet5``, in place.

    Values are cast to the numpy model's dtype; the names and shapes must match exactly.
    """
    source = torch_model.state_dict()
    target = model.state_dict()
    _check_same_layout({k: tuple(v.shape) for k, v in source.items()},
                       {k: tuple(v.shape) for k, v in target.items()}, "torch", "numpy")
    model.load_state_dict({name: value.detach().cpu().numpy().astype(target[name].dtype)
                           for name, value in source.items()})
