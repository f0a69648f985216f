"""The seed notebook's own torchvision pipeline, run unchanged, as the baseline for ``--recipe seed``.

``python -m reference.seed_notebook [--data-dir DIR] [--seed N] [--epochs 1] [--num-workers 4]``

Everything below the "notebook" marker is the notebook's code (cnns_1_notebook): its transforms, its
``datasets.MNIST`` datasets, its ``split_train_valid_data``, its ``train`` loop, ``get_accuracty`` and
``evaluacion_test_data``, and its ``LeNet`` (imported from ``reference.lenet``). Only three things are
changed, all outside the arithmetic: the data root, the number of epochs and the DataLoader worker count
are command-line flags, and the run ends with one JSON line holding the test loss and accuracy, computed
exactly as the notebook computes them (the mean over test batches of the batch loss and batch accuracy).

torchvision's ``MNIST(download=False)`` only accepts *uncompressed* IDX files, while the shared data folder
holds them gzipped; :func:`torchvision_root` decompresses them once into a cache folder when needed, so the
bytes torchvision reads are the same.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torch.utils.data.sampler import SubsetRandomSampler
from torchvision import datasets

from numpylenet.cli import OneLineErrorParser, non_negative_int, positive_int
from numpylenet.data import default_data_dir
from reference.lenet import LeNet

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def torchvision_root(data_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Return a root under which ``MNIST/raw/`` holds the four uncompressed IDX files torchvision wants.

    ``data_dir`` is returned as is when it already has them; otherwise each ``.gz`` found in
    ``data_dir/MNIST/raw`` is decompressed into ``cache_dir/MNIST/raw`` (atomically, once) and
    ``cache_dir`` is returned. Raises FileNotFoundError, naming the files, when neither form of
    each is there.
    """
    raw = Path(data_dir) / "MNIST" / "raw"
    if all((raw / name).is_file() for name in MNIST_FILES):
        return Path(data_dir)
    missing = [name for name in MNIST_FILES if not (raw / f"{name}.gz").is_file()]
    if missing:
        raise FileNotFoundError(f"no MNIST in {raw} (missing {', '.join(missing)})")
    cached_raw = Path(cache_dir) / "MNIST" / "raw"
    cached_raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        target = cached_raw / name
        if target.is_file():
            continue
        with gzip.open(raw / f"{name}.gz", "rb") as source, \
                tempfile.NamedTemporaryFile(dir=cached_raw, delete=False) as partial:
            shutil.copyfileobj(source, partial)
        os.replace(partial.name, target)
    return Path(cache_dir)


# ---------------------------------------------------------------- notebook (cnns_1), unchanged
train_transform = T.Compose([
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor()])

valid_transform = T.Compose([
            T.RandomCrop(32, padding=4),
            T.ToTensor()])

loss_function = nn.CrossEntropyLoss()


def split_train_valid_data(
    train_data,
    valid_data,
    valid_size=0.1,
    batch_size=32,
    shuffle=True,
    random_seed=0,
    num_workers=4):

  num_train = len(train_data)
  indices = list(range(num_train))
  split = int(np.floor(valid_size * num_train))

  if shuffle == True:
    np.random.seed(random_seed)
    np.random.shuffle(indices)

  train_idx, valid_idx = indices[split:], indices[:split]

  train_sampler = SubsetRandomSampler(train_idx)
  valid_sampler = SubsetRandomSampler(valid_idx)

  train_loader = torch.utils.data.DataLoader(train_data,
                    batch_size=batch_size, sampler=train_sampler,
                    num_workers=num_workers)

  valid_loader = torch.utils.data.DataLoader(valid_data,
                    batch_size=batch_size, sampler=valid_sampler,
                    num_workers=num_workers)

  return (train_loader, valid_loader)


def train(model, train_data, valid_data, optimizer, num_epochs, num_workers=4):
  # The one change: num_workers is passed through (the notebook relies on the default, 4).
  train_loader, valid_loader = split_train_valid_data(train_data, valid_data, num_workers=num_workers)

  model.train()

  train_steps = len(train_loader) # nro. de batch

  for epoch in range(num_epochs):
    for i, (images, labels) in enumerate(train_loader):
      output = model(images)
      loss   = loss_function(output, labels)

      # Limpiar gradientes
      optimizer.zero_grad()

      # Backpropagation: Calculo de la gradientes
      loss.backward()

      # Actualizando de los parametros
      optimizer.step()

      if (i+1) % 100 == 0:
        print(f"Epoch [{epoch+1}/{num_epochs}], it: [{i+1:0>4}/{train_steps}], loss: {loss.item():.4f}")

    # Validacion
    model.eval()
    valid_steps = len(valid_loader) # nro. de batch  # noqa: F841 (unused in the notebook too; kept verbatim)
    valid_loss = []
    for i, (images, labels) in enumerate(valid_loader):
      output = model(images)
      loss   = loss_function(output, labels)
      valid_loss.append(loss.item())
    print(f"Epoch [{epoch+1}/{num_epochs}], valid_loss: {np.mean(valid_loss):.4f}")


def get_accuracty(outputs, labels):
  preds  = np.argmax(outputs.detach().numpy(), axis=1)
  labels = labels.numpy()

  acc = (preds == labels)

  return np.mean(acc)

def evaluacion_test_data(model, test_loader):
  model.eval()

  loss_it = []
  acc_it  = []

  total_steps = len(test_loader)  # noqa: F841 (unused in the notebook too; kept verbatim)

  for i, (images, labels) in enumerate(test_loader):
    outputs = model(images)

    loss = loss_function(outputs, labels)
    acc  = get_accuracty(outputs, labels)

    loss_it.append(loss.item())
    acc_it.append(acc.item())

  print('Loss={:.4f}, Accuracy={:.4f}'.format(np.mean(loss_it), np.mean(acc_it)))
  # Added: hand the figures back to main() for the JSON line.
  return float(np.mean(loss_it)), float(np.mean(acc_it))
# ---------------------------------------------------------------- end of the notebook's code


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineErrorParser(
        prog="python -m reference.seed_notebook",
        description="Run the seed notebook's torchvision pipeline unchanged and print its figures.")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="root holding MNIST/raw (default: $NUMPYLENET_DATA or ./data)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "numpylenet-torchvision"),
                        help="where gzipped IDX files are decompressed for torchvision if needed")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default 0)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="the notebook's num_epochs (default 1)")
    parser.add_argument("--num-workers", type=non_negative_int, default=4,
                        help="DataLoader workers (notebook: 4)")
    args = parser.parse_args(argv)

    try:
        root = str(torchvision_root(args.data_dir, args.cache_dir))
    except OSError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    train_data = datasets.MNIST(root=root, train=True, transform=train_transform, download=False)
    valid_data = datasets.MNIST(root=root, train=True, transform=valid_transform, download=False)
    test_data = datasets.MNIST(root=root, train=False, transform=valid_transform)
    print("train size: {}".format(len(train_data)))
    print("test size : {}".format(len(test_data)))
    test_loader = DataLoader(test_data, batch_size=64, shuffle=False)

    model = LeNet()
    print(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    train(model, train_data, valid_data, optimizer, args.epochs, num_workers=args.num_workers)
    test_loss, test_accuracy = evaluacion_test_data(model, test_loader)

    result = {"recipe": "seed-notebook", "seed": args.seed, "epochs": args.epochs,
              "num_workers": args.num_workers, "test_loss": test_loss, "test_accuracy": test_accuracy,
              "seconds": round(time.perf_counter() - start, 2), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
