"""The Numba engine: what ``LeNet5(backend="numba")`` runs, on the kernels of :mod:`numpylenet.kernels`.

* :class:`NumbaLeNet5` runs a model's forward and backward passes as fused per-thread passes
  (:func:`~numpylenet.kernels.forward_images`, :func:`~numpylenet.kernels.loss_images`,
  :func:`~numpylenet.kernels.backward_images`, :func:`~numpylenet.kernels.weight_grads`), in
  programs (:data:`PROGRAMS`) that the one parallel kernel :func:`~numpylenet.kernels.on_threads`
  runs on every thread, reading the weights from the model's flat buffer and
  adding the gradients into its flat gradient (see :meth:`numpylenet.LeNet5.flat_buffers`), in a
  :class:`~numpylenet.kernels.Workspace` built once per batch size;
* :func:`fused_adam_step` and :func:`fused_sgd_step` are :class:`numpylenet.Adam`'s and
  :class:`numpylenet.SGD`'s steps over that whole buffer in one loop (the optimisers call them
  when they were given exactly one such model's parameters);
* :func:`warmup` compiles (or loads from Numba's disk cache) every kernel, without a model.

Threads: importing this module starts none. Numba's thread pool is started by
:func:`start_thread_pool` when the first engine is built (or when
:func:`numpylenet.backend.set_threads` sets the thread count), so that it starts with the wait
policy chosen there, not with libgomp's default.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import numba
import numpy as np
from numba.core.caching import NullCache

from . import kernels
from .blas import blas_threads, set_blas_threads
from .names import DTYPE_NAMES, OPTIMIZER_NAMES
from .numba_cache import SafeFunctionCache

__all__ = ["NumbaLeNet5", "start_thread_pool", "set_kernel_threads", "kernel_threads", "fused_adam_step",
           "fused_sgd_step", "warmup"]


def start_thread_pool() -> None:
    """Start Numba's OpenMP thread pool with idle threads spinning about 1 ms before they sleep.

    A thread that runs out of work either spins, ready to start the next parallel region at
    once, or sleeps and must be woken by the kernel. Measured on this 2-core VM: waking a
    sleeping thread costs ~110 us per region (OMP_WAIT_POLICY=PASSIVE), four times per training
    step, and a 2-epoch run trained at 11,400 img/s; spinning for 100,000 rounds (libgomp's
    estimate: 1 ms) it ran at 13,300 img/s, the next region usually arriving within that time.
    libgomp's default, 3 ms, and the active policy, 5 minutes, are worse on a shared machine:
    the spinning steals the core that another process or our last working thread needs.
    libgomp reads ``GOMP_SPINCOUNT`` when it loads, so it is set only around starting Numba's
    pool and reaches no other library (torch bundles its own libgomp). A user's own
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is left to take effect instead. Once the pool runs
    (whoever started it) this does nothing.
    """
    import numba.np.ufunc.parallel as numba_parallel

    if numba_parallel._is_initialized:
        return
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        numba_parallel._launch_threads()
        return
    os.environ["GOMP_SPINCOUNT"] = "100000"
    try:
        numba_parallel._launch_threads()
    finally:
        del os.environ["GOMP_SPINCOUNT"]


# The Numba threads set_kernel_threads chose for the whole process (None: it was not called).
_KERNEL_THREADS: int | None = None


def set_kernel_threads(count: int) -> None:
    """Run the fused kernels on ``count`` Numba threads, from every Python thread (what
    :func:`numpylenet.backend.set_threads` calls): Numba's own ``set_num_threads`` holds for the
    calling Python thread only. ``count`` <= Numba's ``NUMBA_NUM_THREADS``."""
    global _KERNEL_THREADS
    start_thread_pool()       # before numba.set_num_threads, which would start it with defaults
    numba.set_num_threads(count)
    _KERNEL_THREADS = count


def kernel_threads() -> int:
    """The Numba threads a fused kernel runs on: :func:`set_kernel_threads`' count, whichever
    Python thread set it; else Numba's count for the calling thread (by default every thread
    Numba launched), at most the cores available (Numba's default count, which it takes from this
    process's CPU affinity). Uncapped, a ``NUMBA_NUM_THREADS=1000`` on two cores trained 17x
    slower (1,500 img/s against 26,000): the threads only wait for one another, as
    :func:`numpylenet.backend.set_threads` says of ``--threads``."""
    if _KERNEL_THREADS is not None:
        return _KERNEL_THREADS
    return min(numba.get_num_threads(), numba.config.NUMBA_DEFAULT_NUM_THREADS)


@contextmanager
def _kernel_threads(count: int):
    """Run a fused kernel on ``count`` Numba threads, with BLAS on one thread.

    BLAS runs single-threaded because the kernels parallelise over images themselves: a
    multi-threaded BLAS called from two threads at once would fight them for the cores. And a
    batch too small to split runs on one Numba thread, so no idle thread has to be woken (on a
    busy machine waking it can cost milliseconds).
    """
    previous_blas, previous_numba = blas_threads(), numba.get_num_threads()
    if previous_blas is not None and previous_blas != 1:
        set_blas_threads(1)
    if count != previous_numba:
        numba.set_num_threads(count)
    try:
        yield
    finally:
        if count != previous_numba:
            numba.set_num_threads(previous_numba)
        if previous_blas is not None and previous_blas != 1:
            set_blas_threads(previous_blas)


class NumbaLeNet5:
    """LeNet-5's forward and backward passes on the fused kernels, over flat parameter buffers.

    Reads the weights from ``flat_data`` and adds the gradients into ``flat_grad``, both
    (NUM_PARAMETERS,) in :data:`~numpylenet.kernels.PARAMETER_SHAPES`' order, so everything else
    about the model (its parameters, state_dict, the optimisers) stays as it is. Inputs are
    checked by :class:`numpylenet.LeNet5` before they get here.

    Parameters
    ----------
    flat_data, flat_grad : ndarray, shape (NUM_PARAMETERS,), one float dtype, C-contiguous.
    activation, pool : names from :mod:`numpylenet.names`.
    """

    def __init__(self, flat_data: np.ndarray, flat_grad: np.ndarray, activation: str = "relu",
                 pool: str = "avg"):
        expected = (kernels.NUM_PARAMETERS,)
        if (flat_data.shape != expected or flat_grad.shape != expected or flat_grad.dtype != flat_data.dtype
                or not (flat_data.flags.c_contiguous and flat_grad.flags.c_contiguous)):
            raise ValueError(f"the numba engine needs flat parameter and gradient buffers of shape "
                             f"{expected} and one dtype, got {flat_data.shape} {flat_data.dtype} and "
                             f"{flat_grad.shape} {flat_grad.dtype}")
        start_thread_pool()
        self.flat_data, self.flat_grad = flat_data, flat_grad
        self.codes = kernels.Codes(kernels.ACTIVATION_CODES[activation], kernels.POOL_CODES[pool])
        self.work: kernels.Workspace | None = None
        self.threads = 0
        self._addresses: dict[str, kernels.KernelAddress] = {}
        self._programs: dict[str, tuple[np.ndarray, bool]] = {}    # PROGRAMS, with addresses
        # One workspace, so one call at a time: two Python threads calling this model at once
        # would overwrite each other's inputs and activations in it.
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model) -> NumbaLeNet5:
        """The engine of ``model`` (a :class:`numpylenet.LeNet5`), whose parameters must be
        LeNet-5's: the kernels are written for exactly those shapes."""
        shapes = tuple((name, p.data.shape) for name, p in model.named_parameters())
        if shapes != kernels.PARAMETER_SHAPES:
            raise ValueError(f"the numba kernels are written for LeNet-5's parameters "
                             f"{kernels.PARAMETER_SHAPES}, got {shapes}")
        return cls(*model.flat_buffers(), model.activation, model.pool)

    def _workspace(self, batch_size: int) -> kernels.Workspace:
        """The workspace for ``batch_size`` images, split over as many threads as it has
        sub-batches (at most Numba's thread count); rebuilt only when that changes."""
        threads = max(1, min(kernel_threads(), batch_size // kernels.SUB_BATCH))
        if self.work is None or (self.work.x.shape[0], self.threads) != (batch_size, threads):
            self.work = kernels.make_workspace(batch_size, threads, self.flat_data.dtype)
            self.threads = threads
        return self.work

    def per_thread_args(self) -> tuple:
        """Example arguments of a per-thread pass (their types are all that matter: the passes
        share one signature)."""
        return (self.flat_data, self.flat_grad, self.codes, self.work, 0, 0, 1, True)

    def per_thread(self, name: str) -> kernels.KernelAddress:
        """The per-thread pass ``name`` (a key of :data:`PER_THREAD_PASSES`) that
        :func:`~numpylenet.kernels.on_threads` runs, compiled (or loaded from the cache) on first
        use. Needs a workspace (any batch size: the types are the same)."""
        if name not in self._addresses:
            self._addresses[name] = kernels.KernelAddress(PER_THREAD_PASSES[name], self.per_thread_args())
        return self._addresses[name]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, 10) for x (N, 1, 32, 32), a floating-point array of any float dtype."""
        with self._lock:
            work = self._workspace(x.shape[0])
            np.copyto(work.x, x)        # the backward pass reads this copy: the caller may reuse x
            with _kernel_threads(self.threads):
                self._run("forward", work, False)
            return work.logits.copy()

    def backward(self, grad_logits: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Add dL/dW into ``flat_grad``; return dL/dx (N, 1, 32, 32) if ``input_grad``.

        grad_logits : (N, 10), floating-point, N as in the last :meth:`forward`.
        """
        with self._lock:
            work = self.work
            np.copyto(work.grad_logits, grad_logits)
            self._backward_regions("backward", work, bool(input_grad))
            return work.grad_x.copy() if input_grad else None

    def forward_backward(self, x: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0) -> float:
        """A training step's passes, allocating nothing: the forward pass, the loss
        (:func:`~numpylenet.kernels.loss_images`, into ``work.grad_logits``) and the backward pass
        without dL/dx, sub-batch by sub-batch, then the weight gradients. Adds dL/dW into
        ``flat_grad``; returns the loss (the mean over the batch).

        x : (N, 1, 32, 32), floating-point;  labels : (N,), integers in [0, 10) (checked by
        :meth:`numpylenet.LeNet5.forward_backward`; a label outside makes the loss NaN).
        """
        with self._lock:
            work = self._workspace(x.shape[0])
            np.copyto(work.x, x)
            np.copyto(work.labels, labels)
            work.label_smoothing[0] = label_smoothing
            work.losses.fill(0)
            self._backward_regions("train", work, False)
            return float(work.losses.sum()) / x.shape[0]

    def _backward_regions(self, program: str, work: kernels.Workspace, input_grad: bool) -> None:
        """``program`` (one that ends with the backward pass) into the threads' zeroed conv
        gradients, then the weight gradients, which need every thread's backward pass done."""
        work.conv_grads.fill(0)
        with _kernel_threads(self.threads):
            self._run(program, work, input_grad)
            self._run("weight_grads", work, False)

    def _run(self, program: str, work: kernels.Workspace, input_grad: bool) -> None:
        """Run ``PROGRAMS[program]`` with :func:`~numpylenet.kernels.on_threads`."""
        if program not in self._programs:
            names, by_sub_batch = PROGRAMS[program]
            addresses = np.array([self.per_thread(name).address for name in names], np.uint64)
            self._programs[program] = (addresses, by_sub_batch)
        addresses, by_sub_batch = self._programs[program]
        kernels.on_threads(addresses, self.flat_data, self.flat_grad, self.codes, work, input_grad,
                           by_sub_batch)

    @classmethod
    def compile(cls, dtype, optimizer: str | None = None, helper_process: bool = True,
                affine_augmentation: bool = False) -> None:
        """Run every kernel a run uses once, on a tiny batch and zero weights, so that Numba
        compiles them (or loads them from its on-disk cache) for ``dtype``: every per-thread pass
        (forward, loss, backward with and without dL/dx, weight gradients), the parallel kernel
        that runs them, and the fused step of ``optimizer`` ("adam" or "sgd"; None: both).
        One compilation serves every activation and pooling (the kernels take them as run-time
        codes), and every batch size, so the first training step compiles nothing more.

        Compiling is what a fresh machine waits for (:data:`numpylenet.backend.COMPILE_SECONDS`).
        Numba compiles on one core, so when the backward pass is not in the cache yet (and
        ``helper_process``), a helper process compiles it and the weight-gradient pass into the
        cache while this one compiles the rest, and this one then loads them: on two cores ~7 s
        instead of ~13 s one after the other.
        Pass ``helper_process=False`` when other processes are compiling at the same time anyway.
        ``affine_augmentation`` also compiles the kernel of :func:`numpylenet.augment.warp_bilinear`
        for ``dtype`` (a run with affine augmentation meets it at its first batch), here, while
        the helper is still at work: with it, the two halves take about as long.
        """
        try:
            known = np.dtype(dtype) in [np.dtype(name) for name in DTYPE_NAMES]    # native byte order too
        except TypeError:                                                      # not a dtype at all
            known = False
        if not known:
            raise ValueError(f"the numba kernels run {' or '.join(DTYPE_NAMES)}, got {dtype!r}")
        dtype = np.dtype(dtype)
        if optimizer not in (None, *OPTIMIZER_NAMES):
            raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES} or None, got {optimizer!r}")
        engine = _CompileRun(dtype)
        helper = None
        if helper_process and engine.backward_wants_compiling_into_the_cache():
            helper = _start_helper(dtype)
        try:
            engine.forward(optimizer)
            if affine_augmentation:
                engine.affine_augmentation()
        finally:
            if helper is not None:
                helper.wait()
        engine.backward()


def _start_helper(dtype: np.dtype) -> subprocess.Popen | None:
    """Start the process that compiles the backward and weight-gradient passes into Numba's cache,
    or None if it cannot start. Its output is dropped: should it fail,
    :meth:`NumbaLeNet5.compile` compiles the kernels itself and reports any error. It runs in a
    session of its own, so that a Ctrl-C at the terminal, which the CLI holds until the compile is
    done (:func:`numpylenet.cli.build_with_cache_recovery`), does not kill it halfway."""
    # The helper imports this very package, wherever (and under whatever name) it was imported here.
    package_folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    program = (f"import sys\nsys.path.insert(0, {package_folder!r})\n"
               f"from {__name__} import _CompileRun\n"
               f"run = _CompileRun({dtype.name!r})\n"
               "run.engine.per_thread('backward')\n"
               "run.engine.per_thread('weight_grads')\n")
    try:
        return subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None


# The per-thread passes that kernels.on_threads runs, by name.
PER_THREAD_PASSES = {"forward": kernels.forward_images, "loss": kernels.loss_images,
                     "backward": kernels.backward_images, "weight_grads": kernels.weight_grads}
# What NumbaLeNet5 runs with kernels.on_threads: name -> (its passes, by sub-batch?)
PROGRAMS = {"forward": (("forward",), False),
            "train": (("forward", "loss", "backward"), True),
            "backward": (("backward",), False),
            "weight_grads": (("weight_grads",), False)}


class _CompileRun:
    """An engine on zero weights and a batch of two zero images, for :meth:`NumbaLeNet5.compile`,
    whose two halves (what the forward pass, the loss and the optimisers need; the backward and
    weight-gradient passes) can run in separate processes."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.engine = NumbaLeNet5(np.zeros(kernels.NUM_PARAMETERS, self.dtype),
                                  np.zeros(kernels.NUM_PARAMETERS, self.dtype))
        self.images = np.zeros((2, 1, kernels.INPUT_SIZE, kernels.INPUT_SIZE), self.dtype)
        self.engine._workspace(len(self.images))
        # backward_images' signature (every per-thread pass's), and its cache key
        self.backward_signature = kernels.KernelAddress.signature_of(self.engine.per_thread_args())

    def backward_wants_compiling_into_the_cache(self) -> bool:
        """Whether Numba caches kernels on disk here and its cache does not hold the backward
        pass's per-thread kernel for this dtype and CPU yet: no index file for it at all, or
        else the look-up, by the dispatcher's cache object, that Numba itself starts compiling
        with."""
        cache = kernels.backward_images._cache
        if isinstance(cache, NullCache):    # caching off: a helper's work would not reach us
            return False
        if isinstance(cache, SafeFunctionCache) and not cache.has_index():
            return True                     # nothing cached: the helper can start 0.4 s sooner
        return cache.load_overload(self.backward_signature, kernels.backward_images.targetctx) is None

    def affine_augmentation(self) -> None:
        """The resampling kernel of :func:`numpylenet.augment.warp_bilinear`, for this dtype."""
        from .augment import warp_bilinear

        warp_bilinear(np.zeros((1, 2, 2), self.dtype), np.eye(2, 3)[np.newaxis])

    def forward(self, optimizer: str | None) -> None:
        """The loss pass, ``optimizer``'s step (None: both optimisers), the parallel kernel and,
        last, the forward pass.

        In that order because the parallel kernel and the forward pass call small kernels that
        the backward pass calls too (the parameters' views, conv2's reordered weight, im2col):
        by the time they compile, the helper process, which compiles the backward pass, has put
        those in the cache, and they load instead of compiling a second time (the forward pass
        compiled in 2.7 s instead of 3.6 s here)."""
        engine, data, grad = self.engine, self.engine.flat_data, self.engine.flat_grad
        engine.per_thread("loss")
        state = np.zeros((2, kernels.NUM_PARAMETERS), self.dtype)
        if optimizer in (None, "adam"):
            fused_adam_step(data, grad, state[0], state[1], (1e-3, 1.0, 0.9, 0.999, 1e-8, 0.0))
        if optimizer in (None, "sgd"):
            fused_sgd_step(data, grad, state[0], (0.1, 0.9, 0.0, 0.0, False), first_step=True)
        no_passes = np.zeros(0, np.uint64)
        kernels.on_threads(no_passes, data, grad, engine.codes, engine.work, False, False)
        engine.forward(self.images)

    def backward(self) -> None:
        """A training step's passes (the backward pass's one kernel serves it with and without dL/dx)."""
        self.engine.forward_backward(self.images, np.zeros(len(self.images), np.int64))


def fused_adam_step(data: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                    step: Sequence[float]) -> None:
    """:meth:`numpylenet.Adam.step` over whole flat buffers in one parallel loop (the same result).

    data, grad, exp_avg, exp_avg_sq : (P,), one dtype;  step : the step's six numbers, a
    :class:`numpylenet.optim.AdamStep` (computed there, as for the NumPy loop)."""
    kernels.adam_step(data, grad, exp_avg, exp_avg_sq, tuple(float(value) for value in step))


def fused_sgd_step(data: np.ndarray, grad: np.ndarray, momentum_buffer: np.ndarray,
                   settings: Sequence, first_step: bool) -> None:
    """:meth:`numpylenet.SGD.step` over whole flat buffers in one parallel loop (the same result).

    momentum_buffer : (P,), or empty without momentum;  settings : a
    :class:`numpylenet.optim.SGDSettings`;  first_step : the momentum buffer is still empty."""
    lr, momentum, dampening, weight_decay, nesterov = settings
    kernels.sgd_step(data, grad, momentum_buffer,
                     (float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov)),
                     bool(first_step))


def warmup(dtypes: Iterable = DTYPE_NAMES, helper_process: bool = True) -> float:
    """Compile (or load from the on-disk cache) every kernel for each dtype (by default float32
    and float64; ``helper_process`` as in :meth:`NumbaLeNet5.compile`); return the seconds it
    took: about seven seconds a dtype the first time, well under a second once Numba's cache holds
    them."""
    if isinstance(dtypes, (str, type, np.dtype)):     # one dtype, not the characters of one name
        dtypes = [dtypes]
    start = time.perf_counter()
    for dtype in dtypes:
        NumbaLeNet5.compile(dtype, helper_process=helper_process)
    return time.perf_counter() - start
