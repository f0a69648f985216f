"""How long preparing one augmented training epoch takes, next to one training epoch.

    python -m benchmarks.data_epoch [--data-dir DIR] [--threads 2] [--repeats 5] [--quick] [--out DIR]

For the training images of the notebook's split (54,000 of MNIST; 5,400 of the bundled sample with
``--quick``) it times the notebook's train transform, ``random_crop(32, padding=4)`` +
``random_horizontal_flip`` + ``to_float``, done by ``numpylenet.data`` once over the whole epoch
as one batch, and batch by batch (64 images) as training uses it; the same work done the
notebook's way, torchvision's transforms image by image (on a subset, scaled up to the epoch; left
out when torchvision does not import); the default recipe's training transform (centre in 32 x 32,
``x / 255``, a random affine distortion, normalisation: :func:`numpylenet.pipeline.transform`)
batch by batch, and torchvision's ``v2.RandomAffine`` doing the same image by image; and training steps of batch 64 (zero_grad, forward, softmax
cross-entropy, backward, Adam; the contenders of :mod:`benchmarks.step`) scaled up to the epoch's
number of steps. All contenders run round-robin in one process and the median of ``--repeats`` is
reported (see :mod:`benchmarks.common`), each as seconds per epoch and as a share of a training
epoch of numpylenet's default backend. Writes ``data_epoch.json``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from benchmarks import common
from benchmarks.step import step_functions
from numpylenet import data
from numpylenet.pipeline import transform
from numpylenet.recipes import make_config

NAME = "data_epoch"
BATCH_SIZE = 64
# (images torchvision transforms per timed call, training steps per timed call), full and --quick.
SUBSETS = {False: (2_000, 50), True: (200, 2)}


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The notebook's train transform on uint8 images (N, 28, 28) -> float32 (N, 1, 32, 32) in [0, 1]."""
    return data.to_float(data.random_horizontal_flip(data.random_crop(images, 32, 4, rng), 0.5, rng))


def contenders(images: np.ndarray, labels: np.ndarray,
               quick: bool) -> dict[str, tuple[Callable[[], object], float, str]]:
    """Name -> (a function doing part of one epoch's work, how many calls make the epoch, what a
    call does) for the training images (N, 28, 28) and their labels (N,)."""
    rng = np.random.default_rng(0)
    count = len(images)
    steps_per_epoch = -(-count // BATCH_SIZE)
    torchvision_images, steps_per_call = SUBSETS[quick]
    work = {
        "numpylenet.data, whole epoch at once": (lambda: augment(images, rng), 1.0, "the whole epoch"),
        f"numpylenet.data, batches of {BATCH_SIZE}": (
            lambda: [augment(images[batch], rng) for batch in data.batch_indices(count, BATCH_SIZE, rng=rng)],
            1.0, "the whole epoch"),
    }
    try:
        from PIL import Image
        from torchvision import transforms
    except ImportError:
        pass
    else:
        notebook = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                       transforms.RandomHorizontalFlip(), transforms.ToTensor()])
        subset = images[:torchvision_images]
        work["torchvision, image by image"] = (
            lambda: [notebook(Image.fromarray(image, mode="L")) for image in subset],
            count / len(subset), f"{len(subset):,} images")
    mean, std = data.pixel_mean_std(images)   # the statistics a run on these images normalises by
    default = make_config("default", normalize_mean=mean, normalize_std=std)
    work[f"default recipe (random affine), batches of {default.batch_size}"] = (
        lambda: [transform(images[batch], default, train=True, rng=rng)
                 for batch in data.batch_indices(count, default.batch_size, rng=rng)],
        1.0, "the whole epoch")
    try:
        import torch
        from torchvision.transforms import v2
    except ImportError:
        pass
    else:
        affine = v2.Compose([v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
                             v2.RandomAffine(default.affine_degrees,
                                             translate=(default.affine_translate,) * 2,
                                             scale=(1 - default.affine_scale, 1 + default.affine_scale),
                                             shear=default.affine_shear,
                                             interpolation=v2.InterpolationMode.BILINEAR, fill=None),
                             v2.Normalize([mean], [std])])
        tensors = torch.from_numpy(images[:torchvision_images, np.newaxis].copy())
        work["torchvision v2 RandomAffine, image by image"] = (
            lambda: [affine(tensor) for tensor in tensors], count / len(tensors),
            f"{len(tensors):,} images")
    batch = augment(images[:BATCH_SIZE], rng), labels[:BATCH_SIZE]
    for framework, step in step_functions(*batch).items():
        work[f"training, {framework}"] = (lambda step=step: [step() for _ in range(steps_per_call)],
                                          steps_per_epoch / steps_per_call, f"{steps_per_call} steps")
    return work


def main(argv: list[str] | None = None) -> dict:
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None,
                        help="root holding MNIST/raw (default $NUMPYLENET_DATA, else ../shared/data)")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    from numpylenet.backend import resolve_backend

    dataset = "mnist-sample" if args.quick else "mnist"
    images, labels = data.load_mnist(common.data_dir(args.data_dir), dataset=dataset)
    train_indices, _ = data.split_train_valid(len(images))
    images, labels = images[train_indices], labels[train_indices]

    work = contenders(images, labels, args.quick)
    timings = common.interleaved_timings({name: function for name, (function, _, _) in work.items()},
                                         args.repeats)
    epoch_seconds = {name: timings[name].median * calls for name, (_, calls, _) in work.items()}
    default = f"numpylenet ({resolve_backend()})"
    reference = f"training, {default}"
    rows = [{"contender": name, "timed_per_call": per_call, "calls_per_epoch": calls,
             "epoch_seconds": epoch_seconds[name],
             "share_of_training_epoch": epoch_seconds[name] / epoch_seconds[reference],
             "timing": timings[name].to_json()} for name, (_, calls, per_call) in work.items()]
    table = common.markdown_table(
        [f"one epoch of {len(images):,} images", "timed", "seconds", f"share of a {default} training epoch"],
        [[row["contender"], row["timed_per_call"] if row["calls_per_epoch"] == 1 else
          f"{row['timed_per_call']}, x {row['calls_per_epoch']:.1f}", f"{row['epoch_seconds']:.3f}",
          f"{100 * row['share_of_training_epoch']:.1f}%"] for row in rows],
        align="llrr")
    return common.publish(args, NAME, {
        "dataset": dataset, "train_images": len(images), "batch_size": BATCH_SIZE,
        "transform": "random_crop(32, padding=4) + random_horizontal_flip(0.5) + to_float",
        "default_recipe_transform": "pad_to(32) + to_float + random_affine (default recipe's ranges) "
                                    "+ normalize: numpylenet.pipeline.transform",
        "reference": reference, "unit": "seconds per epoch (median, extrapolated where timed on part)",
        "rows": rows, "markdown": table})


if __name__ == "__main__":
    main()
