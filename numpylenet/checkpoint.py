"""Training checkpoints: one ``.npz`` file holding everything needed to continue a run exactly.

Layout (every entry a plain NumPy array, so ``np.load(..., allow_pickle=False)`` reads it)::

    format_version      int64 scalar, FORMAT_VERSION
    framework           str scalar: "numpylenet", or "torch" for runs of ``reference.train``
    config              str scalar: JSON of the resolved training settings (a ``TrainConfig``)
    progress            str scalar: JSON of where the run stands (a :class:`Progress`)
    history             str scalar: JSON list of the per-epoch metrics so far
    model/<name>        the weights, torch's names: model/conv1.weight (6, 1, 5, 5) ... model/fc2.bias (10,)
    optimizer/<name>    the optimiser's state: optimizer/step, optimizer/exp_avg.0, ...

``progress`` holds ``epoch`` (0-based, the epoch in progress) and ``step`` (the next step within it),
the running training-loss sums of that epoch, the best validation loss so far, and the seconds spent.
Every random draw of a run comes from a generator keyed by ``(seed, stream, epoch, step)`` (see
:mod:`numpylenet.pipeline`), so the config's seed with ``epoch`` and ``step`` is the complete RNG
state: a run resumed from here draws exactly the numbers the uninterrupted run would have drawn.

Files are written atomically (:func:`numpylenet.files.atomic_write`), so an interruption never
leaves a half-written checkpoint behind; the JSON parts write NaN and infinities as ``null``.

Reading trusts nothing in the file: only the members asked for are loaded, each only after its
declared size is checked against a bound (a small crafted file cannot make the reader allocate
gigabytes; the other members are only checked for damage, streamed), nothing is unpickled, and every part is validated by type and range in one place
(:func:`check_parts`) - the config by :func:`numpylenet.recipes.make_config`, the progress by
:meth:`Progress.from_json`, the history, the optimiser state and the weights (float32 or float64,
all finite) here - so a damaged or doctored checkpoint is a :class:`CheckpointError`, never a crash
later on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DATASETS
from .files import atomic_write, json_text, open_regular
from .layers import check_weights
from .optim import check_state as check_optimizer_state
from .recipes import make_config

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "Progress", "save_checkpoint",
           "load_checkpoint", "check_parts", "check_history", "check_weights"]

FORMAT_VERSION = 1
JSON_ENTRIES = ("config", "progress", "history")
# What a reader may be asked to hold. LeNet-5's largest parameter (conv3.weight, 120 x 400) is
# 0.4 MB in float64 and a 1,000-epoch history is about 3 MB of JSON (as 4-byte characters), so these
# leave ample room while a crafted file that declares gigabytes is refused before it is read.
MAX_MEMBERS = 256
MAX_ARRAY_BYTES = 8 << 20
MAX_TEXT_BYTES = 32 << 20
MAX_TOTAL_BYTES = 128 << 20


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


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint (as JSON) so a resumed run picks up exactly here.

    Attributes
    ----------
    epoch : the epoch in progress, 0-based (== config.epochs once training is over)
    step : the next step within that epoch
    epoch_loss_sum, epoch_images : sum of (batch loss x batch size) and images seen so far this epoch
    step_losses : the loss of every step so far this epoch (for the loss trace of its record)
    best_valid_loss, best_epoch : the lowest validation loss so far and its epoch (1-based; 0: none)
    seconds : wall-clock seconds spent training, validating and writing the checkpoints between
        epochs, summed over sessions (summary.json's ``train_seconds``)
    dataset : the data set the run trains on (what "auto" resolved to)
    """

    epoch: int = 0
    step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    step_losses: list[float] = dataclasses.field(default_factory=list)
    best_valid_loss: float = math.inf
    best_epoch: int = 0
    seconds: float = 0.0
    dataset: str = ""

    def to_json(self) -> dict:
        # JSON has no infinity; a run that has not validated yet stores None.
        record = dataclasses.asdict(self)
        record["best_valid_loss"] = None if math.isinf(self.best_valid_loss) else self.best_valid_loss
        return record

    @classmethod
    def from_json(cls, record) -> Progress:
        """The progress saved as ``record`` (see :meth:`to_json`), checked field by field.

        Raises
        ------
        ValueError
            A field is missing, unknown, of the wrong type, out of range, or inconsistent with the
            others (``step_losses`` must hold one loss per step taken, each step at least one image).
        """
        if not isinstance(record, dict):
            raise ValueError(f"progress must be a JSON object, got {type(record).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(record) != sorted(names):
            raise ValueError(f"progress must have the fields {names}, got {sorted(record)}")
        record = dict(record)
        for name in ("epoch", "step", "epoch_images", "best_epoch"):
            _require(record[name], f"progress {name}", "an integer >= 0", _is_int)
        for name in ("epoch_loss_sum", "seconds"):
            record[name] = float(_require(record[name], f"progress {name}", "a finite number >= 0",
                                          _is_non_negative))
        _require(record["step_losses"], "progress step_losses", "a list of finite numbers",
                 lambda v: isinstance(v, list) and all(_is_finite(x) for x in v))
        _require(record["dataset"], "progress dataset", f"one of {', '.join(DATASETS)}", lambda v: v in DATASETS)
        best = record["best_valid_loss"]
        _require(best, "progress best_valid_loss", "null or a finite number >= 0",
                 lambda v: v is None or _is_non_negative(v))
        record["best_valid_loss"] = math.inf if best is None else float(best)
        step, images = record["step"], record["epoch_images"]
        if len(record["step_losses"]) != step or images < step or (step == 0 and images):
            raise ValueError(f"progress is inconsistent: step {step} with {len(record['step_losses'])} "
                             f"step losses and {images} images")
        if (best is None) != (record["best_epoch"] == 0) or record["best_epoch"] > record["epoch"]:
            raise ValueError(f"progress is inconsistent: best epoch {record['best_epoch']} with best "
                             f"validation loss {best} at epoch {record['epoch']}")
        return cls(**record)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:   # an integer beyond float's range (JSON integers have no bound)
        return False


def _is_non_negative(value) -> bool:
    return _is_finite(value) and value >= 0


def _require(value, name: str, requirement: str, test):
    if not test(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}"[:300])
    return value


# Per-epoch record fields the tools read (plots, summary); others (added by newer recipes) pass.
HISTORY_FIELDS = {"epoch": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
                  "train_loss": (_is_non_negative, "a finite number >= 0"),
                  "valid_loss": (_is_non_negative, "a finite number >= 0"),
                  "valid_accuracy": (lambda v: _is_finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
                  "train_images_per_second": (lambda v: v is None or _is_non_negative(v),
                                              "null or a finite number >= 0"),
                  "train_loss_trace": (lambda v: isinstance(v, list) and all(_is_finite(x) for x in v),
                                       "a list of finite numbers")}


def check_history(history, progress: Progress) -> None:
    """ValueError unless ``history`` is one record per finished epoch (``progress.epoch`` of them,
    numbered 1, 2, ...), each with the fields of HISTORY_FIELDS, and the best epoch's validation
    loss is the progress's best."""
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        raise ValueError("history must be a list of JSON objects")
    if len(history) != progress.epoch:
        raise ValueError(f"history holds {len(history)} epochs, the progress says {progress.epoch}")
    for index, record in enumerate(history):
        for name, (test, requirement) in HISTORY_FIELDS.items():
            _require(record.get(name), f"history[{index}] {name}", requirement, test)
        if record["epoch"] != index + 1:
            raise ValueError(f"history[{index}] is epoch {record['epoch']}, expected {index + 1}")
    if progress.best_epoch and history[progress.best_epoch - 1]["valid_loss"] != progress.best_valid_loss:
        raise ValueError(f"the best validation loss {progress.best_valid_loss} is not epoch "
                         f"{progress.best_epoch}'s")


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename).

    Raises :class:`numpylenet.files.WriteError` if the storage refuses (the old file stays).
    """
    arrays = {"format_version": np.array(FORMAT_VERSION, dtype=np.int64),
              "framework": np.array(checkpoint.framework)}
    arrays.update({name: np.array(json_text(getattr(checkpoint, name), indent=None))
                   for name in JSON_ENTRIES})
    arrays.update({f"model/{name}": value for name, value in checkpoint.model.items()})
    arrays.update({f"optimizer/{name}": value for name, value in checkpoint.optimizer.items()})
    with atomic_write(path) as file:
        np.savez(file, **arrays)


def load_checkpoint(path: str | os.PathLike, *, training_state: bool = True) -> Checkpoint:
    """Read and validate a checkpoint written by :func:`save_checkpoint`, without unpickling anything.

    Parameters
    ----------
    path : the ``.npz`` file
    training_state : also read the history and the optimiser state (needed to resume a run; not
        to evaluate its weights, which leaves ``history`` and ``optimizer`` empty)

    Raises
    ------
    CheckpointError
        The file is missing or not a regular file, is not a readable ``.npz``, declares members
        larger than a checkpoint can hold, lacks an entry, or holds a part of the wrong type or
        range; the message names the file and what is wrong.
    """
    path = Path(path)
    needed = ("format_version", "framework", "config", "progress", *(("history",) if training_state else ()))

    def wanted(name: str) -> bool:
        return name in needed or name.startswith("model/") or (training_state and name.startswith("optimizer/"))

    arrays = _read_members(path, wanted)
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a numpylenet checkpoint: "
                              f"missing {', '.join(missing)}")
    version = arrays["format_version"]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, "
                              f"this numpylenet reads version {FORMAT_VERSION}")
    texts = {name: arrays[name] for name in ("framework", *JSON_ENTRIES) if name in arrays}
    if any(text.shape != () or text.dtype.kind != "U" for text in texts.values()):
        raise CheckpointError(f"checkpoint {path} is corrupt: its text entries are not strings")
    try:
        parts = {name: json.loads(str(arrays[name])) for name in JSON_ENTRIES if name in arrays}
    except (json.JSONDecodeError, RecursionError) as error:   # RecursionError: nested too deep
        raise CheckpointError(f"checkpoint {path} is corrupt: bad JSON ({error})") from None
    model = {name[len("model/"):]: value for name, value in arrays.items() if name.startswith("model/")}
    optimizer = {name[len("optimizer/"):]: value for name, value in arrays.items()
                 if name.startswith("optimizer/")}
    if not model:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    try:
        check_parts(parts, model, optimizer if training_state else None)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: {error}") from None
    return Checkpoint(framework=str(arrays["framework"]), model=model, optimizer=optimizer,
                      config=parts["config"], progress=parts["progress"],
                      history=parts.get("history", []))


def check_parts(parts: dict, model: dict[str, np.ndarray], optimizer: dict[str, np.ndarray] | None) -> None:
    """The one validation of a checkpoint's contents, by type, range and consistency: ValueError
    naming the first field that is wrong.

    Parameters
    ----------
    parts : the JSON parts: "config", "progress" and, when ``optimizer`` is given, "history"
    model : the weights (float32 or float64, finite)
    optimizer : the optimiser state, or None when only the weights are needed (then the history is
        not checked either)
    """
    config = parts["config"]
    if not isinstance(config, dict):
        raise ValueError("config must be a JSON object")
    make_config(config.get("recipe"), base=config)
    progress = Progress.from_json(parts["progress"])
    if progress.epoch > config["epochs"] or (progress.epoch == config["epochs"] and progress.step):
        raise ValueError(f"progress epoch {progress.epoch}, step {progress.step} lies beyond the "
                         f"run's {config['epochs']} epochs")
    if optimizer is not None:
        check_history(parts["history"], progress)
        check_optimizer_state(optimizer)
    check_weights(model, "model")
    # A run saves its arrays in its own dtype: any other was not written by it (and loading would
    # round it silently).
    arrays = {**model, **({} if optimizer is None else optimizer)}
    foreign = sorted(name for name, value in arrays.items() if name != "step" and value.dtype != config["dtype"])
    if foreign:
        raise ValueError(f"{foreign[0]} is {arrays[foreign[0]].dtype}, but the run's dtype is {config['dtype']}")


def _read_members(path: Path, wanted) -> dict[str, np.ndarray]:
    """The ``.npy`` members of the zip at ``path`` whose names ``wanted`` accepts, each read only
    after its declared size is checked against its bound. The other members are not kept, only
    streamed through in 1 MiB pieces so that damage to them (a CRC mismatch) is still reported."""
    try:
        file = open_regular(path)
    except OSError as error:
        raise CheckpointError(f"checkpoint {error}") from None
    arrays, total = {}, 0
    try:
        with file, zipfile.ZipFile(file) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise CheckpointError(f"checkpoint {path} is not a numpylenet checkpoint: "
                                      f"{len(members):,} members")
            for member in members:
                name = member.filename.removesuffix(".npy")
                limit = MAX_ARRAY_BYTES if "/" in name else MAX_TEXT_BYTES
                if member.file_size > limit:
                    raise CheckpointError(f"checkpoint {path} is not a numpylenet checkpoint: its "
                                          f"member {name} declares {member.file_size:,} bytes")
                with archive.open(member) as stream:
                    if member.filename.endswith(".npy") and wanted(name):
                        total += member.file_size
                        if total > MAX_TOTAL_BYTES:
                            raise CheckpointError(f"checkpoint {path} is not a numpylenet checkpoint: "
                                                  f"its members declare over {MAX_TOTAL_BYTES:,} bytes")
                        arrays[name] = _read_npy(stream, member.file_size)
                    else:   # not needed: only streamed through, so the zip's CRC shows damage
                        while stream.read(1 << 20):
                            pass
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile,
            zlib.error) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is corrupt or not a numpylenet checkpoint "
                              f"({type(error).__name__}: {' '.join(str(error).split())})") from None
    return arrays


def _read_npy(stream, size: int) -> np.ndarray:
    """One ``.npy`` member of ``size`` bytes: its header must promise exactly the bytes that follow,
    of a plain numeric or string dtype (nothing that needs pickle)."""
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject or dtype.kind not in "biufcU" or dtype.fields is not None:
        raise ValueError(f"member of dtype {dtype} (only plain numbers and strings are read)")
    count = math.prod(shape)
    header_size = stream.tell()
    if header_size + count * dtype.itemsize != size:
        raise ValueError(f"a member's header promises {count * dtype.itemsize:,} bytes of "
                         f"{size - header_size:,}")
    data = stream.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise EOFError("member cut short")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C").copy()
