"""Make the bundled MNIST sample: the first 6,000 training and 1,000 test images and labels.

Usage::

    python -m numpylenet.datasets.make_sample --source ../shared/data/MNIST/raw

reads the four MNIST files (raw or ``.gz``) from ``--source`` and writes gzipped IDX files with
the same names to ``numpylenet/datasets/MNIST-sample/raw/``. The output is byte-for-byte
deterministic (see :func:`numpylenet.data.write_idx`), so rerunning it leaves git clean.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from numpylenet.data import MNIST_FILES, SAMPLE_ROOT, SOURCES, _find, read_idx, write_idx

SAMPLE_SIZES = {"train": 6000, "t10k": 1000}


def make_sample(source: Path, destination: Path) -> list[Path]:
    """Write the first ``SAMPLE_SIZES[split]`` items of each MNIST file in ``source`` to
    ``destination`` as ``<name>.gz``; return the paths written."""
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for name in MNIST_FILES:
        path = _find(source, name)
        if path is None:
            raise SystemExit(f"make_sample: no {name} or {name}.gz in {source}")
        items = read_idx(path)[:SAMPLE_SIZES[name.split("-")[0]]]
        written.append(write_idx(destination / f"{name}.gz", items))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="folder holding the full MNIST files, e.g. ../shared/data/MNIST/raw")
    parser.add_argument("--destination", type=Path, default=SAMPLE_ROOT / SOURCES["mnist-sample"].folder / "raw",
                        help="output folder (default: the package's MNIST-sample/raw)")
    args = parser.parse_args(argv)
    for path in make_sample(args.source, args.destination):
        print(f"{path}  {path.stat().st_size:>9,} bytes  md5 {hashlib.md5(path.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
