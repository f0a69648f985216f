"""Running ``numpylenet.train`` and ``numpylenet.evaluate`` in-process in tests, and reading what
they wrote: exit status and output of a call, checkpoint arrays, JSON parsed strictly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from numpylenet.evaluate import main as evaluate_main
from numpylenet.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
TRAIN = "python -m numpylenet.train"
EVALUATE = "python -m numpylenet.evaluate"
# A run of two epochs of three steps on the bundled sample: seconds, not minutes.
TINY = ["--dataset", "mnist-sample", "--limit-train", "96", "--batch-size", "32", "--epochs", "2",
        "--valid-size", "0.01"]


def call(main, capsys, *args, **kwargs) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``main([str(arg) for arg in args], **kwargs)``."""
    try:
        code = main([str(arg) for arg in args], **kwargs)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def run_train(capsys, *args, make_learner=None) -> tuple[int, str, str]:
    return call(train_main, capsys, *args, **({"make_learner": make_learner} if make_learner else {}))


def run_evaluate(capsys, *args) -> tuple[int, str, str]:
    return call(evaluate_main, capsys, *args)


def one_line_error(err: str, prog: str = TRAIN) -> bool:
    """Whether stderr is exactly one line ``prog: error: ...`` (progress bars and notes aside)."""
    lines = [line for line in err.strip().splitlines() if line.startswith(f"{prog}: error:")]
    return len(lines) == 1 and "Traceback" not in err


def arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def saved(path: Path, part: str = "progress"):
    """A JSON part of the checkpoint at ``path`` (progress, config, history)."""
    return json.loads(str(arrays(path)[part]))


def strict_json(path: Path):
    """Parse ``path`` as standard JSON: the tokens NaN, Infinity and -Infinity are errors."""
    def refuse(token):
        raise ValueError(f"{path} holds the non-standard JSON token {token}")

    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
    return json.loads(text, parse_constant=refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) with its content."""
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def environment(**extra) -> dict[str, str]:
    """The environment for a tool run in a subprocess: Agg plots, no inherited NUMBA_CACHE_DIR."""
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env.update({"MPLBACKEND": "Agg", "PYTHONPATH": str(REPO), **extra})
    return env
