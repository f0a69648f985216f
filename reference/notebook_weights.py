"""Read a torch ``state_dict`` saved from the seed notebook's ``LeNet`` into NumPy arrays.

``torch.load(..., weights_only=True)`` unpickles only tensors and plain containers, so a hostile
file cannot run code; the result is loaded into the notebook's own ``LeNet`` (strictly: every name
and shape must match) before its values are handed out.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from reference.lenet import LeNet

__all__ = ["load_notebook_state_dict"]


def load_notebook_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The weights in ``path`` (``torch.save(model.state_dict(), path)`` of the notebook's LeNet).

    Returns
    -------
    dict of str to ndarray
        conv1.weight (6, 1, 5, 5), conv1.bias (6,), ... fc2.bias (10,), in the saved dtype.

    Raises
    ------
    ValueError
        The file is missing, unreadable, not a state_dict, or not the notebook's LeNet.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"cannot read {path} as a torch state_dict: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    model = LeNet()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} is not a state_dict of the notebook's LeNet: "
                         f"{' '.join(str(error).split())}") from None
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
