"""Training checkpoints: one ``.npz`` file holding everything needed to continue a run exactly.

Layout (every entry a plain NumPy array, so ``np.load(..., allow_pickle=False)`` reads it)::

    format_version      int64 scalar, FORMAT_VERSION
    framework           str scalar: "numpylenet", or "torch" for runs of ``reference.train``
    config              str scalar: JSON of the resolved training settings
    progress            str scalar: JSON of where the run stands (see below)
    history             str scalar: JSON list of the per-epoch metrics so far
    model/<name>        the weights, torch's names: model/conv1.weight (6, 1, 5, 5) ... model/fc2.bias (10,)
    optimizer/<name>    the optimiser's state: optimizer/step, optimizer/exp_avg.0, ...

``progress`` holds ``epoch`` (0-based, the epoch in progress) and ``step`` (the next step within it),
the running training-loss sums of that epoch, the best validation loss so far, and the seconds spent.
Every random draw of a run comes from a generator keyed by ``(seed, stream, epoch, step)`` (see
:mod:`numpylenet.pipeline`), so the config's seed with ``epoch`` and ``step`` is the complete RNG
state: a run resumed from here draws exactly the numbers the uninterrupted run would have drawn.

Files are written atomically: to a temporary file in the same folder, flushed to disk, then renamed
over the target, so an interruption never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint"]

FORMAT_VERSION = 1
JSON_ENTRIES = ("config", "progress", "history")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the run it is loaded into."""


@dataclass
class Checkpoint:
    """The contents of one checkpoint file (see the module docstring for the meaning of each part)."""

    framework: str
    config: dict
    progress: dict
    history: list
    model: dict[str, np.ndarray] = field(default_factory=dict)
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    arrays = {"format_version": np.array(FORMAT_VERSION, dtype=np.int64),
              "framework": np.array(checkpoint.framework)}
    arrays.update({name: np.array(json.dumps(getattr(checkpoint, name))) for name in JSON_ENTRIES})
    arrays.update({f"model/{name}": value for name, value in checkpoint.model.items()})
    arrays.update({f"optimizer/{name}": value for name, value in checkpoint.optimizer.items()})
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, without unpickling anything.

    Raises
    ------
    CheckpointError
        If the file is missing, is not a readable ``.npz``, or lacks an entry; the message names
        the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            # Read every entry now: a damaged member only shows when it is decompressed.
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a numpylenet checkpoint "
                              f"({type(error).__name__}: {error})") from None
    missing = [name for name in ("format_version", "framework", *JSON_ENTRIES) if name not in arrays]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a numpylenet checkpoint: "
                              f"missing {', '.join(missing)}")
    version = arrays["format_version"]
    if version.shape != () or int(version) != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, "
                              f"this numpylenet reads version {FORMAT_VERSION}")
    try:
        parts = {name: json.loads(str(arrays[name])) for name in JSON_ENTRIES}
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: bad JSON ({error})") from None
    expected = {"config": dict, "progress": dict, "history": list}
    wrong = [name for name, kind in expected.items() if not isinstance(parts[name], kind)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is corrupt: malformed {', '.join(wrong)}")
    model = {name[len("model/"):]: value for name, value in arrays.items() if name.startswith("model/")}
    optimizer = {name[len("optimizer/"):]: value for name, value in arrays.items()
                 if name.startswith("optimizer/")}
    if not model:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    return Checkpoint(framework=str(arrays["framework"]), model=model, optimizer=optimizer, **parts)
