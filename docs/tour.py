# %% [markdown]
# # LeNet-5 by hand: the guided tour as a notebook
#
# This notebook runs [the guided tour](tour.md) cell by cell: one batch of MNIST digits through
# LeNet-5, the loss, the backward pass (checked by finite differences, here, by hand), torch's
# numbers beside ours, one Adam step written out, a short training run and the filters it learns.
# It uses only the MNIST sample bundled with numpylenet, so it needs no network, and it runs top to
# bottom in well under a minute. Each section links the functions it runs (file, then function
# name): read the code next to the numbers.
#
# To open it: `pip install -e ".[notebook]"`, then `jupyter lab docs/tour.ipynb`. The cells that
# compare with torch need the `reference` extra too (`pip install -e ".[notebook,reference]"`);
# without torch they say so and skip.
#
# This notebook is generated: its source is `docs/tour.py` (jupytext's percent format), and
# `python docs/make_notebook.py` runs it and writes `docs/tour.ipynb` with its outputs.
#
# Changed a layer? Run `python -m numpylenet.check`
# ([`numpylenet/check.py: main`](../numpylenet/check.py)): every layer, the loss, the whole
# network and the optimisers against torch and finite differences, one line per tensor, OK or
# NOT OK. Then restart the kernel and run this notebook again: it imports the numpylenet of
# this checkout, so it runs your code.

# %%
import sys
from pathlib import Path

# The numpylenet of this checkout (the folder above docs/), even where another copy is installed.
ROOT = Path.cwd().parent if Path.cwd().name == "docs" else Path.cwd()
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import numpy as np

import numpylenet
from numpylenet import Adam, Conv2d, LeNet5, col2im, data, im2col, softmax_cross_entropy
from numpylenet.compare import relative_error
from numpylenet.loss import log_softmax

np.set_printoptions(precision=4, suppress=True, linewidth=100)
print("numpylenet", numpylenet.__version__, "from", Path(numpylenet.__file__).parent.relative_to(ROOT))

try:  # torch is optional: only the side-by-side section needs it
    import torch

    from reference import TorchLeNet5, copy_numpy_to_torch
except ImportError:
    torch = None
NEEDS_TORCH = 'skipped: this cell needs torch (pip install -e ".[reference]")'
print("torch", torch.__version__ if torch else "is not installed: the cells that need it will say so")

# %% [markdown]
# ## 1. The data
#
# [`numpylenet/data.py: load_mnist`](../numpylenet/data.py) reads the IDX files (a tiny header,
# then raw bytes) into `images`, uint8 of shape `(N, 28, 28)` with values 0-255, and `labels`,
# int64 of shape `(N,)`. `dataset="mnist-sample"` reads the 6,000 training images bundled in the
# package. [`numpylenet/data.py: split_train_valid`](../numpylenet/data.py) holds out 10% for
# validation exactly as the seed notebook does (`np.random.seed(0)`, shuffle, the first 10%).

# %%
images, labels = data.load_mnist(dataset="mnist-sample", train=True)
print("images", images.dtype, images.shape, "values", images.min(), "to", images.max())
print("labels", labels.dtype, labels.shape, "counts per digit", np.bincount(labels))
train_indices, valid_indices = data.split_train_valid(len(images), valid_size=0.1, seed=0)
print(len(train_indices), "training and", len(valid_indices), "validation images")

figure, axes = plt.subplots(2, 8, figsize=(8, 2.4))
for ax, index in zip(axes.ravel(), range(16)):
    ax.imshow(images[index], cmap="gray_r")
    ax.set_title(str(labels[index]), fontsize=9)
    ax.axis("off")
figure.suptitle("The first 16 images of the sample, with their labels")
plt.show()

# %% [markdown]
# LeNet-5 wants 32x32 inputs. For evaluation [`numpylenet/data.py: pad_to`](../numpylenet/data.py)
# adds a 2-pixel border of zeros; for training the seed's `RandomCrop(32, padding=4)`,
# [`numpylenet/data.py: random_crop`](../numpylenet/data.py), pads 4 pixels and cuts a random
# 32x32 window, shifting the digit by up to 2 pixels each way. Then
# [`numpylenet/data.py: to_float`](../numpylenet/data.py) is torchvision's `ToTensor`: `pixel / 255`
# in float32, with a channel axis, shape `(N, 1, 32, 32)`.

# %%
x_valid = data.to_float(data.pad_to(images[valid_indices], 32))
y_valid = labels[valid_indices]
print("x_valid", x_valid.dtype, x_valid.shape, "values", x_valid.min(), "to", x_valid.max())

rng = np.random.default_rng(0)
one_digit = np.repeat(images[valid_indices[:1]], 6, axis=0)
shifted = data.to_float(data.random_crop(one_digit, size=32, padding=4, rng=rng))
figure, axes = plt.subplots(1, 7, figsize=(8, 1.6))
for ax, picture, title in zip(axes, [x_valid[0, 0], *shifted[:, 0]], ["centred", *["random crop"] * 6]):
    ax.imshow(picture, cmap="gray_r")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. im2col: a convolution is one matrix multiply
#
# [`numpylenet/layers.py: im2col`](../numpylenet/layers.py) writes every kernel-sized window of the
# input as one column. The tour's worked example: a 4x4 input, a 2x2 kernel, stride 1. Row
# `(c, i, j)` of `cols` is the offset `(i, j)` inside the window, column `(n, oh, ow)` the output
# pixel, so `cols[(c, i, j), (n, oh, ow)] = x[n, c, oh + i, ow + j]`.

# %%
x = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)
print("x (1, 1, 4, 4):\n", x[0, 0].astype(int))
cols = im2col(x, (2, 2))
print("cols = im2col(x, (2, 2)), shape", cols.shape, "- one column per 2x2 window:\n", cols.astype(int))

# %% [markdown]
# With the kernel `W = [[1, 2], [3, 4]]` flattened in the same `(c, i, j)` order, `W_mat @ cols`
# computes all nine dot products at once. [`numpylenet/layers.py: Conv2d.forward`](../numpylenet/layers.py)
# does exactly this (plus the bias, and a reshape to `(N, C_out, OH, OW)`), and the definition, the
# kernel's dot product with each window, agrees:

# %%
W = np.array([[1.0, 2.0], [3.0, 4.0]])
Y = W.reshape(1, 4) @ cols
print("W_mat @ cols, reshaped to 3x3:\n", Y.reshape(3, 3).astype(int))

conv = Conv2d(1, 1, 2, dtype=np.float64)
conv.weight.data[...] = W
conv.bias.data[...] = 0
by_definition = np.array([[np.sum(x[0, 0, i:i + 2, j:j + 2] * W) for j in range(3)] for i in range(3)])
print("Conv2d.forward equals it:", np.array_equal(conv.forward(x)[0, 0], Y.reshape(3, 3)),
      "| so does the definition:", np.array_equal(by_definition, Y.reshape(3, 3)))

# %% [markdown]
# Going backwards, [`numpylenet/layers.py: col2im`](../numpylenet/layers.py) is the adjoint: it
# adds every column back onto its window, so a pixel that sat in several windows receives the sum
# of their gradients. A column matrix of ones counts the windows covering each pixel, and the
# adjoint identity `sum(im2col(x) * G) == sum(x * col2im(G))` holds for any `G`:

# %%
print("windows covering each pixel:\n", col2im(np.ones_like(cols), x.shape, (2, 2))[0, 0].astype(int))
G = np.random.default_rng(1).standard_normal(cols.shape)
print("sum(im2col(x) * G) =", np.sum(cols * G), "  sum(x * col2im(G)) =", np.sum(x * col2im(G, x.shape, (2, 2))))

# %% [markdown]
# ## 3. The forward pass
#
# [`numpylenet/model.py: LeNet5`](../numpylenet/model.py) is the seed notebook's network, and
# [`numpylenet/model.py: LeNet5.forward`](../numpylenet/model.py) runs its list of layers in order.
# Here it runs layer by layer on eight validation digits, printing every shape. `backend="numpy"`
# is the readable layer-by-layer path this tour explains (the default numba backend computes the
# same numbers in fused kernels).

# %%
def layer_names(model: LeNet5) -> list[str]:
    """conv1 ... fc2 for the layers with weights, the class name for the others."""
    named = {id(getattr(model, name)): name for name in ("conv1", "conv2", "conv3", "fc1", "fc2")}
    return [named.get(id(layer), type(layer).__name__) for layer in model.layers]


model = LeNet5(seed=0, backend="numpy")   # float32, ReLU, average pooling: the seed's network
batch_x, batch_y = x_valid[:8], y_valid[:8]

outputs, out = [], batch_x
print(f"{'input':<10} {str(out.shape):<18}")
for name, layer in zip(layer_names(model), model.layers):
    out = layer.forward(out)
    outputs.append(out)
    print(f"{name:<10} {str(out.shape):<18} {layer!r}")

print()
for name, param in model.named_parameters():
    print(f"{name:<14} {str(param.shape):<16} {param.data.size:>7,} parameters")
print(f"{'total':<31} {model.num_parameters():>7,}")

# %% [markdown]
# What the layers see, for the first digit: conv1's six maps (after ReLU), pooled to 14x14, then
# conv2's sixteen. The weights are still the random initial ones, so the maps are blurred,
# differently weighted copies of the digit; section 8 trains them.

# %%
stages = {"conv1 + ReLU": outputs[1][0], "pool1": outputs[2][0], "conv2 + ReLU": outputs[4][0]}
figure = plt.figure(figsize=(9, 4.2), layout="constrained")
rows = figure.subfigures(3, 1, height_ratios=[1, 1, 1.1])
for row, (title, maps) in zip(rows, stages.items()):
    row.suptitle(f"{title}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]}", fontsize=9)
    for ax, feature_map in zip(row.subplots(1, 16 if len(maps) == 16 else 6), maps):
        ax.imshow(feature_map, cmap="viridis")
        ax.axis("off")
plt.show()

# %% [markdown]
# ## 4. The loss and its gradient
#
# [`numpylenet/loss.py: softmax_cross_entropy`](../numpylenet/loss.py) turns the logits into
# probabilities `p = softmax(z)` (through [`numpylenet/loss.py: log_softmax`](../numpylenet/loss.py),
# which subtracts each row's maximum so nothing overflows) and returns the mean negative
# log-probability of the true labels, `L = -(1/N) sum_n log p[n, y_n]`, with its gradient
# `dL/dz = (p - onehot(y)) / N`. An untrained network guesses about uniformly, so `L` is near
# `log 10`:

# %%
logits = model.forward(batch_x)
loss, grad_logits = softmax_cross_entropy(logits, batch_y)
print(f"loss {loss:.4f}   log(10) = {np.log(10):.4f}")

p = np.exp(log_softmax(logits))
by_hand = (p - np.eye(10)[batch_y]) / len(batch_y)
print(f"grad_logits of the first digit (label {batch_y[0]}):\n", grad_logits[0])
print("largest difference from (p - onehot(y)) / N:", np.max(np.abs(grad_logits - by_hand)))

# %% [markdown]
# ## 5. The backward pass, checked by finite differences
#
# Backward runs the layers in reverse ([`numpylenet/model.py: LeNet5.backward`](../numpylenet/model.py)):
# each layer turns `dL/d(output)` into `dL/d(input)` and adds `dL/dW` to its parameters' `.grad`.
# The formulas sit beside the code: [`numpylenet/layers.py: Linear.backward`](../numpylenet/layers.py)
# (`dW = dY^T @ x`, `dx = dY @ W`), [`numpylenet/layers.py: Conv2d.backward`](../numpylenet/layers.py)
# (the same after im2col, then col2im), [`numpylenet/layers.py: AvgPool2d.spread`](../numpylenet/layers.py)
# (a quarter of the gradient to each pixel of a window) and
# [`numpylenet/layers.py: ReLU.derivative`](../numpylenet/layers.py) (`[x > 0]`). In float64, so the
# finite differences below are accurate:

# %%
model64 = LeNet5(dtype=np.float64, seed=0, backend="numpy")
x64 = batch_x.astype(np.float64)
model64.zero_grad()
loss64, grad = softmax_cross_entropy(model64.forward(x64), batch_y)
print(f"{'dL/d(logits)':<26} {grad.shape}")
for name, layer in reversed(list(zip(layer_names(model64), model64.layers))):   # what LeNet5.backward does
    grad = layer.backward(grad)
    print(f"{f'dL/d(input of {name})':<26} {grad.shape}")
params64 = dict(model64.named_parameters())

# %% [markdown]
# Is that right? Nudge one weight by `h` each way and watch the loss: the central difference
# `(L(w + h) - L(w - h)) / 2h` approximates `dL/dw` to `O(h^2)`, with no calculus in it at all
# (what [`numpylenet/compare.py: numerical_gradient`](../numpylenet/compare.py) does for every
# entry). A few weights, by hand:

# %%
def loss_now() -> float:
    return softmax_cross_entropy(model64.forward(x64), batch_y)[0]


h = 1e-6
for name, index in [("conv1.weight", (2, 0, 1, 3)), ("conv2.bias", (5,)), ("conv3.weight", (7, 3, 2, 2)),
                    ("fc1.weight", (11, 20)), ("fc2.weight", (4, 17))]:
    weights = params64[name].data
    original = weights[index]
    weights[index] = original + h
    plus = loss_now()
    weights[index] = original - h
    minus = loss_now()
    weights[index] = original
    numeric, analytic = (plus - minus) / (2 * h), params64[name].grad[index]
    print(f"{name + str(list(index)):<26} backward {analytic:+.10f}   finite difference {numeric:+.10f}   "
          f"difference {abs(analytic - numeric):.0e}")

# %% [markdown]
# They agree to about `1e-10`: the round-off of the loss divided by the step, `1e-16 x 2.4 / 1e-6`,
# not an error of backward (a wrong formula would be off by the size of the gradient itself).

# %% [markdown]
# ## 6. The same numbers from torch
#
# The seed notebook's network in torch ([`reference/lenet.py: TorchLeNet5`](../reference/lenet.py)),
# given our weights ([`reference/lenet.py: copy_numpy_to_torch`](../reference/lenet.py)), the same
# digits and labels: torch's autograd computes the loss and every gradient its own way. Side by side,
# the first entries of each tensor, and the relative error over the whole tensor,
# `max |ours - torch| / max |torch|` ([`numpylenet/compare.py: relative_error`](../numpylenet/compare.py)).

# %%
if torch is None:
    print(NEEDS_TORCH)
else:
    twin = TorchLeNet5("relu", "avg").double()
    copy_numpy_to_torch(model64, twin)
    x_torch = torch.from_numpy(x64).requires_grad_()
    loss_torch = torch.nn.functional.cross_entropy(twin(x_torch), torch.from_numpy(batch_y))
    loss_torch.backward()
    torch_params = dict(twin.named_parameters())
    pairs = {"loss": (loss64, loss_torch.item()), "dL/dx": (grad, x_torch.grad.numpy())}
    pairs.update({f"dL/d {name}": (param.grad, torch_params[name].grad.numpy()) for name, param in params64.items()})
    print(f"{'tensor':<18} {'numpylenet (first entries)':<34} {'torch (first entries)':<34} relative error")
    for name, (ours, theirs) in pairs.items():
        ours_first, theirs_first = (" ".join(f"{value:+.3e}" for value in np.ravel(t)[:3]) for t in (ours, theirs))
        print(f"{name:<18} {ours_first:<34} {theirs_first:<34} {relative_error(ours, theirs):.1e}")

# %% [markdown]
# Errors near `1e-16` mean the two frameworks compute the same numbers, up to the order of their
# additions. `python -m numpylenet.check` does this for every layer, in float64 and float32.

# %% [markdown]
# ## 7. One Adam step, written out
#
# [`numpylenet/optim.py: Adam.step`](../numpylenet/optim.py) does, for each parameter `p` with
# gradient `g`, at step `t`: `m = beta1 m + (1 - beta1) g`, `v = beta2 v + (1 - beta2) g^2`,
# `m_hat = m / (1 - beta1^t)`, `v_hat = v / (1 - beta2^t)`, `p = p - lr m_hat / (sqrt(v_hat) + eps)`.
# Here is the first step (`t = 1`, `m` and `v` start at 0) for conv1's weights, by hand, next to
# what `Adam.step` does:

# %%
lr, beta1, beta2, eps, t = 1e-3, 0.9, 0.999, 1e-8, 1
weight = model64.conv1.weight
g, before = weight.grad.copy(), weight.data.copy()
m, v = np.zeros_like(g), np.zeros_like(g)   # the state before the first step
m = beta1 * m + (1 - beta1) * g
v = beta2 * v + (1 - beta2) * g * g
m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
by_hand = before - lr * m_hat / (np.sqrt(v_hat) + eps)

Adam(model64.parameters(), lr=lr, betas=(beta1, beta2), eps=eps).step()
print("Adam.step vs by hand, largest difference:", np.max(np.abs(weight.data - by_hand)))
print("the first step is about lr * sign(g): (before - after) / lr =\n", ((before - weight.data) / lr)[0, 0])

# %% [markdown]
# ## 8. A short training run
#
# One training step is four lines: zero the gradients, forward and loss, backward, step
# ([`numpylenet/loop.py: NumpyLearner.train_step`](../numpylenet/loop.py) also sets the step's learning
# rate, and runs forward, loss and backward as one call, `LeNet5.forward_backward`). Here 300 steps of 64 randomly cropped
# digits with Adam at `lr = 3e-3` (about 3.5 passes over the sample's 5,400 training images), with
# the validation accuracy every 25 steps
# ([`numpylenet/data.py: batch_indices`](../numpylenet/data.py) shuffles each epoch):

# %%
STEPS, BATCH_SIZE, EVAL_EVERY = 300, 64, 25
model = LeNet5(seed=0, backend="numpy")
optimizer = Adam(model.parameters(), lr=3e-3)
train_images, train_labels = images[train_indices], labels[train_indices]
rng = np.random.default_rng(0)
losses, eval_steps, accuracies = [], [], []
while len(losses) < STEPS:
    for indices in data.batch_indices(len(train_images), BATCH_SIZE, rng=rng):
        if len(losses) == STEPS:
            break
        x = data.to_float(data.random_crop(train_images[indices], size=32, padding=4, rng=rng))
        model.zero_grad()
        loss, grad_logits = softmax_cross_entropy(model.forward(x), train_labels[indices])
        model.backward(grad_logits, input_grad=False)
        optimizer.step()
        losses.append(loss)
        if len(losses) % EVAL_EVERY == 0:
            eval_steps.append(len(losses))
            accuracies.append(np.mean(model.forward(x_valid).argmax(axis=1) == y_valid))
print(f"after {STEPS} steps: training loss {np.mean(losses[-25:]):.3f} (mean of the last 25), "
      f"validation accuracy {accuracies[-1]:.1%}")

figure, loss_axes = plt.subplots(figsize=(7, 3.2), layout="constrained")
loss_axes.plot(np.arange(1, STEPS + 1), losses, color="C0", alpha=0.3, linewidth=0.8)
smooth = np.convolve(losses, np.ones(20) / 20, mode="valid")
loss_axes.plot(np.arange(20, STEPS + 1), smooth, color="C0", label="training loss (20-step mean)")
loss_axes.set(xlabel="step (batch of 64)", ylabel="cross-entropy loss", yscale="log")
accuracy_axes = loss_axes.twinx()
accuracy_axes.plot(eval_steps, 100 * np.array(accuracies), "s-", color="C1", markersize=3, label="validation accuracy")
accuracy_axes.set(ylabel="validation accuracy (%)", ylim=(0, 100))
handles = loss_axes.get_legend_handles_labels()[0] + accuracy_axes.get_legend_handles_labels()[0]
loss_axes.legend(handles=handles, loc="lower left", fontsize=8)
plt.show()

# %% [markdown]
# ## 9. What conv1 learned
#
# conv1's six 5x5 filters ([`numpylenet/model.py: LeNet5`](../numpylenet/model.py) names them
# `conv1.weight`, shape `(6, 1, 5, 5)`), on one grey scale centred at 0: a light band beside a dark
# one is an edge detector. After so short a run they are still noisy;
# `python -m numpylenet.train` draws them after a full run.

# %%
filters = model.conv1.weight.data[:, 0]
limit = np.abs(filters).max()
figure, axes = plt.subplots(1, 6, figsize=(8, 1.8), layout="constrained")
for index, (ax, kernel) in enumerate(zip(axes, filters)):
    image = ax.imshow(kernel, cmap="gray", vmin=-limit, vmax=limit)
    ax.set_title(f"filter {index}", fontsize=9)
    ax.axis("off")
figure.colorbar(image, ax=axes, shrink=0.8)
plt.show()

# %% [markdown]
# ## Now change something
#
# The point of a from-scratch network is that you can break it. A few things to try, each followed
# by `python -m numpylenet.check` (it names what broke) and a rerun of this notebook:
#
# * In [`numpylenet/layers.py: AvgPool2d.spread`](../numpylenet/layers.py), divide by
#   `window_size - 1`: the check flags AvgPool2d's `grad_input`, and LeNet5 with it.
# * In [`numpylenet/layers.py: MaxPool2d.reduce`](../numpylenet/layers.py), take `argmin`
#   instead of `argmax`: the forward output is wrong now, and so is everything after it.
# * In [`numpylenet/optim.py: Adam.step`](../numpylenet/optim.py), add `eps` inside the square
#   root: the check's Adam rows fail in float64, and section 7 above disagrees by hand.
# * Train with `MaxPool2d` or `tanh` (`LeNet5(pool="max", activation="tanh")`) in section 8 and
#   compare the curves.
