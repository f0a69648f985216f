"""Check every layer, the loss, LeNet5 and the optimisers against torch and finite differences.

Changed a layer? Run ``python -m numpylenet.check``. For every layer, the loss, the whole LeNet5
(on each backend) and two steps of Adam and of SGD it prints one line per tensor (the forward
output, the input gradient, every parameter gradient, every update), llm.c's ``test_gpt2`` style::

    what                     against        shape           max abs   max rel  tolerance
    ReLU() grad_input        torch float64  (2, 3, 4, 5)    0.0e+00   0.0e+00      1e-09  OK
    ReLU() grad_input        finite diff.   (2, 3, 4, 5)    1.5e-09   4.9e-10      1e-06  OK

against three independent truths:

* torch in float64 (the same numbers up to the order of additions: tolerance 1e-9 relative);
* torch in float32 (tolerance 2e-5, justified in :mod:`numpylenet.compare`);
* central finite differences in float64, which need no torch (tolerance 1e-6); the optimisers,
  which have no gradient, are compared with their papers' formulas instead.

Without torch installed it runs the float64 half that needs no torch and says how to get the rest.
Exit status: 0 when every tensor is within its tolerance, 1 when any is not, 2 for a bad command line.

    python -m numpylenet.check                    # everything, a few seconds
    python -m numpylenet.check --layer maxpool2d  # one layer (or loss, LeNet5, Adam, SGD)
    python -m numpylenet.check --dtype float64 --seed 3
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backend import numba_unavailable_reason
from .compare import (HEADER, Comparison, layer_vs_finite_differences, layer_vs_torch,
                      lenet5_vs_finite_differences, lenet5_vs_torch, loss_vs_finite_differences,
                      loss_vs_torch, optimizer_vs_formula, optimizer_vs_torch, torch_dtype, torch_lenet5)
from .layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid, Tanh
from .model import LeNet5
from .names import DTYPE_NAMES
from .cli import non_negative_int
from .train import OneLineErrorParser

__all__ = ["main", "build_parser", "LAYER_CASES", "GROUPS"]

PROG = "python -m numpylenet.check"
NEEDS_TORCH = 'for the comparisons with torch, install it: pip install -e ".[reference]"'
# The whole network against torch as the seed notebook builds it; against finite differences with
# a smooth activation and average pooling: a ReLU kink, or a max-pooling window whose two largest
# inputs lie within the difference step, makes the numerical gradient wrong, not ours. With tanh
# and max pooling that happened for 19 of seeds 0-29 (saturated tanh outputs tie at exactly 1).
LENET5_TORCH = ("relu", "avg")
LENET5_FINITE_DIFFERENCES = ("tanh", "avg")
LENET5_BATCH = 2
# Two steps, so the second uses the state the first left (Adam's moments, SGD's momentum).
OPTIMIZER_STEPS = 2
OPTIMIZERS = {
    "Adam": ("adam", {"lr": 1e-2, "weight_decay": 1e-2}),
    "SGD": ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
}
COMPILE_NOTICE_AFTER = 2.0   # seconds: loading cached kernels takes well under that


@dataclass(frozen=True)
class LayerCase:
    """One layer to check: our class (``torch.nn`` has one of the same name), its arguments, an input.

    Layers with parameters (their constructor takes ``rng``) get the dtype and a seeded rng.
    """

    layer: type
    args: tuple
    input_shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        arguments = [repr(value) for value in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.layer.__name__}({', '.join(arguments)})"

    def has_parameters(self) -> bool:
        return "rng" in inspect.signature(self.layer).parameters

    def make_ours(self, seed: int) -> Callable:
        """callable(dtype) -> our layer, as :func:`numpylenet.compare.layer_vs_torch` takes it."""
        if self.has_parameters():
            return lambda dtype: self.layer(*self.args, **self.kwargs, dtype=dtype, rng=seed)
        return lambda dtype: self.layer(*self.args, **self.kwargs)

    def make_torch(self):
        import torch

        return getattr(torch.nn, self.layer.__name__)(*self.args, **self.kwargs)


LAYER_CASES = [
    LayerCase(Conv2d, (3, 4, 3), (2, 3, 7, 7)),
    LayerCase(Conv2d, (3, 4, 3), (2, 3, 8, 9), {"stride": 2, "padding": 1}),
    LayerCase(Conv2d, (2, 3, (3, 2)), (2, 2, 7, 8), {"stride": (2, 1), "padding": 1}),
    LayerCase(AvgPool2d, (2,), (2, 3, 6, 7)),
    LayerCase(AvgPool2d, (3,), (2, 2, 7, 8), {"stride": 2}),
    LayerCase(MaxPool2d, (2,), (2, 3, 6, 7)),
    LayerCase(MaxPool2d, (3,), (2, 2, 7, 8), {"stride": 2}),
    LayerCase(ReLU, (), (2, 3, 4, 5)),
    LayerCase(Tanh, (), (2, 3, 4, 5)),
    LayerCase(Sigmoid, (), (2, 3, 4, 5)),
    LayerCase(Flatten, (), (2, 3, 2, 2)),
    LayerCase(Linear, (6, 4), (3, 6)),
]
GROUPS = tuple(dict.fromkeys(case.layer.__name__ for case in LAYER_CASES)) + ("loss", "LeNet5", "Adam", "SGD")


@dataclass(frozen=True)
class Check:
    """One comparison to run: ``run()`` returns its rows. ``group`` is what ``--layer`` selects."""

    group: str
    label: str
    against: str
    run: Callable[[], list]


def layer_checks(dtypes: Sequence[str], seed: int, torch: bool) -> Iterator[Check]:
    for case in LAYER_CASES:
        group = case.layer.__name__
        for dtype in dtypes if torch else ():
            yield Check(group, case.label, f"torch {dtype}", lambda case=case, dtype=dtype: layer_vs_torch(
                case.make_ours(seed), case.make_torch, case.input_shape, dtype, seed=seed, label=case.label))
        if "float64" in dtypes:
            yield Check(group, case.label, "finite diff.", lambda case=case: layer_vs_finite_differences(
                case.make_ours(seed)("float64"), case.input_shape, seed=seed, label=case.label))


def loss_checks(dtypes: Sequence[str], seed: int, torch: bool) -> Iterator[Check]:
    rng = np.random.default_rng(seed)
    logits, labels = 3 * rng.standard_normal((4, 10)), rng.integers(0, 10, size=4)
    label = "softmax_cross_entropy"
    for dtype in dtypes if torch else ():
        yield Check("loss", label, f"torch {dtype}", lambda dtype=dtype: loss_vs_torch(logits.astype(dtype), labels))
    if "float64" in dtypes:
        yield Check("loss", label, "finite diff.", lambda: loss_vs_finite_differences(logits, labels))


def lenet5_checks(dtypes: Sequence[str], seed: int, torch: bool, backends: Sequence[str]) -> Iterator[Check]:
    rng = np.random.default_rng(seed)
    images, labels = rng.standard_normal((LENET5_BATCH, 1, 32, 32)), rng.integers(0, 10, size=LENET5_BATCH)

    def model(activation: str, pool: str, dtype: str, backend: str) -> LeNet5:
        return LeNet5(activation=activation, pool=pool, dtype=dtype, seed=seed, backend=backend)

    def against_torch(activation: str, pool: str, dtype: str, backend: str, label: str) -> list:
        twin = torch_lenet5(activation, pool).to(torch_dtype(dtype))
        return lenet5_vs_torch(model(activation, pool, dtype, backend), twin, images.astype(dtype), labels,
                               label=label)

    for backend in backends:
        label = f"LeNet5 {'/'.join(LENET5_TORCH)} {backend}"
        for dtype in dtypes if torch else ():
            yield Check("LeNet5", label, f"torch {dtype}", lambda dtype=dtype, backend=backend, label=label:
                        against_torch(*LENET5_TORCH, dtype, backend, label))
        if "float64" in dtypes:
            label = f"LeNet5 {'/'.join(LENET5_FINITE_DIFFERENCES)} {backend}"
            yield Check("LeNet5", label, "finite diff.", lambda backend=backend, label=label:
                        lenet5_vs_finite_differences(model(*LENET5_FINITE_DIFFERENCES, "float64", backend),
                                                     images, labels, rng=seed, label=label))


def optimizer_checks(name: str, dtypes: Sequence[str], seed: int, torch: bool,
                     backends: Sequence[str]) -> Iterator[Check]:
    """Steps on a LeNet5's parameters (so the numba backend's fused update is checked too), with
    random gradients spanning 1e-9 to 1, so that Adam's eps (1e-8) matters where it is added."""
    kind, hyper = OPTIMIZERS[name]
    size = LeNet5(seed=0, backend="numpy").num_parameters()
    rng = np.random.default_rng(seed)
    gradients = [rng.standard_normal(size) * 10.0 ** rng.uniform(-9, 0, size) for _ in range(OPTIMIZER_STEPS)]
    for backend in backends:
        label = f"{name} {backend}"

        def params(dtype, backend=backend):
            return LeNet5(dtype=dtype, seed=seed, backend=backend).parameters()

        for dtype in dtypes if torch else ():
            yield Check(name, label, f"torch {dtype}", lambda dtype=dtype, label=label: optimizer_vs_torch(
                kind, hyper, params(dtype), [g.astype(dtype) for g in gradients], label=label))
        if "float64" in dtypes:
            yield Check(name, label, "the formula", lambda label=label, params=params: optimizer_vs_formula(
                kind, hyper, params("float64"), gradients, label=label))


def all_checks(groups: Sequence[str], dtypes: Sequence[str], seed: int, torch: bool,
               backends: Sequence[str]) -> Iterator[Check]:
    """Every check of the selected groups, in the order of :data:`GROUPS`."""
    for check in layer_checks(dtypes, seed, torch):
        if check.group in groups:
            yield check
    if "loss" in groups:
        yield from loss_checks(dtypes, seed, torch)
    if "LeNet5" in groups:
        yield from lenet5_checks(dtypes, seed, torch, backends)
    for name in OPTIMIZERS:
        if name in groups:
            yield from optimizer_checks(name, dtypes, seed, torch, backends)


def run_check(check: Check) -> list:
    """The check's rows; a check that raised becomes one failing row saying what it raised."""
    try:
        return check.run()
    except Exception as error:   # a learner's broken layer may raise anything: report it, go on
        return [Comparison(f"{check.label} (raised)", check.against, "", math.nan, math.inf, math.nan,
                           note=f"{type(error).__name__}: {error}")]


def prepare_numba(dtypes: Sequence[str]) -> None:
    """Compile the numba kernels (or load them from Numba's disk cache), saying so if that is slow."""
    notice = threading.Timer(COMPILE_NOTICE_AFTER, lambda: print(
        "numba: compiling the kernels, which are not in Numba's cache yet (once: a minute or two) ...",
        flush=True))
    from .engine import NumbaLeNet5     # here: checking the numpy backend needs no Numba

    started = time.perf_counter()
    notice.start()
    try:
        for dtype in dtypes:
            NumbaLeNet5.compile(np.dtype(dtype))
    finally:
        notice.cancel()
    seconds = time.perf_counter() - started
    if seconds > COMPILE_NOTICE_AFTER:
        print(f"numba: kernels ready in {seconds:.0f} s (cached for the next run)", flush=True)


def torch_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    torch.set_num_threads(1)   # tiny tensors: a second thread only waits (and the machine may be shared)
    return True


def group_name(text: str) -> str:
    """``--layer``'s type: a group name, any case."""
    names = {name.lower(): name for name in GROUPS}
    if text.lower() not in names:
        raise argparse.ArgumentTypeError(f"unknown layer {text!r}: choose from {', '.join(GROUPS)}")
    return names[text.lower()]


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=group_name, metavar="NAME",
                        help=f"check only this: one of {', '.join(GROUPS)} (any case); default: everything")
    parser.add_argument("--dtype", choices=DTYPE_NAMES,
                        help="only this dtype (finite differences and formulas are float64 only); default: both")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seeds every input, weight and gradient (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m numpylenet.check``; returns the exit status."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    groups = [args.layer] if args.layer else list(GROUPS)
    dtypes = [args.dtype] if args.dtype else ["float64", "float32"]
    torch = torch_available()
    if not torch and "float64" not in dtypes:
        print(f"{PROG}: nothing to check: float32 is only compared with torch, which is not installed "
              f"({NEEDS_TORCH})", file=sys.stderr)
        return 2

    numba_reason = numba_unavailable_reason()
    backends = ["numpy"] + (["numba"] if numba_reason is None else [])
    truths = [f"torch ({' and '.join(dtypes)})"] if torch else []
    if "float64" in dtypes:
        truths += ["central finite differences (float64)"] if set(groups) - set(OPTIMIZERS) else []
        truths += ["the optimisers' formulas (float64)"] if set(groups) & set(OPTIMIZERS) else []
    print(f"{PROG}: {', '.join(groups) if args.layer else 'every layer, the loss, LeNet5, Adam and SGD'} "
          f"against {', '.join(truths[:-1]) + ' and ' if len(truths) > 1 else ''}{truths[-1]}; seed {args.seed}")
    if not torch:
        print(f"torch is not installed: running the half that needs no torch ({NEEDS_TORCH})")
    if {"LeNet5", "Adam", "SGD"} & set(groups):
        print(f"backends: {', '.join(backends)}"
              + (f" (numba skipped: {numba_reason})" if numba_reason else ""))
        if numba_reason is None:
            try:
                prepare_numba(dtypes)
            except Exception as error:   # the numba checks below will fail and say where
                print(f"numba: preparing the kernels failed: {type(error).__name__}: {error}")

    print(HEADER)
    rows, failed_groups = [], {}
    for check in all_checks(groups, dtypes, args.seed, torch, backends):
        for row in run_check(check):
            print(row.line(), flush=True)
            rows.append(row)
            if not row.ok:
                failed_groups.setdefault(check.group, []).append(row)

    failures = [row for group in failed_groups.values() for row in group]
    seconds = time.perf_counter() - started
    if not failures:
        print(f"OK: all {len(rows)} tensors within tolerance ({seconds:.1f} s)")
    else:
        print(f"\n{len(failures)} of {len(rows)} tensors over tolerance:")
        for row in failures:
            print(row.line())
        # LeNet5 fails along with any layer it is built from: the layers, listed first, say which.
        print(f"NOT OK: {', '.join(failed_groups)} ({len(failures)} of {len(rows)} tensors; {seconds:.1f} s)")
    if not torch:
        print(f"(torch not installed: {NEEDS_TORCH})")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:   # the reader went away (| head): stop as a writer killed by SIGPIPE
        sys.stderr.close()
        sys.exit(141)
