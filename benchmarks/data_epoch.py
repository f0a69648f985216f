"""How long preparing one augmented training epoch takes, next to one training epoch.

    python -m benchmarks.data_epoch [--data-dir ../shared/data] [--repeats 3]

Times, for the 54,000 training images of the notebook's split, ``random_crop(32, padding=4)`` +
``random_horizontal_flip`` + ``to_float`` (the notebook's train transform): once over the whole
epoch as one batch, and batch by batch (64 images) as training uses it. In the same run it times
the same work done the notebook's way, torchvision's transforms image by image (on a subset,
scaled up), and a few LeNet5 training steps (forward, backward, Adam) scaled up to an epoch, so the
figures can be read as ratios on a noisy shared machine.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from numpylenet import LeNet5, Adam, softmax_cross_entropy
from numpylenet import data

BATCH_SIZE = 64


def best_time(function, repeats: int) -> float:
    """The fastest of ``repeats`` runs, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return data.to_float(data.random_horizontal_flip(data.random_crop(images, 32, 4, rng), 0.5, rng))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    images, labels = data.load_mnist(args.data_dir)
    train_indices, _ = data.split_train_valid(len(images))
    images, labels = images[train_indices], labels[train_indices]
    rng = np.random.default_rng(0)
    steps = -(-len(images) // BATCH_SIZE)

    whole = best_time(lambda: augment(images, rng), args.repeats)
    batched = best_time(lambda: [augment(images[batch], rng) for batch in
                                 data.batch_indices(len(images), BATCH_SIZE, rng=rng)], args.repeats)
    print(f"{len(images):,} images, one augmented epoch (crop + flip + to_float):")
    print(f"  numpylenet.data, whole epoch at once   {whole:7.3f} s")
    print(f"  numpylenet.data, {steps} batches of {BATCH_SIZE}  {batched:7.3f} s")

    model, subset = LeNet5(seed=0), 50
    optimizer = Adam(model.parameters())
    batches = [augment(images[k * BATCH_SIZE:(k + 1) * BATCH_SIZE], rng) for k in range(subset)]

    def train_steps():
        for k, x in enumerate(batches):
            model.zero_grad()
            _, grad_logits = softmax_cross_entropy(model.forward(x), labels[k * BATCH_SIZE:(k + 1) * BATCH_SIZE])
            model.backward(grad_logits)
            optimizer.step()

    epoch = best_time(train_steps, args.repeats) * steps / subset
    print(f"  LeNet5 training epoch (numpy backend, from {subset} steps)  {epoch:7.2f} s "
          f"-> augmentation is {batched / epoch:.1%} of it")

    try:
        from PIL import Image
        from torchvision import transforms as T
    except ImportError:
        return
    notebook = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    sample = images[:2000]
    per_image = best_time(lambda: [notebook(Image.fromarray(image, mode="L")) for image in sample], args.repeats)
    scaled = per_image * len(images) / len(sample)
    print(f"  torchvision, image by image (from {len(sample):,})    {scaled:7.3f} s")


if __name__ == "__main__":
    main()
