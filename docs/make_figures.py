"""Draw every figure of the guided tour (docs/tour.md) into docs/figures/.

Run from anywhere, with the dev and reference extras installed (it needs torch)::

    python docs/make_figures.py

It takes about 15 s on a two-core machine and writes

* ``im2col.png``          - the worked example of the tour: a 1x4x4 input, a 2x2 kernel, the column
                            matrix that ``numpylenet.im2col`` builds and the product that is the convolution;
* ``learning_curves.png`` - numpylenet and torch trained side by side from the same weights on the same
                            batches, and the gap between their losses in float32 and in float64;
* ``feature_maps.png``    - one validation digit through every layer of the model just trained;
* ``conv1_filters.png``   - that model's six conv1 filters (drawn by ``numpylenet.plots``).

Everything is seeded and uses only the MNIST sample bundled with the package
(``load_mnist(dataset="mnist-sample")``: 6,000 training images, of which the seed's split keeps 5,400
for training and 600 for validation), with no network, and every run draws the same figures.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from threadpoolctl import threadpool_limits

from numpylenet import Adam, Conv2d, LeNet5, data, im2col, softmax_cross_entropy
from numpylenet.loss import log_softmax
from numpylenet.plots import plot_conv1_filters
from reference.lenet import TorchLeNet5, copy_numpy_to_torch

FIGURES = Path(__file__).resolve().parent / "figures"
SEED = 0
BATCH_SIZE = 64
LR = 3e-3
# 400 steps of 64 images is about 4.7 passes over the sample's 5,400 training images: enough for
# ~96% validation accuracy and for conv1's filters to show structure, in a few seconds.
STEPS = 400
EVAL_EVERY = 25
# The float64 comparison only needs to show that the two frameworks agree to round-off.
FLOAT64_STEPS = 100
FLOAT64_BATCH_SIZE = 16


# --------------------------------------------------------------------------------------------
# The im2col picture

WORKED_INPUT = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)   # the tour's 1x4x4 input
WORKED_KERNEL = np.array([[1.0, 2.0], [3.0, 4.0]])                        # the tour's 2x2 kernel


def draw_matrix(axes, matrix: np.ndarray, title: str, highlight: dict[int, str] | None = None) -> None:
    """Write a small integer matrix into ``axes`` as a grid of numbered cells.

    ``highlight`` maps a column index to the colour of that column's cells.
    """
    rows, cols = matrix.shape
    for r in range(rows):
        for c in range(cols):
            colour = (highlight or {}).get(c, "white")
            axes.add_patch(Rectangle((c, rows - 1 - r), 1, 1, facecolor=colour, edgecolor="black",
                                     alpha=0.55 if colour != "white" else 1.0))
            axes.text(c + 0.5, rows - 0.5 - r, f"{matrix[r, c]:g}", ha="center", va="center",
                      fontsize=11)
    axes.set(xlim=(-0.1, cols + 0.1), ylim=(-0.1, rows + 0.1), aspect="equal", title=title)
    axes.axis("off")


def plot_im2col(path: Path) -> None:
    """Input with three of its windows, the column matrix with those columns, and Y = W_mat @ cols."""
    cols = im2col(WORKED_INPUT, (2, 2))                                   # (4, 9)
    weight_row = WORKED_KERNEL.reshape(1, 4)                              # W_mat, (1, 4)
    conv = Conv2d(1, 1, 2, dtype=np.float64)
    conv.weight.data[...] = WORKED_KERNEL
    conv.bias.data[...] = 0
    output = conv.forward(WORKED_INPUT)[0, 0]                             # (3, 3)

    windows = {0: "tab:red", 4: "tab:green", 8: "tab:blue"}   # column index = output pixel oh * 3 + ow
    figure = Figure(figsize=(15, 4.2), layout="constrained")
    grid = figure.add_gridspec(1, 4, width_ratios=[4, 9.5, 4, 3.2])
    image_axes, cols_axes, kernel_axes, output_axes = (figure.add_subplot(grid[0, i]) for i in range(4))

    draw_matrix(image_axes, WORKED_INPUT[0, 0], "input x (1x4x4)")
    for column, colour in windows.items():
        top, left = divmod(column, 3)
        inset = 0.06 * (1 + list(windows).index(column))
        image_axes.add_patch(Rectangle((left + inset, 4 - top - 2 + inset), 2 - 2 * inset, 2 - 2 * inset,
                                       fill=False, edgecolor=colour, linewidth=3))

    draw_matrix(cols_axes, cols, "cols = im2col(x, (2, 2))   shape (4, 9)", windows)
    cols_axes.text(-0.2, 2, "row (c, i, j) = kernel offset\n(0,0,0)\n(0,0,1)\n(0,1,0)\n(0,1,1)",
                   ha="right", va="center", fontsize=8)
    cols_axes.text(4.5, -0.35, "column (n, oh, ow) = output pixel: (0,0,0) (0,0,1) ... (0,2,2)",
                   ha="center", va="top", fontsize=8)

    draw_matrix(kernel_axes, weight_row.reshape(2, 2), "kernel W (2x2)\nW_mat = [1 2 3 4]")
    draw_matrix(output_axes, output, "Y = W_mat @ cols\nreshaped to 3x3")
    for column, colour in windows.items():
        top, left = divmod(column, 3)
        output_axes.add_patch(Rectangle((left, 2 - top), 1, 1, facecolor=colour, alpha=0.55))
    assert np.allclose(output.reshape(1, 9), weight_row @ cols)
    figure.suptitle("im2col: every 2x2 window of x becomes one column; the convolution is then one "
                    "matrix product (coloured: three windows, their columns, their outputs)")
    figure.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# Training numpylenet and torch side by side

@dataclass
class Curves:
    """Per-step training losses and periodic validation accuracies of one framework."""

    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    seconds: float = 0.0


def training_batches(images: np.ndarray, labels: np.ndarray, steps: int, batch_size: int,
                     dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` augmented batches, drawn once so both frameworks see identical pixels.

    Each epoch is a fresh seeded permutation (:func:`numpylenet.data.batch_indices`); each batch is
    randomly cropped from the zero-padded image (the seed's ``RandomCrop(32, padding=4)``, a shift
    of up to 2 pixels) and scaled to [0, 1] (``ToTensor``).
    """
    rng = np.random.default_rng(SEED)
    batches = []
    while len(batches) < steps:
        for indices in data.batch_indices(len(images), batch_size, rng=rng):
            if len(indices) < batch_size or len(batches) == steps:
                continue
            cropped = data.random_crop(images[indices], size=32, padding=4, rng=rng)
            batches.append((data.to_float(cropped, dtype=dtype), labels[indices]))
    return batches


def numpy_step(model: LeNet5, optimizer: Adam, x: np.ndarray, y: np.ndarray) -> float:
    optimizer.zero_grad()
    loss, grad_logits = softmax_cross_entropy(model.forward(x), y)
    model.backward(grad_logits)
    optimizer.step()
    return loss


def torch_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: np.ndarray,
               y: np.ndarray) -> float:
    optimizer.zero_grad()
    loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    optimizer.step()
    return loss.item()


def train_twins(batches, valid: tuple[np.ndarray, np.ndarray] | None, dtype):
    """Train LeNet5 and its torch twin from the same initial weights on ``batches``.

    Returns the trained numpylenet model and the two frameworks' :class:`Curves`.
    """
    model = LeNet5(dtype=dtype, seed=SEED, backend="numpy")    # the path the tour explains
    twin = TorchLeNet5("relu", "avg").to({np.float32: torch.float32, np.float64: torch.float64}[dtype])
    copy_numpy_to_torch(model, twin)
    learners = {"numpylenet": (model, Adam(model.parameters(), lr=LR), numpy_step,
                               lambda x: model.forward(x)),
                "torch": (twin, torch.optim.Adam(twin.parameters(), lr=LR), torch_step,
                          lambda x: twin(torch.from_numpy(x)).detach().numpy())}
    curves = {}
    for name, (network, optimizer, step, logits) in learners.items():
        curve = curves[name] = Curves()
        start = time.perf_counter()
        for index, (x, y) in enumerate(batches, start=1):
            curve.losses.append(step(network, optimizer, x, y))
            if valid is not None and (index % EVAL_EVERY == 0 or index == 1):
                curve.eval_steps.append(index)
                curve.accuracies.append(float(np.mean(logits(valid[0]).argmax(axis=1) == valid[1])))
        curve.seconds = time.perf_counter() - start
    return model, curves


def plot_learning_curves(curves32: dict[str, Curves], curves64: dict[str, Curves], path: Path) -> None:
    """numpylenet | torch | the relative gap between their per-step losses (float32 and float64)."""
    figure = Figure(figsize=(15, 4.2), layout="constrained")
    panels = figure.subplots(1, 3)
    for axes, (name, curve) in zip(panels[:2], curves32.items()):
        steps = np.arange(1, len(curve.losses) + 1)
        window = 20
        smooth = np.convolve(curve.losses, np.ones(window) / window, mode="valid")
        axes.plot(steps, curve.losses, color="C0", alpha=0.25, linewidth=0.8)
        axes.plot(steps[window - 1:], smooth, color="C0", label=f"training loss ({window}-step mean)")
        axes.set(xlabel="step (batch of 64)", ylabel="cross-entropy loss", yscale="log", ylim=(0.02, 3),
                 title=f"{name}, float32 ({curve.accuracies[-1]:.1%} validation accuracy)")
        accuracy_axes = axes.twinx()
        accuracy_axes.plot(curve.eval_steps, 100 * np.array(curve.accuracies), "s-", color="C1",
                           markersize=3, label="validation accuracy")
        accuracy_axes.set(ylabel="validation accuracy (%)", ylim=(0, 100))
        axes.grid(alpha=0.3)
        lines = axes.get_legend_handles_labels()[0] + accuracy_axes.get_legend_handles_labels()[0]
        axes.legend(lines, [line.get_label() for line in lines], loc="lower center")
    gap = panels[2]
    for label, curves, colour in (("float32", curves32, "C3"), ("float64", curves64, "C2")):
        ours, theirs = (np.array(c.losses) for c in curves.values())
        relative = np.abs(ours - theirs) / np.abs(theirs)
        steps = np.arange(1, len(ours) + 1)
        exact = relative == 0       # a log axis cannot show 0: those steps are counted in the legend
        gap.plot(steps[~exact], relative[~exact], ".", color=colour, markersize=3,
                 label=f"{label} ({exact.sum()} of {len(ours)} steps equal to the last bit)")
    for label, colour in (("float32", "C3"), ("float64", "C2")):
        eps = np.finfo(label).eps
        gap.axhline(eps, color=colour, linestyle=":", linewidth=1)
        gap.text(len(curves32["torch"].losses), eps * 2, f"{label} machine epsilon", color=colour,
                 fontsize=8, ha="right")
    gap.set(xlabel="step", ylabel="|loss_numpylenet - loss_torch| / loss_torch", yscale="log",
            ylim=(1e-17, 1), title="The gap between the two losses")
    gap.grid(alpha=0.3)
    gap.legend(loc="center right", fontsize=8)
    figure.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# Feature maps and filters of the trained model

def layer_outputs(model: LeNet5, x: np.ndarray) -> list[np.ndarray]:
    """Run one batch through ``model.layers`` and keep every layer's output."""
    outputs = []
    for layer in model.layers:
        x = layer.forward(x)
        outputs.append(x)
    return outputs


def plot_feature_maps(model: LeNet5, image: np.ndarray, label: int, path: Path) -> None:
    """One digit (1, 1, 32, 32) through the network: one row of images per stage."""
    outputs = layer_outputs(model, image)
    # The stages worth drawing: after each activation, each pooling, and the logits.
    after = {"conv1 + ReLU": 1, "pool1 (avg 2x2)": 2, "conv2 + ReLU": 4, "pool2 (avg 2x2)": 5,
             "conv3 + ReLU": 7, "fc1 + ReLU": 10, "fc2 (logits)": 11}
    maps = {name: outputs[index][0] for name, index in after.items()}
    maps["input"] = image[0]

    figure = Figure(figsize=(16, 9.5), layout="constrained")
    top, conv2_row, pool2_row, last_row = figure.subfigures(4, 1, height_ratios=[1.25, 1.1, 1.1, 1.5])
    rows = list(zip(top.subfigures(1, 3, width_ratios=[1.5, 6, 6]), ("input", "conv1 + ReLU", "pool1 (avg 2x2)")))
    rows += [(conv2_row, "conv2 + ReLU"), (pool2_row, "pool2 (avg 2x2)")]
    for subfigure, name in rows:
        stack = maps[name]
        subfigure.suptitle(f"{name}: {stack.shape[0]} x {stack.shape[1]}x{stack.shape[2]}", fontsize=11)
        for axes, channel in zip(np.atleast_1d(subfigure.subplots(1, stack.shape[0])), stack):
            axes.imshow(channel, cmap="viridis")
            axes.axis("off")
    bottom = last_row.subplots(1, 3, width_ratios=[3, 2.3, 1.4])
    for axes, name in zip(bottom[:2], ("conv3 + ReLU", "fc1 + ReLU")):
        vector = maps[name].ravel()
        axes.imshow(vector.reshape(-1, 12), cmap="viridis", aspect="auto")
        axes.set(title=f"{name}: {vector.size} numbers (rows of 12)", xticks=[], yticks=[])
    probabilities = np.exp(log_softmax(maps["fc2 (logits)"][np.newaxis]))[0]
    bottom[2].bar(range(10), probabilities, color=["C1" if k == label else "C0" for k in range(10)])
    bottom[2].set(title=f"softmax(logits); label {label}", xticks=range(10), ylim=(0, 1))
    figure.suptitle("One validation digit through the trained LeNet5 (each map on its own colour scale)")
    figure.savefig(path, dpi=80)


# --------------------------------------------------------------------------------------------

def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    torch.manual_seed(SEED)
    start = time.perf_counter()
    plot_im2col(FIGURES / "im2col.png")

    images, labels = data.load_mnist(dataset="mnist-sample", train=True)
    train_indices, valid_indices = data.split_train_valid(len(images), valid_size=0.1, seed=0)
    valid = (data.to_float(data.pad_to(images[valid_indices], 32)), labels[valid_indices])
    train_images, train_labels = images[train_indices], labels[train_indices]

    # One thread each: on a shared two-core machine, NumPy's BLAS and torch otherwise oversubscribe.
    torch.set_num_threads(1)
    with threadpool_limits(1):
        model, curves32 = train_twins(training_batches(train_images, train_labels, STEPS, BATCH_SIZE,
                                                       np.float32), valid, np.float32)
        _, curves64 = train_twins(training_batches(train_images, train_labels, FLOAT64_STEPS,
                                                   FLOAT64_BATCH_SIZE, np.float64), None, np.float64)
    for name, curve in curves32.items():
        print(f"{name:>10}: {STEPS} steps in {curve.seconds:5.1f} s, final loss {curve.losses[-1]:.4f}, "
              f"validation accuracy {curve.accuracies[-1]:.2%}")
    plot_learning_curves(curves32, curves64, FIGURES / "learning_curves.png")

    digit = 0   # the first validation image
    plot_feature_maps(model, valid[0][digit:digit + 1], int(valid[1][digit]), FIGURES / "feature_maps.png")
    plot_conv1_filters(model.conv1.weight.data, FIGURES / "conv1_filters.png")
    print(f"wrote {', '.join(sorted(p.name for p in FIGURES.glob('*.png')))} to {FIGURES} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
