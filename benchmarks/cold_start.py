"""Cold start: how long a new user waits for the first training step of README's first command.

    python -m benchmarks.cold_start [--repeats 3] [--threads 2] [--quick] [--out DIR]

Each measurement is a fresh process running ``python -m numpylenet.train --dataset mnist-sample
--epochs 1`` (the default recipe: numba backend, float32, SGD, affine augmentation) into a new
run folder, and reports the seconds from launching that process to the end of its first
training step (``NumpyLearner.train_step`` returning), and to the end of the whole run:

* **empty cache**: ``NUMBA_CACHE_DIR`` points at a new, empty folder, so Numba compiles every
  kernel the run uses, as on a fresh clone or after an edit of the kernels;
* **warm cache**: the same folder again, now holding what the empty-cache run compiled.

The child is the real command: a two-line driver (:data:`DRIVER`) records when the first step
returns and then runs ``numpylenet.train``'s ``main`` unchanged. Repeats alternate empty and warm
runs; the table shows the medians and the spread (min-max). The compile lines that the command
prints are kept in the JSON. ``--quick`` (the CI smoke test) runs once, warm only, on the Numba cache
the caller already has (an empty-cache run would spend the test suite's time compiling). Writes
``cold_start.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

NAME = "cold_start"
COMMAND = ["--dataset", "mnist-sample", "--epochs", "1"]

# Runs in the child: note the wall-clock time at which the first training step returns, then run
# the command itself. Wall-clock (time.time) because the parent's clock started the process.
DRIVER = """\
import json, sys, time
from numpylenet import loop, train
step, first = loop.NumpyLearner.train_step, []
def timed_step(self, *args, **kwargs):
    loss = step(self, *args, **kwargs)
    if not first:
        first.append(time.time())
        sys.stderr.write("\\n" + json.dumps({"first_step_done": first[0]}) + "\\n")
    return loss
loop.NumpyLearner.train_step = timed_step
sys.exit(train.main(sys.argv[1:]))
"""


def run_once(cache_dir: Path | None, threads: int) -> dict:
    """One fresh ``numpylenet.train`` process with ``NUMBA_CACHE_DIR=cache_dir`` (None: the
    caller's cache): seconds from its launch to its first finished training step and to its exit,
    and the compile lines it printed."""
    with tempfile.TemporaryDirectory() as scratch:
        environment = {**os.environ, "MPLBACKEND": "Agg"}
        if cache_dir is not None:
            environment["NUMBA_CACHE_DIR"] = str(cache_dir)
        command = [sys.executable, "-c", DRIVER, *COMMAND, "--out", str(Path(scratch) / "run"),
                   "--threads", str(threads)]
        launched = time.time()
        finished = subprocess.run(command, cwd=common.REPO, env=environment, capture_output=True,
                                  text=True)
        ended = time.time()
    if finished.returncode != 0:
        raise RuntimeError(f"numpylenet.train exited {finished.returncode}:\n{finished.stderr[-2000:]}")
    first_step = next(json.loads(line)["first_step_done"] for line in finished.stderr.splitlines()
                      if line.startswith('{"first_step_done"'))
    said = [line for line in (finished.stdout + finished.stderr).splitlines() if "umba" in line
            and ("compil" in line or "ready" in line)]
    return {"first_step_seconds": first_step - launched, "total_seconds": ended - launched,
            "compile_messages": said}


def summary(values: list[float]) -> str:
    """'median (min-max)' of seconds."""
    return (f"{statistics.median(values):.2f} s" if len(values) == 1 else
            f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})")


def main(argv: list[str] | None = None) -> dict:
    parser = common.make_parser(NAME, __doc__.splitlines()[0], repeats=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {"empty cache": [], "warm cache": []}
    if args.quick:
        del runs["empty cache"]
        runs["warm cache"].append(run_once(None, args.threads))
    for repeat in range(0 if args.quick else args.repeats):
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            for case in runs:              # empty first, then warm on what it compiled
                result = run_once(Path(cache), args.threads)
                runs[case].append(result)
                print(f"repeat {repeat + 1}/{args.repeats}, {case}: first step after "
                      f"{result['first_step_seconds']:.2f} s, run {result['total_seconds']:.2f} s", flush=True)
    rows = [[case, summary([r["first_step_seconds"] for r in results]),
             summary([r["total_seconds"] for r in results])] for case, results in runs.items()]
    table = common.markdown_table(
        ["Numba cache", "launch -> first training step", "launch -> exit (whole run)"], rows)
    command = "python -m numpylenet.train " + " ".join(COMMAND)
    return common.publish(args, NAME, {"command": command, "runs": runs, "markdown": table},
                          note=f"command: {command} (fresh process each; median (min-max) of {args.repeats})")


if __name__ == "__main__":
    main()
