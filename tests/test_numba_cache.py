"""numpylenet.numba_cache: Numba's disk cache, filled by several processes at once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A kernel in a file of its own (Numba caches only functions with a source file), with the safe
# cache and, for the control, with Numba's own.
TOY = """
from numba import njit
from numpylenet.numba_cache import safe_cache

@safe_cache
@njit(cache=True)
def double(x):
    return x * 2

@njit(cache=True)
def plain_double(x):
    return x * 2
"""


@pytest.fixture
def toy(tmp_path):
    """(run, cache folder): ``run(program)`` runs Python code in a fresh process that can import
    the toy module, with its own Numba cache."""
    (tmp_path / "toy.py").write_text(TOY)
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
                   "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}

    def run(program: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
        command = [sys.executable, "-c", "import numpy as np\nimport toy\n" + program]
        if popen:
            return subprocess.Popen(command, cwd=tmp_path, env=environment, text=True, **popen)
        return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)

    return run, tmp_path / "cache"


def swap_data_files(cache: Path, kernel: str) -> None:
    """Damage the cache as two processes saving at once do: each signature's index entry now
    names the other signature's machine code."""
    first, second = sorted(cache.rglob(f"toy.{kernel}-*.nbc"))
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)


def test_an_entry_holding_another_signatures_code_is_compiled_anew(toy):
    run, cache = toy
    compiled = run("toy.double(np.ones(3, np.float32)); toy.double(np.ones(3))\n"
                   "toy.plain_double(np.ones(3, np.float32)); toy.plain_double(np.ones(3))")
    assert compiled.returncode == 0, compiled.stderr
    swap_data_files(cache, "double")
    swap_data_files(cache, "plain_double")
    # The control: with Numba's own cache the damaged entry is loaded, and the call fails.
    plain = run("toy.plain_double(np.ones(3, np.float32))")
    assert plain.returncode != 0 and "can't unbox array" in plain.stderr
    healed = run("assert toy.double(np.ones(3, np.float32)).tolist() == [2, 2, 2]\n"
                 "assert toy.double(np.ones(3, np.float32)).dtype == np.float32\n"
                 "assert sum(toy.double.stats.cache_misses.values()) == 1, toy.double.stats\n")
    assert healed.returncode == 0, healed.stderr
    loaded = run("assert toy.double(np.ones(3, np.float32)).tolist() == [2, 2, 2]\n"
                 "assert sum(toy.double.stats.cache_hits.values()) == 1, toy.double.stats\n")
    assert loaded.returncode == 0, loaded.stderr


def test_has_index_says_whether_anything_of_the_kernel_is_cached(toy):
    run, cache = toy
    program = ("assert toy.double._cache.has_index() is {}\n"
               "toy.double(np.ones(3))\n"
               "assert toy.double._cache.has_index()\n")
    first = run(program.format(False))
    assert first.returncode == 0, first.stderr
    assert list(cache.rglob("toy.double-*.nbi"))
    again = run(program.format(True))
    assert again.returncode == 0, again.stderr


def test_adding_an_entry_waits_for_the_index_lock(toy):
    """While another process holds the index's lock, a compile cannot save its entry: it returns
    only after the lock is released, and both entries are then in the index."""
    fcntl = pytest.importorskip("fcntl")        # POSIX: elsewhere the cache goes unlocked
    run, cache = toy
    first = run("toy.double(np.ones(3, np.float32))")
    assert first.returncode == 0, first.stderr
    (lock_path,) = cache.rglob("toy.double-*.nbi.lock")
    held_seconds = 2.0
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        child = run("import sys, time\n"
                    "print('calling', flush=True)\n"
                    "started = time.perf_counter()\n"
                    "toy.double(np.ones(3))\n"
                    "print(time.perf_counter() - started, flush=True)\n",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert child.stdout.readline().strip() == "calling"
        time.sleep(held_seconds)
        assert child.poll() is None, "the compile finished while the index was locked"
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert float(out.strip()) >= held_seconds * 0.9
    both = run("assert toy.double(np.ones(3, np.float32)).dtype == np.float32\n"
               "assert toy.double(np.ones(3)).dtype == np.float64\n"
               "assert sum(toy.double.stats.cache_hits.values()) == 2, toy.double.stats\n")
    assert both.returncode == 0, both.stderr


def test_every_cached_kernel_has_the_safe_cache():
    from numba.core.registry import CPUDispatcher

    from numpylenet import augment_kernels, kernels
    from numpylenet.numba_cache import SafeFunctionCache

    dispatchers = [value for module in (kernels, augment_kernels) for value in vars(module).values()
                   if isinstance(value, CPUDispatcher)]
    assert len(dispatchers) > 30
    assert [d.py_func.__name__ for d in dispatchers if not isinstance(d._cache, SafeFunctionCache)] == []


def test_safe_cache_leaves_a_plain_function_alone():
    from numpylenet.numba_cache import safe_cache

    def plain(x):               # what njit returns under NUMBA_DISABLE_JIT=1
        return x

    assert safe_cache(plain) is plain


def test_with_numba_disable_jit_the_numba_backend_says_it_is_unavailable():
    """Under NUMBA_DISABLE_JIT=1 the kernels are plain Python functions, which the engine cannot
    run: models default to numpy, and asking for numba is a clear error, not an AttributeError."""
    program = ("import numpy as np, pytest\n"
               "from numpylenet import LeNet5\n"
               "from numpylenet.backend import numba_unavailable_reason, resolve_backend\n"
               "assert 'NUMBA_DISABLE_JIT' in numba_unavailable_reason()\n"
               "assert resolve_backend() == 'numpy'\n"
               "assert LeNet5().forward(np.zeros((1, 1, 32, 32))).shape == (1, 10)\n"
               "with pytest.raises(ValueError, match='numba backend is unavailable: NUMBA_DISABLE_JIT'):\n"
               "    LeNet5(backend='numba')\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "NUMBA_DISABLE_JIT": "1", "NUMPYLENET_BACKEND": ""})
    assert result.returncode == 0, result.stderr
