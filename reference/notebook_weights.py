"""Read a torch ``state_dict`` saved from the seed notebook's ``LeNet`` into NumPy arrays.

``torch.load(..., weights_only=True)`` unpickles only tensors and plain containers, so a hostile
file cannot run code; the result must be float32 or float64 tensors with finite values (a complex
tensor would lose its imaginary part, float16 or NaN would compute quietly wrong numbers), and is
loaded into the notebook's own ``LeNet`` (strictly: every name and shape must match) before its
values are handed out. Every failure is a ValueError of one line.
"""
from __future__ import annotations

import os
import warnings
import zipfile

import numpy as np
import torch

from numpylenet.checkpoint import check_weights
from numpylenet.files import open_regular
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
        The file is missing or not a regular file, unreadable, not a state_dict, holds weights that
        are not finite float32/float64, or is not the notebook's LeNet.
    """
    try:
        with open_regular(path) as file, warnings.catch_warnings():
            # torch warns of old pickle protocols before failing on them: the error below says it once
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except OSError as error:
        raise ValueError(str(error)) from None
    except Exception as error:   # whatever a damaged or hostile file makes torch's reader raise
        legacy = "" if zipfile.is_zipfile(path) else (
            "; not the zip format torch.save writes by default: a file saved with "
            "_use_new_zipfile_serialization=False, or not torch's, which cannot be read without unpickling "
            "arbitrary objects (re-save it with torch.save's defaults)")
        raise ValueError(f"cannot read {path} as a torch state_dict ({_reason(error)}){legacy}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    arrays = {}
    for name, value in state.items():
        try:
            arrays[name] = value.detach().cpu().numpy()
        except (TypeError, RuntimeError):   # bfloat16, sparse, quantized...: NumPy has no such array
            raise ValueError(f"{path}: tensor {name} is {value.dtype}; numpylenet takes float32 or "
                             f"float64 weights") from None
    try:
        check_weights(arrays, "tensor")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    model = LeNet()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} is not a state_dict of the notebook's LeNet: "
                         f"{' '.join(str(error).split())}") from None
    # The arrays as saved (a float32 LeNet() only checked the names and shapes).
    return {name: arrays[name].copy() for name in model.state_dict()}


# Lines of torch.load's messages that advise loading with weights_only=False: never passed on.
ADVICE = ("weights_only", "Weights only load failed", "arbitrary code", "trusted source",
          "Check the documentation", "Please file an issue", "safe_globals", "trust this class")


def _reason(error: Exception) -> str:
    """torch.load's error in one line, without its advice to unpickle arbitrary objects."""
    kept = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(error).splitlines()
            if line.strip() and not any(advice in line for advice in ADVICE)]
    detail = " ".join(part for part in kept if part)
    if isinstance(error, EOFError):
        detail = detail or "the file is empty or cut short"
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__
