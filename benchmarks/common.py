"""What every benchmark shares: the command line, thread control, the machine, a fair timer, output.

A benchmark script is ``python -m benchmarks.<name> [--threads 2] [--repeats N] [--quick] [--out DIR]``;
it prints a Markdown table and writes ``<out>/<name>.json`` (and sometimes ``<name>.png``), whose
``meta`` records the machine, the threads actually in use, the library versions and the date.

Fair timing on a shared, noisy machine
--------------------------------------
:func:`interleaved_timings` runs the contenders round-robin - A B C, B C A, C A B, ... - after a
warm-up call of each, and reports the median of the repeats. Whatever else the machine is doing
at a given moment slows every contender alike, so the *ratios* between contenders are stable even
when the absolute figures are not. Absolute figures vary between machines and between runs; the
ratios measured within one run are what the project claims.

Peak FLOP/s
-----------
``peak = cores x clock x FP32 FLOP per cycle per core``, the project's rule. The FLOP per cycle
follow from the vector units the CPU reports in ``/proc/cpuinfo``: with AVX2 + FMA, 2 FMA units x 8
lanes x 2 = 32; with AVX-512 also 32, since the project counts every AVX-512 machine like an AVX2
one (Zen 4 executes each 512-bit FMA as two 256-bit halves, so 32 FP32 FLOP per cycle per core is
its real FMA throughput; a CPU with two full 512-bit FMA units reaches 64, which ``--flop-per-cycle
64`` states); with AVX alone 16; otherwise (SSE) 8. The clock is the highest
``cpu MHz`` listed (or ``cpuinfo_max_freq``). Both can be given instead (``--clock-ghz``,
``--flop-per-cycle``) when detection is wrong, e.g. inside a virtual machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from numpylenet.cli import OneLineErrorParser, finite_positive_float, positive_int

if TYPE_CHECKING:  # for annotations only: NumPy is imported where it is used
    import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

__all__ = ["REPO", "RESULTS", "make_parser", "data_dir", "set_threads", "thread_report", "Machine",
           "detect_machine", "vector_isa", "versions", "metadata", "Timing", "SETTLE_SECONDS",
           "interleaved_timings", "BASELINES", "FRAMEWORK_LABELS", "PEERS", "throughput",
           "throughput_main", "throughput_rows",
           "throughput_table", "markdown_table", "publish", "write_json", "save_figure",
           "forward_flops_per_image", "training_flops_per_image"]


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

class BenchmarkParser(OneLineErrorParser):
    """A benchmark's flags: ``--quick`` changes the default of ``--repeats`` (to 1), never a count
    given on the command line."""

    def __init__(self, *args, repeats: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.repeats = repeats

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.repeats is None:
            parsed.repeats = 1 if parsed.quick else self.repeats
        return parsed


def make_parser(name: str, description: str, *, repeats: int = 5) -> argparse.ArgumentParser:
    """The flags every benchmark accepts; a script adds its own to the returned parser.

    --threads N        threads for torch, Numba and BLAS alike (default 2)
    --repeats N        timed repeats per contender (median reported); at least 1 (default
                       ``repeats``, 1 with --quick)
    --quick            a tiny configuration that finishes in seconds (CI smoke test)
    --out DIR          where the JSON (and PNG) go (default benchmarks/results)
    --clock-ghz, --flop-per-cycle   override the detected machine figures behind "peak"
    """
    parser = BenchmarkParser(prog=f"python -m benchmarks.{name}", description=description, repeats=repeats)
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="threads for torch, Numba and BLAS together (default 2); on a loaded "
                             "machine 1 can be much faster, so it is recorded with every result")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help=f"timed repeats per contender, after a warm-up; the median is reported "
                             f"(default {repeats}; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration that runs in seconds (the CI smoke test)")
    parser.add_argument("--out", type=_output_folder, default=RESULTS,
                        help=f"folder for the JSON and PNG results (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--clock-ghz", type=finite_positive_float, default=None,
                        help="CPU clock for the peak-FLOP/s figure (default: detected)")
    parser.add_argument("--flop-per-cycle", type=positive_int, default=None,
                        help="FP32 FLOP per cycle per core (default: 32 with AVX2+FMA or AVX-512, "
                             "16 with AVX, 8 with SSE; give 64 for two full 512-bit FMA units)")
    return parser


def _output_folder(text: str) -> Path:
    """--out, created now and shown to be writable: a benchmark that runs for minutes must not
    fail at writing its results."""
    from numpylenet.files import writable_folder

    try:
        return writable_folder(text)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write into {text}: {error.strerror}") from None


def data_dir(given: str | None = None) -> Path:
    """The root holding ``MNIST/raw``: ``given``, else $NUMPYLENET_DATA, else ``../shared/data``."""
    if given is not None:
        return Path(given)
    return Path(os.environ.get("NUMPYLENET_DATA") or REPO.parent / "shared" / "data")


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------

_BLAS_LIMITS = []   # keeps threadpoolctl's limiter alive for the life of the process
_XLA_THREAD_FLAGS = ("xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads")


def set_threads(count: int) -> None:
    """Use ``count`` threads in torch, in Numba, in every BLAS/OpenMP library loaded, and in XLA
    (JAX) if jax is not imported yet.

    All are set together so no contender gets more cores than another. Numba cannot run
    more threads than it started with (``NUMBA_NUM_THREADS``), so its count is capped there;
    :func:`thread_report` says what each library really uses.
    """
    try:
        import torch
        torch.set_num_threads(count)
    except ImportError:
        pass
    try:
        import numba
        numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    # XLA reads its threads from XLA_FLAGS once, when jax is imported; later it is too late.
    # (A second call replaces the thread flags of the first; a user's other flags stay.)
    if "jax" not in sys.modules:
        kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
                if not flag.lstrip("-").startswith(_XLA_THREAD_FLAGS)]
        os.environ["XLA_FLAGS"] = " ".join(kept + ["--xla_cpu_multi_thread_eigen=true",
                                                   f"intra_op_parallelism_threads={count}"])
    # NumPy's OpenBLAS (which numpylenet's Numba kernels also call) and torch's OpenMP runtime.
    from threadpoolctl import threadpool_limits
    _BLAS_LIMITS.append(threadpool_limits(limits=count))


def thread_report(requested: int) -> dict:
    """The threads each library actually uses now."""
    report: dict = {"requested": requested}
    try:
        import torch
        report["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import numba
        report["numba"] = numba.get_num_threads()
    except ImportError:
        pass
    if "jax" in sys.modules:
        report["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    from threadpoolctl import threadpool_info
    report["blas"] = [f"{info.get('internal_api')} {info.get('version') or ''}".strip()
                      + f": {info['num_threads']} threads ({Path(info['filepath']).name})"
                      for info in threadpool_info()]
    return report


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------

@dataclass
class Machine:
    """The CPU and its FP32 peak: ``peak_gflops = cores x clock_ghz x flop_per_cycle``."""

    cpu: str
    cores: int
    clock_ghz: float
    flop_per_cycle: int
    vector_isa: str
    clock_source: str
    flop_source: str

    @property
    def peak_gflops(self) -> float:
        return self.cores * self.clock_ghz * self.flop_per_cycle

    def peak_gflops_for(self, threads: int) -> float:
        """The peak reachable with ``threads`` threads (one core each, at most all cores)."""
        return min(threads, self.cores) * self.clock_ghz * self.flop_per_cycle

    def describe(self) -> str:
        return (f"{self.cpu}, {self.cores} cores, {self.clock_ghz:.2f} GHz, {self.vector_isa}: "
                f"FP32 peak {self.cores} x {self.clock_ghz:.2f} GHz x {self.flop_per_cycle} FLOP/cycle "
                f"= {self.peak_gflops:.0f} GFLOP/s")

    def to_json(self) -> dict:
        return {"cpu": self.cpu, "cores": self.cores, "clock_ghz": self.clock_ghz,
                "flop_per_cycle": self.flop_per_cycle, "vector_isa": self.vector_isa,
                "clock_source": self.clock_source, "flop_source": self.flop_source,
                "peak_gflops": self.peak_gflops,
                "peak_formula": "cores x clock_ghz x flop_per_cycle (FP32)"}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def detect_machine(clock_ghz: float | None = None, flop_per_cycle: int | None = None) -> Machine:
    """The CPU model, usable cores, clock and FP32 FLOP/cycle; the two numbers can be overridden."""
    info = _cpuinfo()
    models = re.findall(r"^model name\s*:\s*(.+)$", info, re.M)
    cpu = models[0].strip() if models else (platform.processor() or platform.machine())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    flags = re.findall(r"^flags\s*:\s*(.+)$", info, re.M)
    isa, detected_flop = vector_isa(set(flags[0].split()) if flags else set())
    if clock_ghz is None:
        clock_ghz, clock_source = _detect_clock_ghz(info)
    else:
        clock_source = "--clock-ghz"
    flop_source = "--flop-per-cycle" if flop_per_cycle is not None else f"{isa} in /proc/cpuinfo flags"
    return Machine(cpu=cpu, cores=cores, clock_ghz=clock_ghz,
                   flop_per_cycle=flop_per_cycle or detected_flop, vector_isa=isa,
                   clock_source=clock_source, flop_source=flop_source)


def vector_isa(flags: set[str]) -> tuple[str, int]:
    """The widest FP32 vector instructions among the CPU ``flags``, and the FLOP per cycle per core
    they allow: two FMA units x lanes x 2 FLOP (a multiply and an add) per FMA.

    AVX-512 counts as two 256-bit FMA units (32), as AVX2 does: the project's peak rule, and the
    real throughput of Zen 4, which splits each 512-bit FMA in two halves. The flags cannot tell
    such a CPU from one with two full 512-bit units; ``--flop-per-cycle 64`` covers that case.
    """
    if "avx512f" in flags:
        return "AVX-512", 2 * 8 * 2
    if {"avx2", "fma"} <= flags:
        return "AVX2+FMA", 2 * 8 * 2
    if "avx" in flags:
        return "AVX", 2 * 8       # a separate multiply and add unit, 8 lanes each
    return "SSE", 2 * 4


def _detect_clock_ghz(info: str) -> tuple[float, str]:
    maximum = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if maximum.is_file():
        return int(maximum.read_text()) / 1e6, str(maximum)
    speeds = [float(mhz) for mhz in re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", info, re.M)]
    if speeds:
        return max(speeds) / 1000, "/proc/cpuinfo 'cpu MHz'"
    return float("nan"), "unknown (give --clock-ghz)"


def versions() -> dict[str, str]:
    """Python and the versions of the libraries the benchmarks compare."""
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for package in ("numpylenet", "numpy", "numba", "torch", "torchvision", "jax", "jaxlib", "optax"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def metadata(args: argparse.Namespace) -> dict:
    """Everything a result needs to be read later: when, where, with what, how."""
    machine = detect_machine(args.clock_ghz, args.flop_per_cycle)
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine.to_json(), "machine_summary": machine.describe(),
            "threads": thread_report(args.threads), "versions": versions(),
            "repeats": args.repeats, "quick": args.quick, "load_average": _load_average()}


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# FLOP counts of LeNet-5 (multiply-adds counted as 2 FLOP; pooling, activations, bias ignored)
# --------------------------------------------------------------------------------------------

# (multiply-adds per image, whether the layer needs dL/dinput in training)
_LAYER_MACS = {"conv1": (6 * 28 * 28 * 1 * 5 * 5, False), "conv2": (16 * 10 * 10 * 6 * 5 * 5, True),
               "conv3": (120 * 16 * 5 * 5, True), "fc1": (120 * 84, True), "fc2": (84 * 10, True)}


def forward_flops_per_image() -> int:
    """FLOP of one image's forward pass: 2 x the multiply-adds of the five weighted layers."""
    return sum(2 * macs for macs, _ in _LAYER_MACS.values())


def training_flops_per_image() -> int:
    """FLOP of one image's training step: forward, dL/dW (as much again) and dL/dinput (as much
    again, except conv1, whose input is the image). About 2.26 MFLOP."""
    return sum(2 * macs * (3 if needs_input_grad else 2) for macs, needs_input_grad in _LAYER_MACS.values())


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds per call of one contender: one figure per repeat, and their median."""

    name: str
    seconds: list[float]
    calls_per_repeat: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median over the repeats: how noisy the measurement was."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median > 0 else 0.0

    def to_json(self) -> dict:
        return {"median_seconds": self.median, "min_seconds": min(self.seconds),
                "max_seconds": max(self.seconds), "relative_spread": self.spread,
                "repeats": len(self.seconds), "calls_per_repeat": self.calls_per_repeat,
                "seconds": self.seconds}


# Long enough for every thread pool in the process to fall asleep: OpenBLAS's workers spin for
# 2^28 cycles (its THREAD_TIMEOUT default), about 0.11 s at 2.45 GHz, before they sleep.
SETTLE_SECONDS = 0.25


def interleaved_timings(contenders: Mapping[str, Callable[[], object]], repeats: int = 5, *,
                        min_repeat_seconds: float = 0.0, warmup: int = 1,
                        settle_seconds: float = 0.0) -> dict[str, Timing]:
    """Median seconds per call of each contender, measured round-robin.

    Each contender is first called ``warmup`` times untimed (JIT compilation, caches, allocation;
    ``warmup=0`` when the caller warms up in its own way, and then every repeat is one call),
    then once more to calibrate how many calls a repeat needs.
    Then, ``repeats`` times, every contender is timed once, in an order rotated by one each round
    (A B C, B C A, ...) so that none always runs right after another. A repeat calls the contender
    enough times back to back to last at least ``min_repeat_seconds``, so that microsecond
    operations are timed above the clock's resolution.

    Before each repeat the process sleeps ``settle_seconds``: the thread pools of the contender
    that ran before keep spinning on the cores for a while after their last call (OpenBLAS for
    about 2^28 cycles, 0.1 s here; an active OpenMP pool for milliseconds) and would otherwise
    slow the next contender down. Measured here, without it torch at 2 threads ran at half its
    speed when it followed NumPy's BLAS (see :data:`SETTLE_SECONDS`).
    """
    names = list(contenders)
    calls = dict.fromkeys(names, 1)
    for name in names if warmup > 0 else ():
        for _ in range(warmup):
            contenders[name]()
        started = time.perf_counter()        # calibrate on a warm call: the first may compile
        contenders[name]()
        once = time.perf_counter() - started
        if once > 0:
            calls[name] = max(1, math.ceil(min_repeat_seconds / once))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            function, count = contenders[name], calls[name]
            time.sleep(settle_seconds)
            started = time.perf_counter()
            for _ in range(count):
                function()
            seconds[name].append((time.perf_counter() - started) / count)
    return {name: Timing(name, seconds[name], calls[name]) for name in names}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default:
    the first column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# The frameworks of the throughput tables, in column order: the baselines first. Every row of
# numpylenet is compared with each of these that ran (see benchmarks.peers for the last two).
BASELINES = ("torch", "torch.compile", "jax")
FRAMEWORK_LABELS = {"torch": "torch eager", "torch.compile": "torch.compile", "jax": "JAX jit"}
PEERS = BASELINES[1:]


def throughput(args: argparse.Namespace,
               functions: Callable[[int, "np.random.Generator", argparse.Namespace], dict],
               flops_per_image: int, *, min_repeat_seconds: float, warmup: int = 1,
               latency_batch: int | None = None) -> tuple[list[dict], str, float]:
    """Images per second of per-batch functions at every ``args.batch_sizes``, interleaved
    (pausing :data:`SETTLE_SECONDS` before each repeat, except with ``--quick``).

    ``functions(batch_size, rng, args)`` returns framework -> a function processing one batch of
    that size ("torch", the first baseline, among them). Returns the rows of
    :func:`throughput_rows`, their Markdown tables (:func:`throughput_table`) and the FP32 peak
    (FLOP/s) of the threads used.
    """
    import numpy as np

    machine = detect_machine(args.clock_ghz, args.flop_per_cycle)
    peak = machine.peak_gflops_for(args.threads) * 1e9
    rng = np.random.default_rng(0)
    contenders = {(framework, batch_size): function for batch_size in args.batch_sizes
                  for framework, function in functions(batch_size, rng, args).items()}
    timings = interleaved_timings(contenders, args.repeats, min_repeat_seconds=min_repeat_seconds,
                                  warmup=warmup,
                                  settle_seconds=0.0 if args.quick else SETTLE_SECONDS)
    rows = throughput_rows(timings, flops_per_image, peak)
    return rows, throughput_table(rows, min(args.threads, machine.cores), latency_batch), peak


def throughput_main(argv: list[str] | None, name: str, description: str,
                    functions: Callable[[int, "np.random.Generator", argparse.Namespace], dict],
                    flops_per_image: int, *, batch_sizes: list[int], quick_batch_sizes: list[int],
                    min_repeat_seconds: float, warmup: int = 1, latency_batch: int | None = None,
                    details: Mapping[str, object] | None = None) -> dict:
    """The whole of a throughput benchmark (``step``, ``inference``): the command line (the common
    flags, ``--batch-sizes`` and ``--peers``), threads, :func:`throughput`, then :func:`publish`
    with ``details`` (which name the FLOP count), the peak, the rows and the tables. ``--quick``
    times one repeat of ``quick_batch_sizes`` without the minimum repeat length, and no peer
    unless ``--peers`` names some (torch.compile alone compiles for tens of seconds).

    ``details`` is read when the result is published, after the run: a mapping the functions
    fill while they build the contenders (such as the peers skipped, and why) ends up complete.
    """
    parser = make_parser(name, description)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None,
                        help=f"batch sizes to time (default {' '.join(map(str, batch_sizes))}; "
                             f"{' '.join(map(str, quick_batch_sizes))} with --quick)")
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=None,
                        help=f"the other frameworks to time beside torch eager (default: "
                             f"{' '.join(PEERS)}; none with --quick); a peer that cannot run here "
                             f"is skipped with a one-line reason")
    args = parser.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = quick_batch_sizes if args.quick else batch_sizes
    if args.peers is None:
        args.peers = [] if args.quick else list(PEERS)
    set_threads(args.threads)
    rows, table, peak = throughput(args, functions, flops_per_image, warmup=warmup,
                                   latency_batch=latency_batch,
                                   min_repeat_seconds=0.0 if args.quick else min_repeat_seconds)
    return publish(args, name, {
        "dtype": "float32", **(details or {}), "peers": args.peers, "peak_flops_for_threads": peak,
        "batch_sizes": args.batch_sizes, "rows": rows, "markdown": table})


def throughput_rows(timings: Mapping[tuple[str, int], Timing], flops_per_image: int,
                    peak_flops: float) -> list[dict]:
    """Per (framework, batch size) timing of one batch: images/s, median microseconds per call,
    the speed relative to each of :data:`BASELINES` timed at the same batch size (``speed_vs``,
    :func:`paired_speed`; ``speed_vs_torch`` repeats torch eager's), and the share of
    ``peak_flops`` (FLOP/s) reached. Sorted by batch size, then baselines first in their order,
    then the others by name."""
    rows = []
    for (framework, batch_size), timing in timings.items():
        images_per_second = batch_size / timing.median
        speed_vs = {baseline: paired_speed(timings[baseline, batch_size], timing)
                    for baseline in BASELINES if (baseline, batch_size) in timings}
        rows.append({"framework": framework, "batch_size": batch_size,
                     "images_per_second": images_per_second,
                     "median_microseconds": timing.median * 1e6,
                     "speed_vs_torch": speed_vs["torch"], "speed_vs": speed_vs,
                     "share_of_peak": images_per_second * flops_per_image / peak_flops,
                     "timing": timing.to_json()})
    rows.sort(key=lambda row: (row["batch_size"], _framework_order(row["framework"])))
    return rows


def paired_speed(baseline: Timing, contender: Timing) -> float:
    """How many times faster ``contender`` ran than ``baseline``: the median, over the rounds of
    :func:`interleaved_timings`, of baseline seconds / contender seconds in the same round (the
    ratio of the two medians if their repeats do not pair up).

    Paired by round because the machine's speed drifts: these VMs switch between two speed
    levels, ~28% apart, for minutes at a time, so the two medians can come from rounds at
    different levels; the two timings of one round, seconds apart, nearly always share one."""
    if len(baseline.seconds) != len(contender.seconds):
        return baseline.median / contender.median
    return statistics.median(base / ours for base, ours in zip(baseline.seconds, contender.seconds))


def _framework_order(framework: str) -> tuple[int, str]:
    return (BASELINES.index(framework), "") if framework in BASELINES else (len(BASELINES), framework)


def throughput_table(rows: Sequence[dict], cores: int, latency_batch: int | None = None) -> str:
    """The Markdown of :func:`throughput_rows`; ``cores``: how many the peak counts.

    First every framework side by side, a line per batch size, each cell ``images/s (share of
    FP32 peak)``, plus, with ``latency_batch``, a line of that batch size's median microseconds
    per call. Then a line per numpylenet row: its speed relative to each baseline that ran.
    """
    frameworks = sorted({row["framework"] for row in rows}, key=_framework_order)
    batches = sorted({row["batch_size"] for row in rows})
    found = {(row["framework"], row["batch_size"]): row for row in rows}
    label = lambda framework: FRAMEWORK_LABELS.get(framework, framework)   # noqa: E731

    def cells(batch_size, format_row):
        return [format_row(found[framework, batch_size]) if (framework, batch_size) in found else "-"
                for framework in frameworks]

    lines = [[f"{batch_size:,}", *cells(batch_size, lambda row: f"{row['images_per_second']:,.0f} "
                                                               f"({100 * row['share_of_peak']:.1f}%)")]
             for batch_size in batches]
    if latency_batch in batches:
        lines.append([f"latency at batch {latency_batch:,} (µs per call, median)",
                      *cells(latency_batch, lambda row: f"{row['median_microseconds']:,.0f}")])
    side_by_side = markdown_table(["batch", *map(label, frameworks)], lines)
    baselines = [baseline for baseline in BASELINES if baseline in frameworks]
    ours = [row for row in rows if row["framework"] not in BASELINES]
    ratios = markdown_table(
        ["batch", "framework", *(f"speed vs {label(baseline)}" for baseline in baselines)],
        [[f"{row['batch_size']:,}", row["framework"],
          *(f"{row['speed_vs'][baseline]:.2f}x" if baseline in row["speed_vs"] else "-"
            for baseline in baselines)] for row in ours],
        align="rl" + "r" * len(baselines))
    return (f"{side_by_side}\n\nImages per second (share of the FP32 peak of {cores} "
            f"core{'s' if cores > 1 else ''}), median of the repeats; every framework on the same "
            f"weights and batches, interleaved in one process.\n\n{ratios}\n\n"
            f"Speed = the baseline's time per batch / numpylenet's in the same round, median over the rounds "
            f"(above 1: numpylenet is faster).")


def publish(args: argparse.Namespace, name: str, content: dict, note: str = "") -> dict:
    """Finish a benchmark: write ``<out>/<name>.json`` - ``benchmark``, ``meta`` (see
    :func:`metadata`), then ``content``, which holds the Markdown table as ``markdown`` - and print
    the machine, the table and ``note``. Returns what was written."""
    meta = metadata(args)
    result = {"benchmark": name, "meta": meta, **content}
    path = write_json(args.out, name, result)
    print(f"{meta['machine_summary']}; threads {args.threads}\n\n{content['markdown']}"
          f"{note and chr(10) * 2 + note}\n\nwrote {path}")
    return result


def write_json(out: Path, name: str, content: dict) -> Path:
    """Write ``<out>/<name>.json`` (creating ``out``) and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def save_figure(figure, out: Path, name: str) -> Path:
    """Save a matplotlib Figure as ``<out>/<name>.png`` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    figure.savefig(path, dpi=110)
    return path
