"""MNIST on disk to float batches in memory: IDX files, download, the seed's split, augmentation.

Everything here is plain NumPy and mirrors what torchvision does in the seed notebook, so that a
model trained on these arrays sees exactly the pixels the notebook's model saw:

* :func:`read_idx` / :func:`write_idx` - the IDX file format MNIST is distributed in;
* :func:`load_mnist` - the four MNIST files in torchvision's folder layout, optionally downloaded
  from torchvision's mirrors by :func:`download_mnist`;
* :func:`split_train_valid` - the notebook's ``split_train_valid_data`` indices;
* :func:`batch_indices` - shuffled mini-batches of indices, one permutation per epoch;
* transforms on whole uint8 batches ``(N, H, W)`` at once: :func:`pad_to`, :func:`crop`,
  :func:`random_crop` (``T.RandomCrop``), :func:`flip_where`, :func:`random_horizontal_flip`
  (``T.RandomHorizontalFlip``), :func:`random_translate`, :func:`to_float` (``T.ToTensor``) and
  :func:`normalize` (``T.Normalize``), with :func:`pixel_mean_std` for its statistics.

The IDX format (http://yann.lecun.com/exdb/mnist/), all integers big-endian::

    bytes 0-1   zero
    byte  2     type code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte  3     number of dimensions, D
    D x uint32  the size of each dimension
    payload     prod(sizes) items of the type, big-endian, C order (last dimension fastest)
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import math
import os
import shutil
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .files import atomic_write, describe_path, make_folders, open_regular, remove_empty_folders

__all__ = [
    "IDXFormatError",
    "read_idx",
    "write_idx",
    "MNIST_FILES",
    "DatasetSource",
    "SOURCES",
    "DATASETS",
    "SAMPLE_ROOT",
    "default_data_dir",
    "DownloadError",
    "download_file",
    "download_mnist",
    "load_mnist",
    "split_train_valid",
    "batch_indices",
    "pad_to",
    "crop",
    "random_crop",
    "flip_where",
    "random_horizontal_flip",
    "random_translate",
    "to_float",
    "normalize",
    "pixel_table",
    "pixel_mean_std",
]

# --------------------------------------------------------------------------------------------
# IDX files

IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# Refuse payloads above 4 GiB as absurd (all of MNIST is 55 MB; EMNIST, the largest IDX data set
# in use, is 0.6 GB). Reading is incremental anyway, so a header that lies below this limit
# costs no more memory than the bytes the file really holds.
IDX_MAX_BYTES = 1 << 32
GZIP_MAGIC = b"\x1f\x8b"
READ_CHUNK = 1 << 20


class IDXFormatError(ValueError):
    """An IDX file is malformed: bad magic, unknown type, dimensions that disagree with the data."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into an array.

    Parameters
    ----------
    path : str or path-like
        The file. Compression is recognised by its content (the gzip magic bytes 1f 8b), not by
        its name, so ``train-images-idx3-ubyte`` and ``train-images-idx3-ubyte.gz`` both work.

    Returns
    -------
    ndarray
        Shape ``(d_1, ..., d_D)`` as the header says, the header's type in native byte order
        (uint8, int8, int16, int32, float32 or float64), writable.

    Raises
    ------
    IDXFormatError
        The content is not a well-formed IDX file: empty or shorter than its header, non-zero
        leading bytes, unknown type code, no dimensions, sizes whose non-zero product exceeds
        ``IDX_MAX_BYTES`` bytes, a payload shorter or longer than the dimensions say, or damaged
        gzip data. The message starts with the path.
    OSError
        The path is not a readable regular file: ``FileNotFoundError`` when nothing is there (or a
        broken link), else an OSError saying what is there (a directory, a FIFO, a link loop...).
        A FIFO or device is refused without reading from it, so the call never blocks.
    """
    path = Path(path)
    with open_regular(path) as file:
        compressed = file.read(2) == GZIP_MAGIC
        file.seek(0)
        stream = gzip.GzipFile(fileobj=file, mode="rb") if compressed else file
        try:
            return _parse_idx(stream, path)
        # gzip reports damage as BadGzipFile (an OSError), EOFError (stream cut short) or
        # zlib.error (bad deflate data), depending on where the damage is.
        except (OSError, EOFError, zlib.error) as error:
            what = "damaged gzip data" if compressed else "read failed"
            raise IDXFormatError(f"{path}: {what}: {error}") from error


def _parse_idx(stream, path: Path) -> np.ndarray:
    """Parse an IDX byte stream, reading no more than the header promises plus one byte."""
    magic = _read_up_to(stream, 4)
    if len(magic) < 4:
        state = "empty" if not magic else f"only {len(magic)} bytes long"
        raise IDXFormatError(f"{path}: file is {state}; an IDX file starts with a 4-byte magic number")
    if magic[0] or magic[1]:
        raise IDXFormatError(f"{path}: bad magic number 0x{magic.hex()}; IDX files start with two zero bytes")
    type_code, ndim = magic[2], magic[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise IDXFormatError(f"{path}: unknown IDX type code 0x{type_code:02X} (known: {known})")
    if ndim == 0:
        raise IDXFormatError(f"{path}: header declares zero dimensions")
    header = _read_up_to(stream, 4 * ndim)
    if len(header) < 4 * ndim:
        raise IDXFormatError(f"{path}: header truncated: {ndim} dimensions need {4 * ndim} bytes of "
                             f"sizes, the file has {len(header)}")
    shape = tuple(int.from_bytes(header[4 * k:4 * k + 4], "big") for k in range(ndim))
    dtype = IDX_DTYPES[type_code]
    # Zero sizes are skipped: NumPy refuses a shape like (0, 2**32, 2**32) even though it is empty.
    if math.prod(max(size, 1) for size in shape) * dtype.itemsize > IDX_MAX_BYTES:
        raise IDXFormatError(f"{path}: absurd dimensions {shape} of {dtype.name}: beyond the "
                             f"{IDX_MAX_BYTES:,}-byte limit")
    expected = math.prod(shape) * dtype.itemsize
    # One byte more than promised tells "exactly right" apart from "trailing data".
    payload = _read_up_to(stream, expected + 1)
    need = f"dimensions {shape} of {dtype.name} need {expected:,} bytes after the header"
    if len(payload) < expected:
        raise IDXFormatError(f"{path}: payload truncated: {need}, the file has {len(payload):,}")
    if len(payload) > expected:
        raise IDXFormatError(f"{path}: trailing data: {need}, the file holds more")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _read_up_to(stream, limit: int) -> bytearray:
    """Read at most ``limit`` bytes in 1 MiB chunks, so memory follows the data, not the request."""
    data = bytearray()
    while len(data) < limit:
        chunk = stream.read(min(READ_CHUNK, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an array as an IDX file, gzip-compressed if the name ends in ``.gz``.

    The output is byte-for-byte deterministic for a given zlib (modification time 0 and no file
    name in the gzip header) and written atomically (:func:`numpylenet.files.atomic_write`).

    Parameters
    ----------
    path : str or path-like
        Destination.
    array : ndarray
        Any shape with at least one dimension, each below 2**32; dtype uint8, int8, int16, int32,
        float32 or float64.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    if array.dtype.newbyteorder("=") not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of "
                         f"{sorted(dtype.name for dtype in codes)}")
    if array.ndim == 0 or array.ndim > 255 or any(size >= 1 << 32 for size in array.shape):
        raise ValueError(f"IDX needs 1 to 255 dimensions, each below 2**32; got shape {array.shape}")
    type_code = codes[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    payload = np.ascontiguousarray(array, dtype=IDX_DTYPES[type_code]).tobytes()
    with atomic_write(path) as file:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=file, compresslevel=6, mtime=0) as packed:
                packed.write(header + payload)
        else:
            file.write(header + payload)
    return path


# --------------------------------------------------------------------------------------------
# Data sets in torchvision's layout: <root>/<folder>/raw/<file>[.gz]

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set lives under a root folder and where to download it from.

    Attributes
    ----------
    folder : str
        torchvision's folder name under the root (``MNIST``, ``FashionMNIST``).
    mirrors : tuple of str
        Base URLs, tried in order; a file's URL is ``mirror + name + ".gz"``.
    md5 : dict of str to str
        For each file in ``MNIST_FILES``, the md5 of its ``.gz`` as the mirrors serve it.
    """

    folder: str
    mirrors: tuple[str, ...] = ()
    md5: dict[str, str] | None = None


# Mirrors and checksums as in torchvision.datasets.MNIST and FashionMNIST (torchvision 0.29).
SOURCES = {
    "mnist": DatasetSource(
        folder="MNIST",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5={"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"},
    ),
    "fashion-mnist": DatasetSource(
        folder="FashionMNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"},
    ),
    # The first 6,000 training and 1,000 test images of MNIST, shipped inside the package.
    "mnist-sample": DatasetSource(folder="MNIST-sample"),
}
DATASETS = tuple(SOURCES)
SAMPLE_ROOT = Path(__file__).resolve().parent / "datasets"
DATA_ENVIRONMENT_VARIABLE = "NUMPYLENET_DATA"


def default_data_dir() -> str:
    """The data root when none is given: ``$NUMPYLENET_DATA``, else ``data`` (an empty variable
    counts as unset, as an empty ``--data-dir`` is refused, rather than meaning the current folder)."""
    return os.environ.get(DATA_ENVIRONMENT_VARIABLE) or "data"


def _raw_folder(root: str | os.PathLike, dataset: str) -> Path:
    if dataset not in SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    base = SAMPLE_ROOT if dataset == "mnist-sample" else Path(root)
    return base / SOURCES[dataset].folder / "raw"


def _find(folder: Path, name: str) -> Path | None:
    """The uncompressed file if present (what torchvision reads), else the ``.gz``, else None.

    Raises OSError, saying what is there, when either name holds something other than a regular
    file (a directory, a FIFO, a broken link, a link loop...): that is a broken data folder, not a
    missing file.
    """
    for candidate in (folder / name, folder / f"{name}.gz"):
        exists, what = describe_path(candidate)
        if what == "is a regular file":
            return candidate
        if exists:
            raise OSError(f"{candidate} {what}, not a data file; remove it or put the file there")
    return None


def load_mnist(root: str | os.PathLike = "data", *, train: bool = True, dataset: str = "mnist",
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load the MNIST or Fashion-MNIST training or test set.

    Parameters
    ----------
    root : str or path-like
        The folder holding ``MNIST/raw/`` (or ``FashionMNIST/raw/``), the layout of
        ``torchvision.datasets.MNIST(root=...)``; each file may be raw or ``.gz``. Ignored for
        ``dataset="mnist-sample"``, which ships inside the package.
    train : bool
        The training files (``train-*``) or the test files (``t10k-*``).
    dataset : {"mnist", "fashion-mnist", "mnist-sample"}
        Which data set. ``mnist-sample`` is the first 6,000 training and first 1,000 test
        images of MNIST, for running anything without network or data folder.
    download : bool
        Fetch missing files first (see :func:`download_mnist`).

    Returns
    -------
    images : ndarray of uint8, shape (N, 28, 28)
        Pixels 0 (background) to 255 (ink), as ``torchvision.datasets.MNIST(...).data``.
    labels : ndarray of int64, shape (N,)
        Classes 0-9, as ``.targets``.

    Raises
    ------
    FileNotFoundError
        A file is missing and ``download`` is False; the message says where it looked (and, if
        ``root`` or a folder in it is a file, which).
    DownloadError
        ``download`` is True and a missing file could not be fetched from any mirror, or its
        folder could not be created.
    OSError
        Something other than a regular file stands where a data file should (see ``_find``), or a
        file cannot be read.
    ValueError
        Unknown ``dataset``; malformed files (:class:`IDXFormatError`); images that are not uint8
        (N, 28, 28); labels that are not uint8 (N,) in 0-9; image and label counts that differ.
    """
    folder = _raw_folder(root, dataset)
    split = "train" if train else "t10k"
    if download:
        download_mnist(root, dataset, split=split)
    paths = {}
    for kind in ("images", "labels"):
        name = f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        paths[kind] = _find(folder, name)
        if paths[kind] is None:
            exists, what = describe_path(folder)
            where = folder.resolve() if exists else f"{folder.resolve()} (which {what})"
            raise FileNotFoundError(
                f"{dataset}: no {name} or {name}.gz in {where}. Download it (download=True; on the "
                f"command line --download), point root (--data-dir) at a folder holding "
                f"{SOURCES[dataset].folder}/raw/ (the layout torchvision uses), or use mnist-sample, "
                f"which ships with numpylenet.")
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{paths['images']}: expected uint8 images of shape (N, 28, 28), "
                         f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{paths['labels']}: expected uint8 labels of shape (N,), "
                         f"got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{paths['images']} holds {len(images):,} images but {paths['labels']} "
                         f"holds {len(labels):,} labels")
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{paths['labels']}: labels must lie in 0-9, found {labels.max()}")
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Download

class DownloadError(RuntimeError):
    """A file could not be fetched from any mirror; the message lists each URL and what failed."""


def download_mnist(root: str | os.PathLike = "data", dataset: str = "mnist", *,
                   progress: bool = True, split: str | None = None) -> Path:
    """Fetch whichever of the data set's four files are missing, as torchvision does (with
    ``split`` "train" or "t10k", only that split's two: evaluating needs no training set).

    Each ``.gz`` is downloaded from the mirrors of ``SOURCES[dataset]`` in turn (see
    :func:`download_file`), then unpacked next to itself, so the folder serves
    ``torchvision.datasets.MNIST(root)`` as well. A file already present, raw or ``.gz``, is
    left alone. ``mnist-sample`` ships with the package and needs nothing.

    The ``raw`` folder is created if needed; when nothing could be downloaded, the folders this
    call created are removed again, so a failed attempt leaves the disk as it was.

    Returns
    -------
    Path
        The ``raw`` folder.

    Raises
    ------
    DownloadError
        A file could not be fetched, or the folder could not be created (read-only, a file in the
        way...).
    """
    if split not in (None, "train", "t10k"):
        raise ValueError(f"split must be 'train', 't10k' or None, got {split!r}")
    folder = _raw_folder(root, dataset)
    source = SOURCES[dataset]
    if not source.mirrors:
        return folder
    try:
        created = make_folders(folder)
    except OSError as error:
        raise DownloadError(f"cannot create the data folder {folder} to download into: "
                            f"{error.strerror}") from None
    try:
        for name in MNIST_FILES:
            if _find(folder, name) is not None or (split is not None and not name.startswith(f"{split}-")):
                continue
            packed = download_file([f"{mirror}{name}.gz" for mirror in source.mirrors],
                                   folder / f"{name}.gz", source.md5[name], progress=progress)
            with gzip.open(packed, "rb") as unpacked, atomic_write(folder / name) as file:
                shutil.copyfileobj(unpacked, file, READ_CHUNK)
    except BaseException:
        remove_empty_folders(created)
        raise
    return folder


def download_file(urls: Sequence[str], destination: str | os.PathLike, md5: str, *,
                  progress: bool = True, timeout: float = 30.0) -> Path:
    """Download one file, trying each URL in turn until one yields content with the right md5.

    Parameters
    ----------
    urls : sequence of str
        Candidate URLs for the same file, in order of preference.
    destination : str or path-like
        Where to put it. It appears only once complete and verified (temporary file + rename);
        nothing is left behind on failure.
    md5 : str
        Hex md5 of the expected content.
    progress : bool
        Show a tqdm progress bar.
    timeout : float
        Seconds to wait on a silent connection before giving up on that URL.

    Returns
    -------
    Path
        ``destination``.

    Raises
    ------
    DownloadError
        No URL worked; the message lists every URL with its failure (HTTP status, network
        error, short read, checksum mismatch).
    """
    destination = Path(destination)
    failures = []
    for url in urls:
        try:
            _fetch(url, destination, md5, progress=progress, timeout=timeout)
            return destination
        # URLError, HTTPError and socket errors are OSErrors; a malformed URL is a ValueError;
        # http.client raises HTTPException subclasses on protocol garbage.
        except (OSError, ValueError, http.client.HTTPException, DownloadError) as error:
            failures.append(f"  {url}: {error}")
    raise DownloadError(f"could not download {destination.name}; tried:\n" + "\n".join(failures) +
                        f"\nDownload it by hand into {destination.parent}, or use "
                        f"dataset='mnist-sample', which needs no network.")


def _fetch(url: str, destination: Path, md5: str, *, progress: bool, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "numpylenet"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        size = response.headers.get("Content-Length")
        size = int(size) if size is not None and size.isdigit() else None
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with atomic_write(destination) as file, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                                     desc=destination.name, disable=not progress) as bar:
            while chunk := response.read(1 << 16):
                file.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            # http.client ends a read at EOF without complaint even when Content-Length promised
            # more, so a connection dropped mid-file must be caught here.
            if size is not None and received != size:
                raise DownloadError(f"connection closed after {received:,} of {size:,} bytes")
            if digest.hexdigest() != md5:
                raise DownloadError(f"md5 {digest.hexdigest()} does not match the expected {md5}")


# --------------------------------------------------------------------------------------------
# Splitting and batching

def split_train_valid(num_items: int, valid_size: float = 0.1, seed: int = 0,
                      shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The notebook's ``split_train_valid_data`` indices: the first ``floor(valid_size * n)`` of a
    seeded shuffle of ``0..n-1`` validate, the rest train.

    The notebook calls ``np.random.seed(seed); np.random.shuffle(indices)``. A private
    ``RandomState(seed)`` draws the same permutation without reseeding NumPy's global generator.

    Returns
    -------
    train_indices : ndarray of int64, shape (n - floor(valid_size * n),)
    valid_indices : ndarray of int64, shape (floor(valid_size * n),)
    """
    if not isinstance(num_items, (int, np.integer)) or num_items < 0 or not 0.0 <= valid_size <= 1.0:
        raise ValueError(f"need num_items >= 0 and 0 <= valid_size <= 1, got {num_items} and {valid_size}")
    indices = np.arange(num_items, dtype=np.int64)
    split = int(np.floor(valid_size * num_items))
    if shuffle:
        np.random.RandomState(seed).shuffle(indices)
    return indices[split:], indices[:split]


def batch_indices(num_items: int, batch_size: int, *, shuffle: bool = True,
                  rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """Yield one epoch of mini-batch indices: every item exactly once, the last batch possibly short.

    Parameters
    ----------
    num_items : int
        Items are ``0 .. num_items - 1`` (positions into, e.g., ``split_train_valid``'s output).
    batch_size : int
        Items per batch, >= 1.
    shuffle : bool
        A fresh permutation drawn from ``rng`` (each call is one epoch), or the items in order.
    rng : numpy.random.Generator, optional
        Source of the permutation; a fresh unseeded generator if None.

    Yields
    ------
    ndarray of int64, shape (batch_size,) or shorter for the last batch
    """
    if batch_size < 1 or num_items < 0:
        raise ValueError(f"need batch_size >= 1 and num_items >= 0, got {batch_size} and {num_items}")
    if shuffle:
        order = (rng if rng is not None else np.random.default_rng()).permutation(num_items)
    else:
        order = np.arange(num_items, dtype=np.int64)
    for start in range(0, num_items, batch_size):
        yield order[start:start + batch_size]


# --------------------------------------------------------------------------------------------
# Transforms on whole batches of images, shape (N, H, W). Each equals a torchvision transform
# applied image by image, for the same random choices.


def pixel_mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of every pixel of uint8 ``images`` on ``T.ToTensor``'s [0, 1]
    scale, ``x / 255``: the statistics ``T.Normalize`` is given, here of one's own training images.

    Both are rounded to 4 decimals, the precision such statistics are quoted at: on MNIST's
    54,000-image training split (the notebook's split) they are MNIST's familiar 0.1307 and
    0.3081, and they do not move with the order of summation.

    Parameters
    ----------
    images : uint8 ndarray, any shape, at least one pixel

    Returns
    -------
    (mean, std) : floats; std is the population standard deviation (divided by the pixel count)
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.size == 0:
        raise ValueError(f"pixel_mean_std takes at least one uint8 pixel, got {images.dtype} of shape {images.shape}")
    # From the count of each of the 256 values: exact sums, and no float copy of the images.
    counts = np.bincount(images.ravel(), minlength=256)
    values = np.arange(256) / 255
    mean = counts @ values / images.size
    variance = counts @ (values - mean) ** 2 / images.size
    return round(float(mean), 4), round(float(np.sqrt(variance)), 4)



def _check_batch(images: np.ndarray) -> None:
    if images.ndim != 3:
        raise ValueError(f"expected a batch of images of shape (N, H, W), got shape {images.shape}")


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


def _zero_pad(images: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """(N, H, W) -> (N, top + H + bottom, left + W + right), the image inside a border of zeros.

    Written out rather than ``np.pad``, which costs several times more on a batch of 64.
    """
    count, height, width = images.shape
    padded = np.zeros((count, top + height + bottom, left + width + right), dtype=images.dtype)
    padded[:, top:top + height, left:left + width] = images
    return padded


def pad_to(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Centre each image in a ``size x size`` frame of zeros, as ``F.center_crop(img, size)``
    does for images smaller than ``size``: for an odd margin the extra row or column goes to the
    bottom or right. 28 x 28 to 32 x 32 is a 2-pixel border, LeNet-5's input size.

    Parameters
    ----------
    images : ndarray, shape (N, H, W), H <= size and W <= size

    Returns
    -------
    ndarray, shape (N, size, size), same dtype
    """
    _check_batch(images)
    _, height, width = images.shape
    if height > size or width > size:
        raise ValueError(f"pad_to({size}) cannot shrink images of size {height} x {width}")
    top, left = (size - height) // 2, (size - width) // 2
    return _zero_pad(images, top, size - height - top, left, size - width - left)


def _crop_range(images: np.ndarray, size: int | tuple[int, int], padding: int) -> tuple[int, int, int, int]:
    """(h, w, largest top offset, largest left offset) of a crop of ``size`` after ``padding``."""
    _check_batch(images)
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    padded_height, padded_width = images.shape[1] + 2 * padding, images.shape[2] + 2 * padding
    if height > padded_height or width > padded_width:
        raise ValueError(f"crop size {(height, width)} is larger than the padded image size "
                         f"{(padded_height, padded_width)}")
    return height, width, padded_height - height, padded_width - width


def crop(images: np.ndarray, size: int | tuple[int, int], padding: int,
         tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
    """Zero-pad every side by ``padding``, then cut each image's window at its own offset.

    For image n: ``out[n] = padded[n, tops[n]:tops[n] + h, lefts[n]:lefts[n] + w]``, which is
    ``F.crop(F.pad(img, padding), tops[n], lefts[n], h, w)``. The windows are read through one
    strided view of all possible windows, so the batch is cut in a single gather.

    Parameters
    ----------
    images : ndarray, shape (N, H, W)
    size : int or (h, w)
        Output size; an int means square.
    padding : int
        Zero border added on every side first, >= 0.
    tops, lefts : integer ndarray, shape (N,)
        Window offsets in the padded image: 0 <= tops <= H + 2 padding - h, likewise lefts.

    Returns
    -------
    ndarray, shape (N, h, w), same dtype
    """
    height, width, max_top, max_left = _crop_range(images, size, padding)
    padded = _zero_pad(images, padding, padding, padding, padding)
    tops, lefts = np.asarray(tops), np.asarray(lefts)
    if not (np.issubdtype(tops.dtype, np.integer) and np.issubdtype(lefts.dtype, np.integer)):
        raise ValueError(f"offsets must be integers, got {tops.dtype} and {lefts.dtype}")
    if tops.shape != (len(images),) or lefts.shape != (len(images),):
        raise ValueError(f"need one top and one left offset per image: {len(images)} images, "
                         f"offsets of shape {tops.shape} and {lefts.shape}")
    if len(images) and (tops.min() < 0 or tops.max() > max_top or lefts.min() < 0 or lefts.max() > max_left):
        raise ValueError(f"offsets must satisfy 0 <= top <= {max_top} and 0 <= left <= {max_left}")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
    return windows[np.arange(len(images)), tops, lefts]


def random_crop(images: np.ndarray, size: int | tuple[int, int] = 32, padding: int = 4,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """``T.RandomCrop(size, padding=padding)`` on every image: zero-pad by ``padding``, then a
    uniformly random h x w window, its top offset drawn from ``0 .. H + 2 padding - h`` and then
    its left offset from ``0 .. W + 2 padding - w`` (torchvision's ``get_params``). For 28 x 28
    MNIST with the notebook's size 32 and padding 4 that is ``0 .. 4``: the digit lands at most
    2 pixels off centre in each direction.

    Returns
    -------
    ndarray, shape (N, h, w), same dtype
    """
    _, _, max_top, max_left = _crop_range(images, size, padding)
    rng = _rng(rng)
    tops = rng.integers(0, max_top + 1, size=len(images))
    lefts = rng.integers(0, max_left + 1, size=len(images))
    return crop(images, size, padding, tops, lefts)


def flip_where(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mirror left-right the images where ``mask`` is True (``F.hflip``); copy the others.

    Parameters
    ----------
    images : ndarray, shape (N, H, W)
    mask : bool ndarray, shape (N,)

    Returns
    -------
    ndarray, shape (N, H, W), same dtype
    """
    _check_batch(images)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (len(images),):
        raise ValueError(f"need one flip choice per image: {len(images)} images, mask of shape {mask.shape}")
    flipped = images.copy()
    flipped[mask] = images[mask, :, ::-1]
    return flipped


def random_horizontal_flip(images: np.ndarray, p: float = 0.5,
                           rng: np.random.Generator | None = None) -> np.ndarray:
    """``T.RandomHorizontalFlip(p)`` on every image: each is mirrored when a uniform draw in
    [0, 1) falls below ``p``.

    Returns
    -------
    ndarray, shape (N, H, W), same dtype
    """
    _check_batch(images)
    return flip_where(images, _rng(rng).random(len(images)) < p)


def random_translate(images: np.ndarray, max_shift: int = 2,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """Shift each image by a random whole number of pixels, up to ``max_shift`` in each direction,
    filling with zeros and keeping the size.

    This is ``T.RandomCrop((H, W), padding=max_shift)``: pad by ``max_shift``, then cut an H x W
    window whose offsets, drawn from ``0 .. 2 max_shift``, put the image ``max_shift - offset``
    pixels from where it was.

    Returns
    -------
    ndarray, shape (N, H, W), same dtype
    """
    _check_batch(images)
    return random_crop(images, images.shape[1:], max_shift, rng)


def to_float(images: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """``T.ToTensor``: uint8 pixels to floats in [0, 1] as ``x / 255``, with a channel axis.

    Division (not multiplication by 1/255, which rounds differently) keeps float32 results
    bit-identical to torchvision's.

    Parameters
    ----------
    images : ndarray of uint8, shape (N, H, W)
    dtype : float32 or float64

    Returns
    -------
    ndarray of ``dtype``, shape (N, 1, H, W)
    """
    _check_batch(images)
    if images.dtype != np.uint8:
        raise ValueError(f"to_float scales uint8 pixels, got {images.dtype}")
    scaled = images.astype(dtype)
    scaled /= 255
    return scaled[:, np.newaxis]


def normalize(x: np.ndarray, mean: float | Sequence[float], std: float | Sequence[float]) -> np.ndarray:
    """``T.Normalize(mean, std)``: ``(x - mean) / std`` per channel, in ``x``'s dtype.

    Parameters
    ----------
    x : float ndarray, shape (N, C, H, W)
    mean, std : float or sequence of C floats

    Returns
    -------
    ndarray, shape (N, C, H, W), same dtype
    """
    x = np.asarray(x)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected a float batch of shape (N, C, H, W), got {x.dtype} of shape {x.shape}")
    mean = np.asarray(mean, dtype=x.dtype).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=x.dtype).reshape(-1, 1, 1)
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, x.shape[1]):     # torchvision refuses these too
            raise ValueError(f"normalize: {len(values)} {name} values for {x.shape[1]} channels")
    if np.any(std == 0):
        raise ValueError("normalize: std must be non-zero")
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def pixel_table(dtype: np.dtype | type = np.float32,
                mean_std: tuple[float, float] | None = None) -> np.ndarray:
    """What each of the 256 uint8 pixel values becomes under :func:`to_float` and then, when
    ``mean_std`` is given, :func:`normalize`.

    Both act on each pixel alone, so ``np.take(table, images)`` equals the two steps bit for bit,
    in one pass over the batch instead of four (a batch of 128 images: ~130 us instead of ~780).

    Parameters
    ----------
    dtype : float32 or float64
    mean_std : (mean, std) of one channel, or None for ``x / 255`` alone

    Returns
    -------
    ndarray of ``dtype``, shape (256,), read-only: ``table[v]`` is the float for pixel value ``v``;
    built once per (dtype, mean_std), since every batch of a run asks for the same one
    """
    values = to_float(np.arange(256, dtype=np.uint8).reshape(1, 1, 256), dtype=dtype)
    if mean_std is not None:
        values = normalize(values, *mean_std)
    table = values.reshape(256)
    table.flags.writeable = False
    return table
