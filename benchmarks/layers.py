"""Where a training step's time goes: forward and backward time of every layer, numpylenet vs torch.

    python -m benchmarks.layers [--batch-size 64] [--threads 2] [--repeats 5] [--quick] [--out DIR]

At batch 64 (float32, the seed notebook's ReLU + average pooling network, identical weights), times
each stage of LeNet-5 - conv1, pool1, conv2, pool2, conv3, fc1, fc2 (a conv or fc row includes its
ReLU; conv3 includes the flatten) - forward and backward, then the loss, the Adam update and the
whole training step, for

* ``numpy``: ``numpylenet.LeNet5(backend="numpy")``, layer by layer (:mod:`numpylenet.layers`);
* ``torch``: the same stages as torch eager ops, backward through autograd (for conv1 only the
  weight gradients, as in training, since the image needs none);
* ``numba``: ``LeNet5(backend="numba")``, when it can run here. It fuses all layers into one
  forward and one backward kernel, so it has no per-layer split: it shows up in the "all layers"
  rows, the loss (the same NumPy function), the fused Adam, and the whole step.

The numpylenet loss computes the loss and its gradient in one call; it is timed as one
"forward + backward" row for every framework. "all layers" rows add up the stage rows (numpy,
torch) or time the fused kernel (numba); the "training step" row times zero_grad + forward + loss
+ backward + Adam as training runs it, so it can be compared with the sum of the parts.

Every timing is the median of ``--repeats`` round-robin repeats over all contenders
(see :mod:`benchmarks.common`).

The roofline table
------------------
A second table gives every row's FLOP per image, and, per framework, the GFLOP/s that time
reaches and its share of the machine's FP32 peak (for ``--threads`` cores), so the layer furthest
from the peak - the next bottleneck - stands out. FLOP are the arithmetic training needs, counted
from the layer shapes by :func:`flops_per_image` (a multiply-add is 2 FLOP; an exp, a log, a
square root, a division or a comparison is 1):

* conv and fc layers, with ``outputs`` values per image each summing ``k`` products (conv1 6x28x28
  outputs of k = 1x5x5, conv2 16x10x10 of 6x5x5, conv3 120 of 16x5x5, fc1 84 of 120, fc2 10 of 84):
  forward ``2 k outputs`` (the products and sums) + ``outputs`` (the bias) + ``outputs`` (the
  ReLU; fc2 has none); backward ``outputs`` (the ReLU's mask) + ``2 k outputs`` (dL/dW) +
  ``outputs`` (dL/db) + ``2 k outputs`` (dL/dinput; not for conv1, whose input is the image);
* 2x2 average pooling: forward 4 per output (3 additions and the scaling by 1/4), backward 1
  per output (the scaling; spreading it over the 4 inputs is copying);
* the loss over K = 10 classes, as :func:`numpylenet.softmax_cross_entropy` computes it:
  ``7 K + 1`` = 71 per image - the row maximum (K - 1 comparisons), the shift (K), exp (K), their
  sum (K - 1), its log (1), the log-probabilities (K), the mean of the picked ones (1); then the
  gradient: exp (K), minus the one-hot (1), divided by N (K);
* Adam, as :meth:`numpylenet.Adam.step` computes it: 13 per parameter per step - the first
  moment (g - m, times 1 - beta1, added: 3), the second (v times beta2, g squared, times
  1 - beta2, added: 4), the denominator (square root, divided by the bias correction, plus eps:
  3), the update (m divided by it, times the step size, subtracted: 3) - over 61,706 parameters,
  divided by the batch size to give a figure per image;
* "all layers" and "training step": the sums of their parts.

The time of a row is what the framework really spends on it, so the NumPy backend's conv1
backward, which also computes the input gradient that training throws away, shows the rate of
the useful work only. The step benchmark's 2.26 MFLOP per image (:func:`benchmarks.common.
training_flops_per_image`) counts the multiply-adds alone; the training step row here adds the
bias, ReLU, pooling, loss and Adam arithmetic, about 2% more.

Writes ``layers.json`` (with the roofline rows) and ``layers.png``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from benchmarks import common

NAME = "layers"
STAGES = ("conv1", "pool1", "conv2", "pool2", "conv3", "fc1", "fc2")
# Which of LeNet5.layers (conv1, relu, pool, conv2, relu, pool, conv3, relu, flatten, fc1, relu,
# fc2) make up each stage.
NUMPY_STAGE_LAYERS = {"conv1": slice(0, 2), "pool1": slice(2, 3), "conv2": slice(3, 5),
                      "pool2": slice(5, 6), "conv3": slice(6, 9), "fc1": slice(9, 11),
                      "fc2": slice(11, 12)}
FRAMEWORKS = ("torch", "numpy", "numba")   # the table's column order: the baseline first
NETWORK, LOSS, OPTIMISER, STEP = "all layers", "loss", "optimiser (Adam)", "training step"

# (values per image out, products summed per value, ReLU after it, needs dL/dinput in training)
WEIGHTED_STAGES = {"conv1": (6 * 28 * 28, 1 * 5 * 5, True, False),
                   "conv2": (16 * 10 * 10, 6 * 5 * 5, True, True),
                   "conv3": (120, 16 * 5 * 5, True, True),
                   "fc1": (84, 120, True, True), "fc2": (10, 84, False, True)}
POOL_OUTPUTS = {"pool1": 6 * 14 * 14, "pool2": 16 * 5 * 5}
NUM_CLASSES = 10
LOSS_FLOPS_PER_CLASS, LOSS_FLOPS_PER_IMAGE = 7, 1
ADAM_FLOPS_PER_PARAMETER = 13


def numpy_contenders(x: np.ndarray, labels: np.ndarray) -> dict[tuple[str, str], Callable]:
    """(row, pass) -> a function timing that piece of ``LeNet5(backend="numpy")``."""
    from numpylenet import Adam, LeNet5, softmax_cross_entropy

    model = LeNet5(seed=0, backend="numpy")
    contenders = {}
    stage_input = x
    for stage in STAGES:
        layers = model.layers[NUMPY_STAGE_LAYERS[stage]]
        output = _numpy_forward(layers, stage_input)       # fills the layers' caches for backward
        grad_output = np.ones_like(output) / output.size
        contenders[stage, "forward"] = lambda layers=layers, x=stage_input: _numpy_forward(layers, x)
        contenders[stage, "backward"] = lambda layers=layers, g=grad_output: _numpy_backward(layers, g)
        stage_input = output
    contenders[LOSS, "forward + backward"] = lambda: softmax_cross_entropy(stage_input, labels)
    optimizer = Adam(model.parameters(), lr=1e-4)
    contenders[OPTIMISER, "update"] = optimizer.step
    contenders[STEP, "whole"] = _step(model, optimizer, x, labels)
    return contenders


def _numpy_forward(layers, x):
    for layer in layers:
        x = layer.forward(x)
    return x


def _numpy_backward(layers, grad):
    for layer in reversed(layers):
        grad = layer.backward(grad)
    return grad


def _step(model, optimizer, x, labels) -> Callable[[], None]:
    """One numpylenet training step, exactly as numpylenet.loop.NumpyLearner.train_step runs it
    (forward, loss and backward in ``forward_backward``: no dL/dx)."""

    def step():
        model.zero_grad()
        model.forward_backward(x, labels)
        optimizer.step()

    return step


def torch_contenders(x: np.ndarray, labels: np.ndarray) -> dict[tuple[str, str], Callable]:
    """(row, pass) -> a function timing that piece of the notebook's torch LeNet (same weights)."""
    import torch
    import torch.nn.functional as F

    from numpylenet import LeNet5
    from reference.lenet import TorchLeNet5, copy_numpy_to_torch

    # Two copies: the optimiser changes its model's weights in place, which would invalidate the
    # autograd graphs the stage rows keep for their repeated backward passes.
    model, trained = TorchLeNet5(), TorchLeNet5()
    copy_numpy_to_torch(LeNet5(seed=0, backend="numpy"), model)
    trained.load_state_dict(model.state_dict())
    stages = {"conv1": lambda t: F.relu(model.conv1(t)), "pool1": lambda t: F.avg_pool2d(t, 2),
              "conv2": lambda t: F.relu(model.conv2(t)), "pool2": lambda t: F.avg_pool2d(t, 2),
              "conv3": lambda t: F.relu(model.conv3(t)).view(-1, 120),
              "fc1": lambda t: F.relu(model.fc1(t)), "fc2": model.fc2}
    contenders = {}
    stage_input = torch.from_numpy(x)          # the image needs no gradient, as in training
    for stage in STAGES:
        function = stages[stage]
        output = function(stage_input)
        grad_output = torch.ones_like(output) / output.numel()
        contenders[stage, "forward"] = lambda f=function, t=stage_input: f(t)
        contenders[stage, "backward"] = (
            lambda out=output, g=grad_output: torch.autograd.backward(out, g, retain_graph=True))
        stage_input = output.detach().requires_grad_(True)
    y = torch.from_numpy(labels)
    contenders[LOSS, "forward + backward"] = lambda: F.cross_entropy(stage_input, y).backward()
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-4)
    images = torch.from_numpy(x)
    F.cross_entropy(trained(images), y).backward()   # every parameter gets a .grad
    contenders[OPTIMISER, "update"] = optimizer.step

    def step():   # as reference.train.TorchLearner.train_step
        optimizer.zero_grad()
        F.cross_entropy(trained(images), y).backward()
        optimizer.step()

    contenders[STEP, "whole"] = step
    return contenders


def numba_contenders(x: np.ndarray, labels: np.ndarray) -> dict[tuple[str, str], Callable]:
    """(row, pass) -> a function timing that piece of ``LeNet5(backend="numba")``; {} when the
    backend cannot run here. Fused: one forward and one backward pass for all the layers."""
    try:
        from numpylenet.backend import numba_unavailable_reason
    except ImportError:
        return {}
    if numba_unavailable_reason() is not None:
        return {}
    from numpylenet import Adam, LeNet5, softmax_cross_entropy

    model = LeNet5(seed=0, backend="numba")
    logits = model.forward(x)
    _, grad_logits = softmax_cross_entropy(logits, labels)
    optimizer = Adam(model.parameters(), lr=1e-4)
    return {(NETWORK, "forward"): lambda: model.forward(x),
            # As training runs it: no dL/dx, like the torch rows (the image needs no gradient).
            (NETWORK, "backward"): lambda: model.backward(grad_logits, input_grad=False),
            (LOSS, "forward + backward"): lambda: softmax_cross_entropy(logits, labels),
            (OPTIMISER, "update"): optimizer.step,
            (STEP, "whole"): _step(model, optimizer, x, labels)}


def measure(batch_size: int, repeats: int, min_repeat_seconds: float,
            settle_seconds: float = common.SETTLE_SECONDS) -> dict[str, dict]:
    """Median seconds of every (framework, row, pass), all contenders interleaved in one run."""
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, 1, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 10, batch_size)
    builders = {"numpy": numpy_contenders, "torch": torch_contenders, "numba": numba_contenders}
    contenders = {(framework, *key): function for framework, build in builders.items()
                  for key, function in build(x, labels).items()}
    timings = common.interleaved_timings(contenders, repeats, min_repeat_seconds=min_repeat_seconds,
                                         settle_seconds=settle_seconds)
    results: dict[str, dict] = {}
    for (framework, row, phase), timing in timings.items():
        results.setdefault(framework, {})[f"{row}/{phase}"] = timing.to_json()
    return results


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One record per (row, pass): its median seconds per framework (None: not measured)."""
    frameworks = [f for f in FRAMEWORKS if f in results]

    def seconds(framework: str, key: str) -> float | None:
        entry = results[framework].get(key)
        return entry["median_seconds"] if entry else None

    rows = [{"layer": stage, "pass": phase,
             **{framework: seconds(framework, f"{stage}/{phase}") for framework in frameworks}}
            for stage in STAGES for phase in ("forward", "backward")]
    for phase in ("forward", "backward"):
        row = {"layer": NETWORK, "pass": phase}
        for framework in frameworks:
            parts = [seconds(framework, f"{stage}/{phase}") for stage in STAGES]
            row[framework] = (sum(parts) if None not in parts
                              else seconds(framework, f"{NETWORK}/{phase}"))
        rows.append(row)
    rows += [{"layer": row, "pass": phase,
              **{framework: seconds(framework, f"{row}/{phase}") for framework in frameworks}}
             for row, phase in ((LOSS, "forward + backward"), (OPTIMISER, "update"), (STEP, "whole"))]
    return rows


def flops_per_image(batch_size: int, num_parameters: int) -> dict[tuple[str, str], float]:
    """(row, pass) -> FLOP per image of every row of :func:`table_rows`, counted as the module
    docstring says; ``num_parameters`` (61,706 for LeNet-5) sets Adam's, shared by the batch."""
    flops: dict[tuple[str, str], float] = {}
    for stage in STAGES:
        if stage in POOL_OUTPUTS:
            flops[stage, "forward"], flops[stage, "backward"] = 4 * POOL_OUTPUTS[stage], POOL_OUTPUTS[stage]
            continue
        outputs, products, relu, input_grad = WEIGHTED_STAGES[stage]
        matmul = 2 * products * outputs
        flops[stage, "forward"] = matmul + outputs + relu * outputs
        flops[stage, "backward"] = relu * outputs + matmul + outputs + input_grad * matmul
    for phase in ("forward", "backward"):
        flops[NETWORK, phase] = sum(flops[stage, phase] for stage in STAGES)
    flops[LOSS, "forward + backward"] = LOSS_FLOPS_PER_CLASS * NUM_CLASSES + LOSS_FLOPS_PER_IMAGE
    flops[OPTIMISER, "update"] = ADAM_FLOPS_PER_PARAMETER * num_parameters / batch_size
    flops[STEP, "whole"] = (flops[NETWORK, "forward"] + flops[NETWORK, "backward"]
                            + flops[LOSS, "forward + backward"] + flops[OPTIMISER, "update"])
    return flops


def roofline_rows(rows: list[dict], frameworks: list[str], batch_size: int,
                  peak_flops: float) -> list[dict]:
    """Each row of :func:`table_rows` with its FLOP per image and, per framework timed on it,
    ``{"gflops": ..., "share_of_peak": ...}`` (``peak_flops`` in FLOP/s) under ``framework``."""
    from numpylenet import LeNet5

    flops = flops_per_image(batch_size, LeNet5(backend="numpy").num_parameters())
    result = []
    for row in rows:
        per_image = flops[row["layer"], row["pass"]]
        entry = {"layer": row["layer"], "pass": row["pass"], "flops_per_image": per_image}
        for framework in frameworks:
            seconds = row.get(framework)
            rate = per_image * batch_size / seconds if seconds else None
            entry[framework] = None if rate is None else {"gflops": rate / 1e9,
                                                          "share_of_peak": rate / peak_flops}
        result.append(entry)
    return result


def roofline_markdown(rows: list[dict], frameworks: list[str], batch_size: int, cores: int) -> str:
    """The Markdown table of :func:`roofline_rows`: GFLOP/s (share of peak) per framework."""
    lines = [[row["layer"], row["pass"], f"{row['flops_per_image']:,.0f}",
              *(f"{row[f]['gflops']:.1f} ({100 * row[f]['share_of_peak']:.1f}%)" if row.get(f)
                else "fused" for f in frameworks)] for row in rows]
    table = common.markdown_table(["layer", "pass", "FLOP per image",
                                   *(f"{framework} GFLOP/s (share of peak)" for framework in frameworks)],
                                  lines, align="ll" + "r" * (len(frameworks) + 1))
    return (f"{table}\n\nRoofline at batch {batch_size}: the FLOP per image that training needs "
            f"(2 per multiply-add; how each row's count is formed: the docstring of "
            f"benchmarks/layers.py), the rate each framework reaches on it and its share of the FP32 "
            f"peak of {cores} core{'s' if cores > 1 else ''}.")


def markdown(rows: list[dict], frameworks: list[str], batch_size: int) -> str:
    headers = ["layer", "pass"]
    for framework in frameworks:
        headers.append(f"{framework} (µs)")
        if framework != "torch":
            headers.append(f"{framework} speed-up")
    lines = []
    for row in rows:
        cells = [row["layer"], row["pass"]]
        for framework in frameworks:
            value = row.get(framework)
            cells.append(f"{value * 1e6:,.0f}" if value is not None else "fused")
            if framework != "torch":
                cells.append(f"{row['torch'] / value:.2f}x" if value and row.get("torch") else "")
        lines.append(cells)
    note = (f"Batch {batch_size}, float32; median per call. \"speed-up\" = torch's time / ours "
            f"(above 1: faster than torch). conv and fc rows include their ReLU.")
    if "numba" in frameworks:
        note += (" The numba backend fuses every layer into one forward and one backward pass, so "
                 "it has only the \"all layers\" rows.")
    return common.markdown_table(headers, lines, align="ll" + "r" * (len(headers) - 2)) + "\n\n" + note


def plot(rows: list[dict], frameworks: list[str], out, batch_size: int):
    """Horizontal bars: forward + backward time per stage, per framework."""
    from matplotlib.figure import Figure

    labels = list(STAGES) + [LOSS, OPTIMISER]
    totals = {framework: [] for framework in frameworks}
    for label in labels:
        chosen = [row for row in rows if row["layer"] == label]
        for framework in frameworks:
            values = [row[framework] for row in chosen if row.get(framework) is not None]
            totals[framework].append(sum(values) * 1e6 if values else 0.0)
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    height = 0.8 / len(frameworks)
    positions = np.arange(len(labels))
    for index, framework in enumerate(frameworks):
        axes.barh(positions + index * height, totals[framework], height, label=framework)
    axes.set_yticks(positions + height * (len(frameworks) - 1) / 2, labels)
    axes.invert_yaxis()
    axes.set(xlabel="µs per call (forward + backward)", title=f"LeNet-5 training step by layer, batch {batch_size}")
    if "numba" in frameworks:
        axes.text(0.98, 0.02, "numba: layers fused (no per-layer bars)", transform=axes.transAxes,
                  ha="right", va="bottom", fontsize=8)
    axes.legend()
    return common.save_figure(figure, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    common.set_threads(args.threads)
    results = measure(args.batch_size, args.repeats, min_repeat_seconds=0.0 if args.quick else 0.05,
                      settle_seconds=0.0 if args.quick else common.SETTLE_SECONDS)
    frameworks = [f for f in FRAMEWORKS if f in results]
    rows = table_rows(results)
    plot(rows, frameworks, args.out, args.batch_size)
    machine = common.detect_machine(args.clock_ghz, args.flop_per_cycle)
    peak = machine.peak_gflops_for(args.threads) * 1e9
    roofline = roofline_rows(rows, frameworks, args.batch_size, peak)
    cores = min(args.threads, machine.cores)
    return common.publish(args, NAME, {
        "batch_size": args.batch_size, "dtype": "float32", "frameworks": frameworks,
        "unit": "seconds per call (median)", "rows": rows, "timings": results,
        "peak_flops_for_threads": peak, "roofline": roofline,
        "markdown": (markdown(rows, frameworks, args.batch_size) + "\n\n"
                     + roofline_markdown(roofline, frameworks, args.batch_size, cores))})


if __name__ == "__main__":
    main()
