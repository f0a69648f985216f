"""numpylenet.data against independent truths: hand-packed IDX bytes, torchvision's own reader,
dataset and transforms, the seed notebook's split function, and a local HTTP server."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numpylenet import data
from numpylenet.data import IDXFormatError, read_idx, write_idx

REPO = Path(__file__).resolve().parent.parent
# MNIST's and Fashion-MNIST's statistics as published (over their 60,000 training images): test inputs.
PUBLISHED_MEAN_STD = [(0.1307, 0.3081), (0.2860, 0.3530)]


def torchvision_functional():
    return pytest.importorskip("torchvision.transforms.functional")


def idx_bytes(type_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file assembled by hand with struct, independent of data.write_idx."""
    return struct.pack(">BBBB", 0, 0, type_code, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + payload


def write_bytes(path: Path, content: bytes, *, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
    return path


# --------------------------------------------------------------------------------------------
# read_idx on well-formed files: every type code, raw and gzip, against struct-packed values

def check_type(tmp_path, type_code, struct_code, values, dtype, compress):
    content = idx_bytes(type_code, (len(values),), struct.pack(f">{len(values)}{struct_code}", *values))
    array = read_idx(write_bytes(tmp_path / "f.idx", content, compress=compress))
    assert array.dtype == np.dtype(dtype) and array.dtype.isnative and array.flags.writeable
    np.testing.assert_array_equal(array, np.array(values, dtype=dtype))


@pytest.mark.parametrize("compress", [False, True])
def test_read_every_type_code(tmp_path, compress):
    check_type(tmp_path, 0x08, "B", [0, 1, 128, 255], np.uint8, compress)
    check_type(tmp_path, 0x09, "b", [-128, -1, 0, 127], np.int8, compress)
    check_type(tmp_path, 0x0B, "h", [-32768, -2, 258, 32767], np.int16, compress)
    check_type(tmp_path, 0x0C, "i", [-2**31, -2, 16909060, 2**31 - 1], np.int32, compress)
    check_type(tmp_path, 0x0D, "f", [-1.5, 0.0, 3.25, 1e30], np.float32, compress)
    check_type(tmp_path, 0x0E, "d", [-1.5, 0.1, 3.25, 1e300], np.float64, compress)


def test_read_shape_is_c_order(tmp_path):
    content = idx_bytes(0x08, (2, 3, 1, 2), bytes(range(12)))
    expected = np.arange(12).reshape(2, 3, 1, 2)
    np.testing.assert_array_equal(read_idx(write_bytes(tmp_path / "f", content)), expected)


def test_read_empty_dimension(tmp_path):
    assert read_idx(write_bytes(tmp_path / "f", idx_bytes(0x0C, (0, 5), b""))).shape == (0, 5)


@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 2, 3)])
def test_read_matches_torchvision_reader(tmp_path, dtype, shape):
    mnist = pytest.importorskip("torchvision.datasets.mnist")
    values = (np.random.default_rng(0).standard_normal(shape) * 100).astype(dtype)
    path = write_idx(tmp_path / "f.idx", values)
    expected = mnist.read_sn3_pascalvincent_tensor(str(path)).numpy()
    assert read_idx(path).dtype == expected.dtype
    np.testing.assert_array_equal(read_idx(path), expected)


def test_write_idx_round_trip_and_deterministic(tmp_path):
    for dtype in ("u1", "i1", "i2", "i4", "f4", "f8", ">i4", "<f8"):
        values = (np.random.default_rng(1).standard_normal((3, 4)) * 50).astype(dtype)
        for name in ("a.idx", "a.idx.gz"):
            first = write_idx(tmp_path / name, values).read_bytes()
            np.testing.assert_array_equal(read_idx(tmp_path / name), values)
            time.sleep(0.01)  # a gzip header carrying the time would now differ
            assert write_idx(tmp_path / name, values).read_bytes() == first
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_idx(tmp_path / "b.idx", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "b.idx", np.uint8(3))


# --------------------------------------------------------------------------------------------
# read_idx on malformed files: always IDXFormatError, naming the file and the fault

def check_malformed(tmp_path, content, match, *, compress=False):
    path = write_bytes(tmp_path / "broken-file.idx", content, compress=compress)
    with pytest.raises(IDXFormatError, match=match) as raised:
        read_idx(path)
    assert str(path) in str(raised.value)


GOOD = idx_bytes(0x08, (2, 3), bytes(6))
GOOD_GZ = gzip.compress(GOOD, mtime=0)


def test_malformed_header(tmp_path):
    check_malformed(tmp_path, b"", "file is empty")
    check_malformed(tmp_path, b"\x00\x00\x08", "only 3 bytes long")
    check_malformed(tmp_path, b"\x01\x00\x08\x01" + bytes(8), "bad magic number 0x01000801")
    check_malformed(tmp_path, b"\x00\x07\x08\x01" + bytes(8), "bad magic number")
    check_malformed(tmp_path, idx_bytes(0x0A, (2,), bytes(2)), "unknown IDX type code 0x0A")
    check_malformed(tmp_path, idx_bytes(0x0F, (2,), bytes(2)), "unknown IDX type code 0x0F")
    check_malformed(tmp_path, b"\x00\x00\x08\x00", "zero dimensions")
    check_malformed(tmp_path, b"\x00\x00\x08\x03" + bytes(5), "header truncated: 3 dimensions need 12 bytes")
    check_malformed(tmp_path, idx_bytes(0x08, (2**32 - 1,) * 3, b""), "absurd dimensions")
    check_malformed(tmp_path, idx_bytes(0x0E, (0, 2**32 - 1, 2**32 - 1), b""), "absurd dimensions")
    check_malformed(tmp_path, b"PK\x03\x04 not an idx file", "bad magic number")


def test_malformed_payload(tmp_path):
    check_malformed(tmp_path, GOOD[:-1], "payload truncated: .* need 6 bytes after the header, the file has 5")
    check_malformed(tmp_path, GOOD + b"\x00", "trailing data")
    check_malformed(tmp_path, idx_bytes(0x0C, (3,), bytes(11)), "payload truncated: .* int32 need 12 bytes")
    check_malformed(tmp_path, idx_bytes(0x08, (60000, 28, 28), bytes(100)), "payload truncated")
    check_malformed(tmp_path, GOOD[:-1], "truncated", compress=True)
    check_malformed(tmp_path, GOOD + bytes(1000), "trailing data", compress=True)
    check_malformed(tmp_path, b"", "file is empty", compress=True)


def test_malformed_gzip(tmp_path):
    check_malformed(tmp_path, GOOD_GZ[:-1], "damaged gzip data")      # trailer cut short
    check_malformed(tmp_path, GOOD_GZ[:12], "damaged gzip data")      # deflate stream cut short
    check_malformed(tmp_path, GOOD_GZ[:2], "damaged gzip data")       # only the magic bytes
    crc_flipped = GOOD_GZ[:-8] + bytes([GOOD_GZ[-8] ^ 1]) + GOOD_GZ[-7:]
    check_malformed(tmp_path, crc_flipped, "damaged gzip data")
    check_malformed(tmp_path, GOOD_GZ[:10] + b"\xff" * 8 + GOOD_GZ[18:], "damaged gzip data")
    check_malformed(tmp_path, GOOD_GZ + b"garbage after the gzip member", "damaged gzip data")
    check_malformed(tmp_path, GOOD_GZ[:3] + b"\xff" + GOOD_GZ[4:], "damaged gzip data")  # every header flag


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing-here.idx")


@pytest.mark.parametrize("compress", [False, True])
def test_lying_header_allocates_only_what_the_file_holds(tmp_path, compress):
    # The header claims 3.2 GB (under the absurdity limit); the file holds 100 bytes.
    path = write_bytes(tmp_path / "liar.idx", idx_bytes(0x0E, (20000, 20000), bytes(100)), compress=compress)
    tracemalloc.start()
    try:
        with pytest.raises(IDXFormatError, match="payload truncated"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak:,} bytes"


# Property-based fuzz: any header, any payload length, any truncation or damaged byte.

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TYPE_ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def read_or_format_error(path: Path):
    """read_idx's result, or None if it raised IDXFormatError naming the file; anything else fails."""
    try:
        return read_idx(path)
    except IDXFormatError as error:
        assert str(path) in str(error)
        return None


@FUZZ
@given(type_code=st.integers(0, 15), shape=st.lists(st.integers(0, 5) | st.integers(0, 2**32 - 1), max_size=4),
       extra=st.integers(-3, 3), compress=st.booleans())
def test_fuzz_headers(tmp_path, type_code, shape, extra, compress):
    itemsize = TYPE_ITEMSIZE.get(type_code, 1)
    expected = int(np.prod(shape, dtype=object)) * itemsize if shape else 0
    payload = bytes(range(256)) * 2
    payload = payload[:max(0, min(expected, 64) + extra)]
    path = write_bytes(tmp_path / "fuzz.idx", idx_bytes(type_code, tuple(shape), payload), compress=compress)
    result = read_or_format_error(path)
    extent = int(np.prod([max(size, 1) for size in shape], dtype=object)) * itemsize
    well_formed = (type_code in TYPE_ITEMSIZE and shape and extent <= data.IDX_MAX_BYTES
                   and len(payload) == expected)
    assert (result is not None) == bool(well_formed)
    if well_formed:
        dtype = np.dtype(data.IDX_DTYPES[type_code])
        np.testing.assert_array_equal(result, np.frombuffer(payload, dtype).reshape(shape))


@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True), compress=st.booleans())
def test_fuzz_truncations(tmp_path, cut, compress):
    content = idx_bytes(0x0B, (3, 4), bytes(range(24)))
    if compress:
        content = gzip.compress(content, mtime=0)
    path = write_bytes(tmp_path / "cut.idx", content[:int(cut * len(content))])
    assert read_or_format_error(path) is None


@FUZZ
@given(position=st.integers(0, 10**6), value=st.integers(0, 255), compress=st.booleans())
def test_fuzz_damaged_byte(tmp_path, position, value, compress):
    original = np.arange(24, dtype=">i2").reshape(3, 8)
    content = idx_bytes(0x0B, (3, 8), original.tobytes())
    if compress:
        content = gzip.compress(content, mtime=0)
    position %= len(content)
    path = write_bytes(tmp_path / "damaged.idx", content[:position] + bytes([value]) + content[position + 1:])
    result = read_or_format_error(path)
    if compress and result is not None:  # gzip's CRC catches any damage to the data itself
        np.testing.assert_array_equal(result, original)


@FUZZ
@given(content=st.binary(max_size=48),
       prefix=st.sampled_from([b"", b"\x00\x00", b"\x00\x00\x08\x01", b"\x1f\x8b"]))
def test_fuzz_arbitrary_bytes(tmp_path, content, prefix):
    result = read_or_format_error(write_bytes(tmp_path / "noise.idx", prefix + content))
    assert result is None or isinstance(result, np.ndarray)


# --------------------------------------------------------------------------------------------
# load_mnist on the real data: identical to torchvision.datasets.MNIST

@pytest.fixture(scope="session")
def unpacked_mnist_root(mnist_root, tmp_path_factory):
    """A copy of the real MNIST with uncompressed files, the only form torchvision.datasets.MNIST
    accepts without downloading."""
    root = tmp_path_factory.mktemp("unpacked")
    (root / "MNIST" / "raw").mkdir(parents=True)
    for name in data.MNIST_FILES:
        with gzip.open(mnist_root / "MNIST" / "raw" / f"{name}.gz") as source:
            (root / "MNIST" / "raw" / name).write_bytes(source.read())
    return root


@pytest.mark.parametrize("train", [True, False])
def test_load_mnist_matches_torchvision(mnist_root, unpacked_mnist_root, train):
    datasets = pytest.importorskip("torchvision.datasets")
    reference = datasets.MNIST(unpacked_mnist_root, train=train, download=False)
    for root in (mnist_root, unpacked_mnist_root):  # .gz files and raw files
        images, labels = data.load_mnist(root, train=train)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, reference.data.numpy())
        np.testing.assert_array_equal(labels, reference.targets.numpy())


def test_load_mnist_facts_from_the_data_readme(mnist_root):
    images, labels = data.load_mnist(mnist_root)
    assert images.shape == (60000, 28, 28)
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert round(images.mean() / 255, 4) == 0.1307
    images, labels = data.load_mnist(mnist_root, train=False)
    assert images.shape == (10000, 28, 28) and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def make_root(root: Path, images, labels, folder="MNIST", split="train") -> Path:
    (root / folder / "raw").mkdir(parents=True, exist_ok=True)
    write_idx(root / folder / "raw" / f"{split}-images-idx3-ubyte.gz", np.asarray(images))
    write_idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", np.asarray(labels))
    return root


def check_load_error(tmp_path, image_shape, labels, match, image_dtype=np.uint8, label_dtype=np.uint8):
    root = make_root(tmp_path, np.zeros(image_shape, image_dtype), np.array(labels, label_dtype))
    with pytest.raises(ValueError, match=match):
        data.load_mnist(root)


def test_load_mnist_rejects_bad_contents(tmp_path):
    check_load_error(tmp_path, (3, 28, 28), [1, 2, 10], "0-9, found 10")
    check_load_error(tmp_path, (3, 28, 28), [1, 2], "3 images but")
    check_load_error(tmp_path, (3, 28, 27), [1, 2, 3], r"\(N, 28, 28\)")
    check_load_error(tmp_path, (3, 28, 28), [1, 2, 3], "uint8 images", image_dtype=np.float32)
    check_load_error(tmp_path, (3, 28, 28), [1, 2, 3], "uint8 labels", label_dtype=np.int16)
    check_load_error(tmp_path, (3, 28, 28), [[1], [2], [3]], r"\(N,\)")
    write_bytes(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", b"\x00\x00\x08")
    with pytest.raises(IDXFormatError, match="train-labels-idx1-ubyte: file is only 3 bytes"):
        data.load_mnist(tmp_path)


def test_load_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'MNIST' / 'raw'}.*download=True.*mnist-sample"):
        data.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="no t10k-images-idx3-ubyte"):
        data.load_mnist(make_root(tmp_path, np.zeros((1, 28, 28), np.uint8), np.ones(1, np.uint8)), train=False)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        data.load_mnist(tmp_path, dataset="cifar")


@contextmanager
def within(seconds: int):
    """Fail instead of hanging: SIGALRM after ``seconds`` raises TimeoutError."""
    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


NOT_A_FILE = {"directory": "is a directory", "FIFO": "is a FIFO (named pipe)",
              "symlink loop": "is a symbolic link loop", "broken symlink": "is a broken symbolic link"}


@pytest.mark.parametrize("kind", NOT_A_FILE)
def test_a_data_file_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path, kind):
    """Issue 15: a directory, FIFO or link loop in place of a data file was reported as missing,
    and read_idx on a FIFO hung; now each is named for what it is, at once."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    target = raw / "train-images-idx3-ubyte"
    if kind == "directory":
        target.mkdir()
    elif kind == "FIFO":
        os.mkfifo(target)
    elif kind == "symlink loop":
        target.symlink_to(raw / "loop")
        (raw / "loop").symlink_to(target)
    else:
        target.symlink_to(raw / "nowhere")
    with within(10):
        with pytest.raises(OSError, match=re.escape(f"{target} {NOT_A_FILE[kind]}")):
            data.load_mnist(tmp_path)
        with pytest.raises(OSError, match=re.escape(f"{target} {NOT_A_FILE[kind]}")):
            read_idx(target)


def test_a_data_dir_that_is_a_file_is_said_to_be_one(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'data'} is a file, not a folder")):
        data.load_mnist(tmp_path / "data")
    with pytest.raises(data.DownloadError, match=re.escape(f"{tmp_path / 'data'} is a file, not a folder")):
        data.load_mnist(tmp_path / "data", download=True)


def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch):
    """Issue 15: --dataset auto with no data and no network left an empty data/MNIST/raw."""
    from numpylenet.pipeline import load_dataset

    with socket.socket() as probe:   # a port nobody listens on: no network
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    monkeypatch.setitem(data.SOURCES, "mnist", replace(data.SOURCES["mnist"], mirrors=(dead,)))
    monkeypatch.chdir(tmp_path)
    *_, dataset, reason = load_dataset("auto", "data", True, train=True)
    assert dataset == "mnist-sample" and "could not download" in reason
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()   # a root that was there stays; only what the attempt made goes
    load_dataset("auto", "kept", True, train=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []


def test_load_fashion_mnist_layout(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    make_root(tmp_path, images, np.array([9, 0, 3, 3], np.uint8), folder="FashionMNIST", split="t10k")
    loaded, labels = data.load_mnist(tmp_path, train=False, dataset="fashion-mnist")
    np.testing.assert_array_equal(loaded, images)
    assert labels.tolist() == [9, 0, 3, 3]


# --------------------------------------------------------------------------------------------
# The bundled sample

def test_sample_loads_without_network_or_data_folder(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the sample must not touch the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)  # no ./data here
    images, labels = data.load_mnist(dataset="mnist-sample", download=True)
    assert images.shape == (6000, 28, 28) and images.dtype == np.uint8 and labels.shape == (6000,)
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    images, labels = data.load_mnist("nowhere", train=False, dataset="mnist-sample")
    assert images.shape == (1000, 28, 28) and labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert "CC BY-SA 3.0" in (data.SAMPLE_ROOT / "MNIST-sample" / "README.md").read_text()


def test_sample_is_the_head_of_mnist_and_reproducible(mnist_root, tmp_path):
    from numpylenet.datasets.make_sample import make_sample
    for train, count in ((True, 6000), (False, 1000)):
        full_images, full_labels = data.load_mnist(mnist_root, train=train)
        images, labels = data.load_mnist(dataset="mnist-sample", train=train)
        np.testing.assert_array_equal(images, full_images[:count])
        np.testing.assert_array_equal(labels, full_labels[:count])
    for path in make_sample(mnist_root / "MNIST" / "raw", tmp_path):  # same content; gzip bytes may vary with zlib
        shipped = data.SAMPLE_ROOT / "MNIST-sample" / "raw" / path.name
        assert gzip.decompress(path.read_bytes()) == gzip.decompress(shipped.read_bytes())


# --------------------------------------------------------------------------------------------
# Download, against a local HTTP server (never the internet)

class Server:
    """A local HTTP server: ``files`` maps a URL path to bytes; paths under /drop/ send half of
    their file and hang up; under /stall/ send half and wait for ``release``; the rest is 404."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.stalled, self.release = threading.Event(), threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mode, _, name = self.path.lstrip("/").partition("/")
                content = server.files.get("/" + name)
                if content is None or mode not in ("ok", "drop", "stall"):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content if mode == "ok" else content[:len(content) // 2])
                self.wfile.flush()
                if mode == "stall":
                    server.stalled.set()
                    server.release.wait(30)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    server = Server()
    yield server
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()


PAYLOAD = gzip.compress(idx_bytes(0x08, (1000,), bytes(range(250)) * 4), mtime=0)
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def only_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def check_download_fails(server, tmp_path, modes, match, served=PAYLOAD):
    server.files["/file.gz"] = served
    urls = [f"{server.url}/{mode}/file.gz" for mode in modes]
    with pytest.raises(data.DownloadError, match=match) as raised:
        data.download_file(urls, tmp_path / "file.gz", PAYLOAD_MD5, progress=False, timeout=5)
    assert all(url in str(raised.value) for url in urls)
    assert only_files(tmp_path) == []  # nothing partial left behind


def test_download_good_file(server, tmp_path):
    server.files["/file.gz"] = PAYLOAD
    path = data.download_file([f"{server.url}/ok/file.gz"], tmp_path / "file.gz", PAYLOAD_MD5, progress=False)
    assert path.read_bytes() == PAYLOAD and only_files(tmp_path) == ["file.gz"]


def test_download_failures(server, tmp_path):
    check_download_fails(server, tmp_path, ["ok"], f"md5 .* does not match the expected {PAYLOAD_MD5}",
                         served=PAYLOAD[::-1])
    check_download_fails(server, tmp_path, ["missing"], "HTTP Error 404")
    check_download_fails(server, tmp_path, ["drop"],
                         f"connection closed after {len(PAYLOAD) // 2:,} of {len(PAYLOAD):,} bytes")
    check_download_fails(server, tmp_path, ["missing", "drop"], "(?s)404.*connection closed")


def test_download_unreachable_host(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(data.DownloadError, match="(?s)tried:.*127.0.0.1.*mnist-sample"):
        data.download_file([f"http://127.0.0.1:{port}/file.gz", "not a url"], tmp_path / "f", PAYLOAD_MD5,
                           progress=False)


def test_download_falls_back_to_the_next_mirror(server, tmp_path):
    server.files["/file.gz"] = PAYLOAD
    urls = [f"{server.url}/{mode}/file.gz" for mode in ("missing", "drop", "ok")]
    data.download_file(urls, tmp_path / "file.gz", PAYLOAD_MD5, progress=False)
    assert (tmp_path / "file.gz").read_bytes() == PAYLOAD and only_files(tmp_path) == ["file.gz"]


def test_interrupted_download_leaves_nothing(server, tmp_path):
    server.files["/file.gz"] = PAYLOAD
    url, destination = f"{server.url}/stall/file.gz", str(tmp_path / "file.gz")
    script = ("from numpylenet.data import download_file\n"
              f"download_file([{url!r}], {destination!r}, 'x', progress=False)")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE)
    try:
        assert server.stalled.wait(30), "the download never started"
        time.sleep(0.2)  # let the client write the half it received
        assert [name for name in only_files(tmp_path) if name.endswith(".tmp")], "expected a temporary file"
        child.send_signal(signal.SIGINT)
        assert b"KeyboardInterrupt" in child.communicate(timeout=30)[1]
    finally:
        child.kill()
    assert only_files(tmp_path) == []


def test_load_mnist_downloads_from_mirrors(server, tmp_path, monkeypatch):
    """End to end: load_mnist(download=True) fetches the files of the split it loads (the sample,
    served as if it were MNIST; the test set needs no training files), skipping a dead first
    mirror, and leaves a folder torchvision can read too."""
    sample_raw = data.SAMPLE_ROOT / "MNIST-sample" / "raw"
    md5 = {}
    for name in data.MNIST_FILES:
        server.files[f"/{name}.gz"] = (sample_raw / f"{name}.gz").read_bytes()
        md5[name] = hashlib.md5(server.files[f"/{name}.gz"]).hexdigest()
    mirrors = (f"{server.url}/missing/", f"{server.url}/ok/")
    monkeypatch.setitem(data.SOURCES, "mnist", replace(data.SOURCES["mnist"], mirrors=mirrors, md5=md5))
    images, labels = data.load_mnist(tmp_path, train=False, download=True)
    expected_images, expected_labels = data.load_mnist(dataset="mnist-sample", train=False)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    raw = tmp_path / "MNIST" / "raw"
    test_files = [name for name in data.MNIST_FILES if name.startswith("t10k-")]
    assert only_files(raw) == sorted(test_files + [f"{name}.gz" for name in test_files])
    data.load_mnist(tmp_path, train=True, download=True)
    assert only_files(raw) == sorted(list(data.MNIST_FILES) + [f"{name}.gz" for name in data.MNIST_FILES])
    server.files.clear()  # a second call finds everything in place and asks nothing
    data.load_mnist(tmp_path, download=True)
    datasets = pytest.importorskip("torchvision.datasets")
    np.testing.assert_array_equal(datasets.MNIST(tmp_path, train=False).data.numpy(), images)


# --------------------------------------------------------------------------------------------
# The seed notebook's split, and batching

def notebook_split(num_train, valid_size=0.1, random_seed=0, shuffle=True):
    """split_train_valid_data from the seed notebook, verbatim up to the DataLoaders it builds."""
    indices = list(range(num_train))
    split = int(np.floor(valid_size * num_train))

    if shuffle == True:  # noqa: E712 (verbatim)
        np.random.seed(random_seed)
        np.random.shuffle(indices)

    train_idx, valid_idx = indices[split:], indices[:split]
    return train_idx, valid_idx


def check_split(num_items, valid_size=0.1, seed=0, shuffle=True):
    train, valid = data.split_train_valid(num_items, valid_size, seed, shuffle)
    expected_train, expected_valid = notebook_split(num_items, valid_size, seed, shuffle)
    assert train.dtype == valid.dtype == np.int64
    assert train.tolist() == expected_train and valid.tolist() == expected_valid


def test_split_matches_notebook():
    check_split(60000)
    check_split(60000, seed=1)
    check_split(60000, valid_size=0.2, seed=123)
    check_split(6000)
    check_split(60000, shuffle=False)
    check_split(7, valid_size=0.5, seed=3)
    check_split(1)
    check_split(0)
    check_split(10, valid_size=0.0)
    check_split(10, valid_size=1.0)


def test_split_leaves_global_numpy_state_alone():
    np.random.seed(42)
    expected = np.random.random()
    np.random.seed(42)
    data.split_train_valid(100, seed=7)
    assert np.random.random() == expected


@pytest.mark.parametrize("count, batch_size", [(10, 0), (10, -1), (-1, 4)])
def test_batches_per_epoch_need_a_positive_batch(count, batch_size):
    """num_batches(10, 0) divided by zero; (10, -1) said -10 batches."""
    from numpylenet.pipeline import num_batches

    with pytest.raises(ValueError, match="batch_size >= 1"):
        num_batches(count, batch_size)


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid_size"):
        data.split_train_valid(10, valid_size=1.5)
    with pytest.raises(ValueError, match="num_items"):
        data.split_train_valid(-1)
    with pytest.raises(ValueError, match="num_items"):      # gave 11 indices, index 10 among them
        data.split_train_valid(10.5)


def check_batches(num_items, batch_size, shuffle=True):
    batches = list(data.batch_indices(num_items, batch_size, shuffle=shuffle, rng=np.random.default_rng(5)))
    sizes = [len(batch) for batch in batches]
    full, rest = divmod(num_items, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest else [])
    order = np.concatenate(batches) if batches else np.array([], np.int64)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(num_items))
    assert (order.tolist() == list(range(num_items))) == (not shuffle or num_items < 3)
    again = list(data.batch_indices(num_items, batch_size, shuffle=shuffle, rng=np.random.default_rng(5)))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_batch_indices():
    check_batches(54000, 64)
    check_batches(100, 32)
    check_batches(100, 25)
    check_batches(5, 10)
    check_batches(0, 4)
    check_batches(100, 32, shuffle=False)
    check_batches(1, 1)


def test_batch_indices_new_permutation_each_epoch():
    rng = np.random.default_rng(0)
    first, second = (np.concatenate(list(data.batch_indices(1000, 64, rng=rng))) for _ in range(2))
    assert not np.array_equal(first, second)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batch_indices(10, 0))


# --------------------------------------------------------------------------------------------
# Transforms, each equal to the torchvision transform it mirrors (through PIL, as the notebook's
# torchvision.datasets.MNIST hands each image to its transforms), for the same random choices

@pytest.fixture(scope="module")
def digits():
    """64 real MNIST digits (the bundled sample) and 64 random images with no zero pixel, so that
    every crop offset gives a different result."""
    images, _ = data.load_mnist(dataset="mnist-sample")
    noise = np.random.default_rng(0).integers(1, 256, (64, 28, 28), dtype=np.uint8)
    return np.concatenate([images[:64], noise])


def torchvision_each(images, transform):
    """Apply ``transform(pil_image, n) -> pil_image`` to each image, back to a uint8 batch."""
    from PIL import Image
    return np.stack([np.asarray(transform(Image.fromarray(image, mode="L"), n)) for n, image in enumerate(images)])


def test_pad_to_matches_center_crop(digits):
    F = torchvision_functional()
    expected = torchvision_each(digits, lambda img, n: F.center_crop(img, 32))
    np.testing.assert_array_equal(data.pad_to(digits), expected)
    np.testing.assert_array_equal(data.pad_to(digits), torchvision_each(digits, lambda img, n: F.pad(img, 2)))
    odd = digits[:, :27, :25]
    expected = torchvision_each(odd, lambda img, n: F.center_crop(img, 30))
    np.testing.assert_array_equal(data.pad_to(odd, 30), expected)


def test_crop_matches_pad_then_crop(digits):
    F = torchvision_functional()
    rng = np.random.default_rng(1)
    for size, padding in ((32, 4), (28, 2), ((20, 24), 0), (36, 4)):
        height, width = (size, size) if isinstance(size, int) else size
        tops = rng.integers(0, 28 + 2 * padding - height + 1, len(digits))
        lefts = rng.integers(0, 28 + 2 * padding - width + 1, len(digits))
        expected = torchvision_each(digits,
                                    lambda img, n: F.crop(F.pad(img, padding), tops[n], lefts[n], height, width))
        np.testing.assert_array_equal(data.crop(digits, size, padding, tops, lefts), expected)


def test_flip_where_matches_hflip(digits):
    F = torchvision_functional()
    mask = np.random.default_rng(2).random(len(digits)) < 0.5
    expected = torchvision_each(digits, lambda img, n: F.hflip(img) if mask[n] else img)
    np.testing.assert_array_equal(data.flip_where(digits, mask), expected)


def test_to_float_matches_to_tensor(digits):
    F = torchvision_functional()
    from PIL import Image
    expected = np.stack([F.to_tensor(Image.fromarray(image, mode="L")).numpy() for image in digits])
    ours = data.to_float(digits)
    assert ours.dtype == np.float32 and ours.shape == (len(digits), 1, 28, 28)
    np.testing.assert_array_equal(ours, expected)  # bit for bit
    import torch  # ToTensor is img.to(dtype).div(255); in float64:
    np.testing.assert_array_equal(data.to_float(digits, np.float64),
                                  torch.from_numpy(digits).to(torch.float64).div(255).numpy()[:, None])


def test_normalize_matches(digits):
    F = torchvision_functional()
    import torch
    for dtype in (np.float32, np.float64):
        x = data.to_float(digits, dtype)
        for mean, std in PUBLISHED_MEAN_STD:
            expected = F.normalize(torch.from_numpy(x), [mean], [std]).numpy()
            np.testing.assert_array_equal(data.normalize(x, mean, std), expected)
    x3 = np.random.default_rng(3).random((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(data.normalize(x3, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)),
                                  F.normalize(torch.from_numpy(x3), [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]).numpy())
    # What torchvision refuses: a mean or std per channel of another channel count (one channel
    # with two stds came back as two channels), and integer images (std 0.5 cast to uint8 was 0).
    with pytest.raises(RuntimeError):
        F.normalize(torch.from_numpy(x3), [0.1, 0.2], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 mean values for 3 channels"):
        data.normalize(x3, (0.1, 0.2), (1.0, 1.0))
    with pytest.raises(ValueError, match="2 std values for 1 channels"):
        data.normalize(x3[:, :1], 0.1, (1.0, 1.0))
    with pytest.raises(ValueError, match="expected a float batch"):
        data.normalize(digits[:, None], 0.5, 0.5)


def test_pixel_mean_std_by_hand_and_against_a_float_copy():
    half_black_half_white = np.array([[0, 255], [255, 0]], np.uint8)
    assert data.pixel_mean_std(half_black_half_white) == (0.5, 0.5)
    assert data.pixel_mean_std(np.full((3, 28, 28), 51, np.uint8)) == (0.2, 0.0)
    images = np.random.default_rng(5).integers(0, 256, (40, 28, 28)).astype(np.uint8)
    scaled = images.astype(np.float64) / 255
    assert data.pixel_mean_std(images) == (round(scaled.mean(), 4), round(scaled.std(), 4))
    for bad in (images.astype(np.float32), np.zeros((0, 28, 28), np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            data.pixel_mean_std(bad)


def test_normalisation_statistics_are_set_together_and_sane():
    from numpylenet.pipeline import DataSplits, transform, with_training_statistics
    from numpylenet.recipes import make_config

    for bad in (dict(normalize_mean=0.1), dict(normalize_std=0.3), dict(normalize_mean=0.1, normalize_std=0.0),
                dict(normalize_mean=float("nan"), normalize_std=0.3)):
        with pytest.raises(ValueError, match="normalize_"):
            make_config("speedrun", **bad)
    flat = np.full((10, 28, 28), 7, np.uint8)
    splits = DataSplits("mnist", flat, np.zeros(10, np.int64), flat, np.zeros(10, np.int64), flat, np.zeros(10, np.int64))
    with pytest.raises(ValueError, match="std 0"):
        with_training_statistics(make_config("speedrun"), splits)
    with pytest.raises(ValueError, match="no statistics"):    # the stats were never measured
        transform(flat, make_config("speedrun"), train=False, rng=None)
    given = make_config("speedrun", normalize_mean=0.5, normalize_std=0.25)
    assert with_training_statistics(given, splits) is given       # the user's (or checkpoint's) are kept
    np.testing.assert_allclose(transform(flat, given, train=False, rng=None)[0, 0, 16, 16], (7 / 255 - 0.5) / 0.25,
                               rtol=1e-6)


def test_pixel_table_matches_to_tensor_and_normalize():
    F = torchvision_functional()
    import torch
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    for dtype, torch_dtype in ((np.float32, torch.float32), (np.float64, torch.float64)):
        scaled = torch.from_numpy(every_value).to(torch_dtype).div(255)[None]  # ToTensor, (1, 1, 16, 16)
        np.testing.assert_array_equal(np.take(data.pixel_table(dtype), every_value)[None], scaled.numpy())
        for mean, std in PUBLISHED_MEAN_STD:
            lookup = np.take(data.pixel_table(dtype, (mean, std)), every_value)[None]
            np.testing.assert_array_equal(lookup, F.normalize(scaled, [mean], [std]).numpy())  # bit for bit


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mean, std", PUBLISHED_MEAN_STD)
def test_evaluation_transform_matches_torchvision(digits, dtype, normalize, mean, std):
    """pipeline.transform's centred images = CenterCrop(32) (which pads), ToTensor, Normalize."""
    F = torchvision_functional()
    import torch
    from PIL import Image
    from numpylenet.pipeline import transform
    from numpylenet.recipes import make_config

    config = make_config("speedrun", dtype=dtype, normalize=normalize, normalize_mean=mean, normalize_std=std)

    def torchvision(image):
        # ToTensor's img.to(dtype).div(255), in the run's dtype
        x = F.pil_to_tensor(F.center_crop(Image.fromarray(image, mode="L"), 32)).to(getattr(torch, dtype)).div(255)
        return (F.normalize(x, [mean], [std]) if normalize else x).numpy()

    expected = np.stack([torchvision(image) for image in digits])
    for train in (True, False):  # speedrun trains on the centred images too (no augmentation)
        ours = transform(digits, config, train=train, rng=None)
        assert ours.shape == (len(digits), 1, 32, 32) and ours.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(ours, expected)


def indexed_images(count):
    """count images, image i filled with the value i % 256: a transformed batch shows which it holds."""
    return np.repeat(np.arange(count) % 256, 28 * 28).astype(np.uint8).reshape(count, 28, 28)


def epoch_order(config, images, epoch):
    from numpylenet.pipeline import training_batches

    labels = np.arange(len(images), dtype=np.int64)
    return np.concatenate([y for _, _, y in training_batches(images, labels, config, epoch)])


def test_every_epoch_visits_every_image_once_in_a_fresh_order():
    from numpylenet.recipes import make_config

    config = make_config("speedrun", augment=False, normalize=False, batch_size=7, seed=3)
    images = indexed_images(50)
    orders = [epoch_order(config, images, epoch) for epoch in range(4)]
    assert all(sorted(order) == list(range(50)) for order in orders)   # short last batch included
    # Four draws of one permutation of 50 items would be a 1-in-(50!)^3 event.
    assert len({tuple(order) for order in orders}) == 4
    np.testing.assert_array_equal(epoch_order(config, images, 2), orders[2])   # and reproducible


def test_augmentation_is_drawn_afresh_each_epoch_at_the_same_step():
    # One image, batches of one: every epoch's step 0 shows it; its random shift (a crop of the
    # image padded by 4) must change from epoch to epoch, or the run sees one fixed distortion.
    from numpylenet.pipeline import training_batches
    from numpylenet.recipes import make_config

    config = make_config("speedrun", augment=True, augmentation="shift", normalize=False, batch_size=1, seed=0)
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 10:18, 10:18] = 255
    shifted = [next(training_batches(image, np.zeros(1, np.int64), config, epoch))[1]
               for epoch in range(8)]
    # 25 possible offsets: eight epochs all alike would be a (1/25)^7 event.
    assert len({x.tobytes() for x in shifted}) > 1


def test_evaluation_batches_hold_every_image_once_in_order():
    from numpylenet.pipeline import EVAL_BATCH_SIZE, evaluation_batches
    from numpylenet.recipes import make_config

    count = 2 * EVAL_BATCH_SIZE + 37
    batches = list(evaluation_batches(indexed_images(count), np.arange(count), make_config("speedrun", normalize=False),
                                      rng=None))
    assert [len(y) for _, y in batches] == [EVAL_BATCH_SIZE, EVAL_BATCH_SIZE, 37]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(count))
    centres = np.concatenate([x[:, 0, 16, 16] for x, _ in batches])        # pixel value / 255
    np.testing.assert_allclose(centres * 255, np.arange(count) % 256, atol=1e-3)


def test_notebook_train_transform(digits):
    """T.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor()]) for fixed choices."""
    F = torchvision_functional()
    from PIL import Image
    rng = np.random.default_rng(4)
    tops, lefts = rng.integers(0, 5, len(digits)), rng.integers(0, 5, len(digits))
    flips = rng.random(len(digits)) < 0.5

    def notebook(image, n):
        img = F.crop(F.pad(Image.fromarray(image, mode="L"), 4), tops[n], lefts[n], 32, 32)
        return F.to_tensor(F.hflip(img) if flips[n] else img).numpy()

    expected = np.stack([notebook(image, n) for n, image in enumerate(digits)])
    ours = data.to_float(data.flip_where(data.crop(digits, 32, 4, tops, lefts), flips))
    np.testing.assert_array_equal(ours, expected)


def offsets_found(F, images, output, size, padding):
    """For each output image, the one (top, left) at which torchvision's pad + crop reproduces it."""
    height, width = (size, size) if isinstance(size, int) else size
    found = []
    for image, result in zip(images, output):
        from PIL import Image
        padded = F.pad(Image.fromarray(image, mode="L"), padding)
        offsets = [(top, left) for top in range(padded.height - height + 1)
                   for left in range(padded.width - width + 1)]
        matches = [(top, left) for top, left in offsets
                   if np.array_equal(np.asarray(F.crop(padded, top, left, height, width)), result)]
        assert len(matches) == 1
        found.append(matches[0])
    return found


def test_random_crop_semantics(digits):
    """Each output is torchvision's pad + crop at one offset, and the offsets cover exactly the
    range T.RandomCrop.get_params draws from."""
    F = torchvision_functional()
    from torchvision import transforms as T
    noise = np.repeat(digits[64:], 8, axis=0)  # 512 images, all pixels non-zero
    output = data.random_crop(noise, 32, 4, np.random.default_rng(6))
    observed = set(offsets_found(F, noise, output, 32, 4))
    padded = F.pad(F.to_pil_image(noise[0]), 4)
    torchvision_range = {T.RandomCrop.get_params(padded, (32, 32))[:2] for _ in range(2000)}
    assert observed == torchvision_range == {(top, left) for top in range(5) for left in range(5)}


def test_random_translate_semantics(digits):
    F = torchvision_functional()
    noise = np.repeat(digits[64:], 4, axis=0)[:, :, :20]  # non-square
    output = data.random_translate(noise, 2, np.random.default_rng(7))
    assert output.shape == noise.shape
    every_offset = {(top, left) for top in range(5) for left in range(5)}
    assert set(offsets_found(F, noise, output, (28, 20), 2)) == every_offset


def test_random_horizontal_flip_semantics(digits):
    noise = np.repeat(digits[64:], 16, axis=0)  # 1024 images, none symmetric
    rng = np.random.default_rng(8)
    for p, low, high in ((0.0, 0, 0), (1.0, 1024, 1024), (0.5, 512 - 64, 512 + 64), (0.2, 205 - 52, 205 + 52)):
        output = data.random_horizontal_flip(noise, p, rng)
        flipped = np.array([np.array_equal(out, image[:, ::-1]) for out, image in zip(output, noise)])
        kept = np.array([np.array_equal(out, image) for out, image in zip(output, noise)])
        assert np.all(flipped ^ kept) and low <= flipped.sum() <= high  # within 4 standard deviations


def test_transform_identities_without_torch(digits):
    rng = np.random.default_rng(9)
    tops = np.full(len(digits), 4)
    np.testing.assert_array_equal(data.crop(digits, 28, 4, tops, tops), digits)
    np.testing.assert_array_equal(data.random_translate(digits, 0, rng), digits)
    np.testing.assert_array_equal(data.flip_where(data.flip_where(digits, tops > 0), tops > 0), digits)
    np.testing.assert_array_equal(data.pad_to(digits, 28), digits)
    assert data.random_crop(digits, rng=rng).shape == (len(digits), 32, 32)
    assert data.random_crop(digits, 32, 4, rng).dtype == np.uint8


def test_the_pipeline_transform_refuses_images_that_are_not_uint8(digits):
    """A float batch would be scaled by 1/255 a second time; say so instead of a casting error."""
    from numpylenet.pipeline import transform
    from numpylenet.recipes import make_config

    for recipe in ("seed", "default"):  # a crop-and-lookup recipe, an affine one
        with pytest.raises(ValueError, match="uint8"):
            transform(digits / 255, make_config(recipe), train=True, rng=np.random.default_rng(0))


def test_transforms_reject_bad_input(digits):
    tops = np.zeros(len(digits), np.int64)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        data.random_crop(digits[0])
    with pytest.raises(ValueError, match="larger than the padded image"):
        data.crop(digits, 40, 4, tops, tops)
    with pytest.raises(ValueError, match="larger than the padded image"):
        data.random_crop(digits, 32, 1)
    with pytest.raises(ValueError, match="0 <= top <= 4"):
        data.crop(digits, 32, 4, tops + 5, tops)
    with pytest.raises(ValueError, match="one top and one left offset per image"):
        data.crop(digits, 32, 4, tops[:3], tops)
    with pytest.raises(ValueError, match="integers"):
        data.crop(digits, 32, 4, tops.astype(float), tops)
    with pytest.raises(ValueError, match="one flip choice per image"):
        data.flip_where(digits, [True])
    with pytest.raises(ValueError, match="cannot shrink"):
        data.pad_to(digits, 20)
    with pytest.raises(ValueError, match="uint8"):
        data.to_float(digits.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        data.normalize(digits.astype(np.float32), 0.5, 0.5)
