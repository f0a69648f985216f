"""Memory: peak resident memory of training and inference, and what one training step allocates.

    python -m benchmarks.memory [--steps 100] [--full] [--data-dir DIR] [--threads 2] [--quick] [--out DIR]

Peak resident memory
--------------------
Each run is a fresh child process; its peak resident set (``ru_maxrss`` from ``os.wait4``, which
counts the interpreter, NumPy, Numba and the compiled kernels as well as the data) is reported:

* ``python -m numpylenet.train --dataset mnist-sample --epochs 1 --out <tmp>``: the default recipe
  on the bundled sample;
* with ``--full``, the same on full MNIST (``--dataset mnist``, data from ``--data-dir`` or
  $NUMPYLENET_DATA);
* a batch-1,000 float32 forward pass of ``LeNet5(backend="numba")`` on random images; the child
  also reports its peak before that forward (after importing and compiling on a batch of 2), so
  the forward's own share shows.

Allocation per training step
----------------------------
The claim under test: the training loop allocates nothing per step. A
:class:`numpylenet.loop.NumpyLearner` (numba backend, float32) of each recipe below takes its
training steps through ``learner.train_step(x, y, lr)`` - exactly what ``numpylenet.loop.fit``
calls for every batch: zero_grad, forward, softmax cross-entropy, backward without dL/dx, the
optimiser step - on one fixed batch (the data pipeline's own allocations are not counted). After
``--warmup`` steps (workspaces built, kernels compiled, optimiser state created):

* **net growth**: traced memory after ``--steps`` steps minus before them, and after the last
  half of them minus before that half - a leak grows in the second half as much as in the first,
  while Python's free lists and Numba's caches fill up once and stop - and the lines whose
  allocations grew most (``tracemalloc`` snapshots compared);
* **peak within a step**: the largest rise of traced memory above its level at the start of a
  step, over those steps (``tracemalloc.get_traced_memory`` after ``reset_peak``);
* **what allocates**: one more step runs under a profile hook that takes a ``tracemalloc``
  snapshot every time a function of numpylenet returns (and after every C function it calls,
  such as ``np.exp``), when the arrays it made are still referenced. For every line that
  allocated (the innermost line inside numpylenet; NumPy's own Python helpers are attributed to
  their numpylenet caller), the most blocks and bytes alive at one of those moments are
  listed. Temporaries made and dropped inside a single expression between two such moments are
  not seen one by one; the peak above bounds them.

Recipes: ``default`` (SGD with Nesterov momentum, label smoothing 0.1, batch 64) and ``seed``
(Adam, batch 32). Writes ``memory.json``.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import common
from numpylenet.cli import positive_int

NAME = "memory"
RECIPES = ("default", "seed")
PACKAGE = str(common.REPO / "numpylenet")

# A child's script: import and compile on a batch of 2, then one forward of ``batch`` images.
_FORWARD_CHILD = """
import json, resource, sys
import numpy as np
from numpylenet import LeNet5
batch = int(sys.argv[1])
model = LeNet5(seed=0, backend="numba")
model.forward(np.zeros((2, 1, 32, 32), np.float32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = np.random.default_rng(0).random((batch, 1, 32, 32), dtype=np.float32)
model.forward(x)
print(json.dumps({"before_forward_kib": before}))
"""


# --------------------------------------------------------------------------------------------
# Peak resident memory of child processes
# --------------------------------------------------------------------------------------------

# Runs a command and prints its exit status and rusage as JSON: the child whose peak is measured
# must be forked from this small process, not from the benchmark. On Linux a process's ru_maxrss
# starts from the high-water mark of the memory it was forked from (exec keeps it), so a child of
# the benchmark (NumPy, torch and Numba loaded: several hundred MiB) would report at least that.
_LAUNCHER = """
import json, os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=sys.stdout, stderr=sys.stderr)
_, status, usage = os.wait4(process.pid, 0)
print(json.dumps({"status": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}),
      file=sys.stderr)
"""


def child_peak_rss(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``command`` from the repository's top folder in a fresh process; return its peak
    resident set in MiB (its own ``ru_maxrss``, see ``_LAUNCHER``) and the last line it printed.

    Raises RuntimeError with the end of its stderr if it fails.
    """
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], cwd=common.REPO, env=env,
                            capture_output=True, text=True)
    *errors, report = result.stderr.strip().splitlines() or [""]
    try:
        measured = json.loads(report)
    except json.JSONDecodeError:
        measured = {"status": result.returncode or 1}
    if result.returncode != 0 or measured["status"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {measured['status']}):\n"
                           + "\n".join(errors)[-2000:])
    lines = result.stdout.strip().splitlines()
    return {"command": " ".join(["python", *command[1:]]), "peak_rss_mib": measured["maxrss_kib"] / 1024,
            "last_line": lines[-1] if lines else ""}


def training_run(dataset: str, out: Path, threads: int, data: Path | None = None) -> dict:
    """Peak memory of ``python -m numpylenet.train --dataset DATASET --epochs 1`` (the default
    recipe) with ``threads`` threads, writing its run folder under ``out``."""
    command = [sys.executable, "-m", "numpylenet.train", "--dataset", dataset, "--epochs", "1",
               "--threads", str(threads), "--out", str(out / dataset)]
    if data is not None:
        command += ["--data-dir", str(data)]
    return child_peak_rss(command, env={**os.environ, "MPLBACKEND": "Agg"})


def forward_run(batch_size: int, threads: int) -> dict:
    """Peak memory of a child doing one numba float32 forward of ``batch_size`` images, and its
    peak before that forward (after import and compilation), both in MiB."""
    result = child_peak_rss([sys.executable, "-c", _FORWARD_CHILD, str(batch_size)],
                            env={**os.environ, "NUMBA_NUM_THREADS": str(threads)})
    before = json.loads(result.pop("last_line"))["before_forward_kib"] / 1024
    result["command"] = f"python: LeNet5(backend='numba').forward(x), x ({batch_size}, 1, 32, 32) float32"
    return {**result, "peak_rss_before_forward_mib": before}


# --------------------------------------------------------------------------------------------
# Allocation per training step
# --------------------------------------------------------------------------------------------

def make_learner(recipe: str, threads: int):
    """The :class:`numpylenet.loop.NumpyLearner` of ``recipe`` (numba backend, float32) and one
    random batch of its batch size: x (B, 1, 32, 32) float32 in [0, 1), y (B,) in 0..9."""
    from numpylenet.loop import NumpyLearner
    from numpylenet.recipes import make_config

    config = make_config(recipe, backend="numba", dtype="float32", threads=threads)
    rng = np.random.default_rng(0)
    x = rng.random((config.batch_size, 1, 32, 32), dtype=np.float32)
    return NumpyLearner(config), x, rng.integers(0, 10, config.batch_size), config.lr


def step_growth(step: Callable[[], object], steps: int) -> dict:
    """Traced memory around ``steps`` calls of ``step``, in bytes: the net growth from before the
    first call to after the last, and over the second half of the calls alone (a leak grows there
    as much as in the first half; caches and free lists filling up do not), the lines that grew
    most, and the largest rise within one call."""
    gc.collect()
    tracemalloc.start(25)
    try:
        before = tracemalloc.take_snapshot()
        start = tracemalloc.get_traced_memory()[0]
        peak_rise, halfway = 0, start
        for index in range(steps):
            if index == steps // 2:
                gc.collect()
                halfway = tracemalloc.get_traced_memory()[0]
            current = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            step()
            peak_rise = max(peak_rise, tracemalloc.get_traced_memory()[1] - current)
        gc.collect()
        end = tracemalloc.get_traced_memory()[0]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = [{"line": _where(difference.traceback), "bytes": difference.size_diff,
              "blocks": difference.count_diff}
             for difference in after.compare_to(before, "traceback") if difference.size_diff > 0]
    return {"steps": steps, "net_growth_bytes": end - start, "second_half_growth_bytes": end - halfway,
            "grown": sorted(grown, key=lambda entry: -entry["bytes"])[:10],
            "peak_within_step_bytes": peak_rise}


def step_allocations(step: Callable[[], object], package: str = PACKAGE) -> list[dict]:
    """What one call of ``step`` allocates: per allocating line (see :func:`_where`) and kind -
    "numpy" for array data buffers (NumPy's tracemalloc domain), "python" for Python objects - the
    most blocks and bytes alive at once among the moments a function of ``package`` (a folder,
    numpylenet's by default) returned or a C function called from it returned. Sorted by kind,
    then bytes, largest first."""
    largest: dict[tuple[str, str], tuple[int, int]] = {}

    def record(frame, event, _):
        if event in ("return", "c_return") and frame.f_code.co_filename.startswith(package):
            alive: dict[tuple[str, str], list[int]] = {}
            for trace in tracemalloc.take_snapshot().traces:
                kind = "numpy" if trace.domain == np.lib.tracemalloc_domain else "python"
                entry = alive.setdefault((kind, _where(trace.traceback, package)), [0, 0])
                entry[0] += 1
                entry[1] += trace.size
            for key, (blocks, size) in alive.items():
                if size > largest.get(key, (0, 0))[1]:
                    largest[key] = (blocks, size)

    gc.collect()
    tracemalloc.start(25)
    sys.setprofile(record)
    try:
        step()
    finally:
        sys.setprofile(None)
        tracemalloc.stop()
    entries = [{"kind": kind, "line": line, "blocks": blocks, "bytes": size}
               for (kind, line), (blocks, size) in largest.items() if line != _where(None)]
    return sorted(entries, key=lambda entry: (entry["kind"], -entry["bytes"]))


def _where(traceback, package: str = PACKAGE) -> str:
    """``file:line`` of the innermost frame of ``traceback`` inside ``package`` (relative to the
    repository when it lies inside); "benchmarks.memory" when this module's own code comes first
    (the profile hook's snapshots, the step's call), or the innermost frame when neither is on
    the stack."""
    if traceback is None:
        return "benchmarks.memory"
    for frame in reversed(traceback):          # tracemalloc orders frames oldest first
        if frame.filename == __file__:
            return "benchmarks.memory"
        if frame.filename.startswith(package):
            path = Path(frame.filename)
            return f"{path.relative_to(common.REPO) if path.is_relative_to(common.REPO) else path}:{frame.lineno}"
    return f"{traceback[-1].filename}:{traceback[-1].lineno}" if len(traceback) else "unknown"


def recipe_allocations(recipe: str, steps: int, warmup: int, threads: int) -> dict:
    """:func:`step_growth` and :func:`step_allocations` of ``recipe``'s learner after ``warmup``
    steps, with the totals per kind of allocation."""
    learner, x, y, lr = make_learner(recipe, threads)
    step = lambda: learner.train_step(x, y, lr)     # noqa: E731  what fit() calls per batch
    for _ in range(warmup):
        step()
    allocations = step_allocations(step)
    totals = {kind: {"blocks": sum(a["blocks"] for a in allocations if a["kind"] == kind),
                     "bytes": sum(a["bytes"] for a in allocations if a["kind"] == kind)}
              for kind in ("numpy", "python")}
    return {"recipe": recipe, "batch_size": len(y), "optimizer": type(learner.optimizer).__name__,
            **step_growth(step, steps), "allocations": allocations, "allocated_per_step": totals}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def markdown(runs: list[dict], steps: list[dict], python_lines: int = 5) -> str:
    """The peak-memory table, then per recipe the step's growth and peak, every line allocating
    NumPy arrays and the ``python_lines`` lines allocating the most Python objects."""
    table = common.markdown_table(
        ["run", "peak resident memory (MiB)"],
        [[run["name"], f"{run['peak_rss_mib']:,.0f}" + (
            f" ({run['peak_rss_before_forward_mib']:,.0f} before the forward)"
            if "peak_rss_before_forward_mib" in run else "")] for run in runs])
    parts = [table, "Each run in a fresh process; ru_maxrss, which counts the interpreter, NumPy, "
             "Numba and its compiled kernels too."]
    for entry in steps:
        totals = entry["allocated_per_step"]
        parts.append(
            f"Training step, recipe `{entry['recipe']}` ({entry['optimizer']}, batch "
            f"{entry['batch_size']}, numba, float32), via `NumpyLearner.train_step`: net growth of "
            f"traced memory over {entry['steps']} steps {entry['net_growth_bytes']:,} bytes, over "
            f"the last {entry['steps'] - entry['steps'] // 2} {entry['second_half_growth_bytes']:,} "
            f"bytes (a leak would grow there as much as in the first half); peak "
            f"within a step {entry['peak_within_step_bytes']:,} bytes above its start. Allocated in "
            f"one step (the most alive at once, per line): NumPy arrays {totals['numpy']['blocks']} "
            f"blocks, {totals['numpy']['bytes']:,} bytes; Python objects {totals['python']['blocks']} "
            f"blocks, {totals['python']['bytes']:,} bytes.")
        shown = ([a for a in entry["allocations"] if a["kind"] == "numpy"]
                 + [a for a in entry["allocations"] if a["kind"] == "python"][:python_lines])
        if shown:
            parts.append(common.markdown_table(
                ["allocating line", "kind", "blocks", "bytes"],
                [[f"`{a['line']}`", a["kind"], a["blocks"], f"{a['bytes']:,}"] for a in shown],
                align="llrr"))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = common.make_parser(NAME, __doc__.splitlines()[0], repeats=1)
    parser.add_argument("--steps", type=positive_int, default=100,
                        help="training steps traced for the net growth (default 100)")
    parser.add_argument("--warmup", type=positive_int, default=5,
                        help="untraced steps first: workspaces, compilation, optimiser state (default 5)")
    parser.add_argument("--full", action="store_true",
                        help="also a default-recipe epoch on full MNIST (data from --data-dir)")
    parser.add_argument("--data-dir", default=None,
                        help="root holding MNIST/raw (default $NUMPYLENET_DATA, else ../shared/data)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 10, 2
    runs = []     # the children first: they need no threads set here
    with tempfile.TemporaryDirectory() as folder:
        runs.append({"name": "default recipe, 1 epoch, mnist-sample",
                     **training_run("mnist-sample", Path(folder), args.threads)})
        if args.full:
            runs.append({"name": "default recipe, 1 epoch, full MNIST",
                         **training_run("mnist", Path(folder), args.threads, common.data_dir(args.data_dir))})
    runs.append({"name": "numba forward, batch 1,000, float32", **forward_run(1000, args.threads)})
    common.set_threads(args.threads)
    steps = [recipe_allocations(recipe, args.steps, args.warmup, args.threads) for recipe in RECIPES]
    return common.publish(args, NAME, {"runs": runs, "steps": steps, "markdown": markdown(runs, steps)})


if __name__ == "__main__":
    main()
