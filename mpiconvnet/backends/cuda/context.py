"""The CUDA backend's per-process state: device, context, stream, memory pool, cuBLAS and
cuDNN handles, compiled kernels.

Importing this module touches no GPU (pycuda is imported inside `initialize`), so the
trainer can import the backend, compute the local rank, and call `initialize` before MPI
does anything with CUDA. Every op goes through `get()`, which initialises with local rank
0 of 1 when nobody called `initialize` (tests, benchmarks, one-process runs).

All work is queued on one stream, but for the next batch's copy to the device, which goes
on a second one (augment.py); pycuda's own synchronous copies use the legacy default
stream, which waits for our (blocking) streams, so mixing them is safe.
"""
import atexit
import contextlib
import ctypes
import os
import signal
import threading

import numpy as np

from . import device as device_policy
from . import cudnn_graph, libs, mpi_cuda

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
# fat binaries from `python -m mpiconvnet.backends.cuda.prebuild`, for nodes without nvcc
PREBUILT_DIR = os.path.join(KERNEL_DIR, "prebuilt")

# kernel name -> (file, PyCUDA prepared-call argument types). 'F' stands for the float
# type of the variant (f for _f32, d for _f64); P pointer, q int64, i int32, I uint32.
KERNELS = {
    "bias_add_rows": ("bias.cu", "PPqi"),
    "bias_add_channels": ("bias.cu", "PPqii"),
    "sum_rows": ("bias.cu", "PPii"),
    "sum_cols": ("bias.cu", "PPii"),
    "dropout_forward": ("dropout.cu", "PPPqqIIIIF"),
    "dropout_apply": ("dropout.cu", "PPPqF"),
    "sgd_momentum": ("sgd.cu", "PPPqFFF"),
    "sgd_momentum_many": ("sgd.cu", "3088s"),   # one SgdTable by value (update.TABLE)
    "scale": ("sgd.cu", "PqF"),
    "softmax_xent": ("loss.cu", "PPPPiiF"),
    "label_rank": ("loss.cu", "PPPii"),
    "relu_forward": ("relu.cu", "PPq"),
    "relu_backward": ("relu.cu", "PPPq"),
    "maxpool_forward": ("pool.cu", "PPPqiiiiii"),
    "maxpool_first_max": ("pool.cu", "PPqiiiiii"),
    "maxpool_backward": ("pool.cu", "PPPqiiiiii"),
    "lrn_forward": ("lrn.cu", "PPqiqiFFF"),
    "lrn_backward": ("lrn.cu", "PPPPqiqiFFF"),
    "crop_flip_normalize": ("augment.cu", "PPPPPPPPPqii"),
}
FLOAT32_ONLY = {"crop_flip_normalize"}

# --fmad=false: no fused multiply-adds, so elementwise kernels round exactly like the NumPy
# reference (dropout and the SGD update then agree bit for bit); the kernels are
# memory-bound, FMA would gain nothing
NVCC_OPTIONS = ["--fmad=false"]
THREADS = 256
BLOCK = (THREADS, 1, 1)
MAX_BLOCKS = 65535  # the kernels loop grid-stride, so capping the grid changes nothing


def _switch_from_env(name, off, on, environ):
    """A 0 / 1 setting (default 0); anything else is an error naming both values."""
    environ = os.environ if environ is None else environ
    value = environ.get(name, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{name}={value!r}: use 0 ({off}, the default) or 1 ({on})")
    return value == "1"


def tf32_from_env(environ=None):
    """TF32 is off unless MPICONVNET_TF32=1 (float32 results then match the reference)."""
    return _switch_from_env("MPICONVNET_TF32", "true float32", "TF32 tensor cores", environ)


def workspace_limit_from_env(environ=None):
    environ = os.environ if environ is None else environ
    value = environ.get("MPICONVNET_CUDNN_WORKSPACE_MB", "1024")
    try:
        mb = int(value)
    except ValueError:
        raise ValueError(f"MPICONVNET_CUDNN_WORKSPACE_MB={value!r}: expected a whole number of MiB") from None
    return mb << 20


def deterministic_from_env(environ=None):
    """Only deterministic convolution algorithms when MPICONVNET_DETERMINISTIC=1: the same
    inputs then give the same gradients bit for bit, run after run (our kernels use no
    atomics; cuDNN's fastest backward algorithms may, and do not promise that)."""
    return _switch_from_env("MPICONVNET_DETERMINISTIC", "the fastest algorithms", "deterministic ones only", environ)


CUDNN_APIS = ("auto", "graph", "legacy")


def cudnn_api_from_env(environ=None):
    """Which cuDNN API runs the convolutions: auto (the default), graph (cudnn_graph.py) or
    legacy (conv.py's ConvPlan). auto is graph for float32 with TF32 and legacy otherwise, as
    measured on an H200 (2026-11-25, docs/benchmarks.md): with TF32 the graph API's engines
    are faster (alexnet-owt 6.24 against 6.73 ms a step) and each call costs the host less
    (batch 8: 2.64 against 3.88 ms); in true float32 its heuristics offered none of the
    Winograd and FFT algorithms cudnnFind* picks (alexnet 18.6 against 11.6 ms)."""
    environ = os.environ if environ is None else environ
    value = environ.get("MPICONVNET_CUDNN_API", "auto").strip() or "auto"
    if value not in CUDNN_APIS:
        raise ValueError(f"MPICONVNET_CUDNN_API={value!r}: use auto (the default), graph or legacy")
    return value


def launch_config(n, threads=THREADS):
    """(grid, block) for a grid-stride kernel over n items."""
    blocks = max(1, min((int(n) + threads - 1) // threads, MAX_BLOCKS))
    return (blocks, 1), (threads, 1, 1)


class Kernel:
    """A compiled kernel with its argument types, queued by `kernel(grid, block, stream, *args)`.

    Packs the arguments as PyCUDA's prepared_async_call does (its struct format from
    Function.prepare) and launches through the same cuLaunchKernel wrapper, without that
    call's per-launch extras we do not use (a deprecated cuFuncSetBlockShape, keyword and
    texture-reference handling): ~60 launches a step make that host time worth saving.
    A PyCUDA without the private `_launch_kernel` gets prepared_async_call.
    """
    __slots__ = ("name", "_launch", "_format", "_pack")

    def __init__(self, name, function, signature):
        function.prepare(signature)
        self.name = name
        self._format = function.arg_format
        if hasattr(function, "_launch_kernel"):
            from pycuda._pvt_struct import pack
            self._pack, self._launch = pack, function._launch_kernel
        else:
            self._pack, self._launch = None, function.prepared_async_call

    def __call__(self, grid, block, stream, *args):
        if self._pack is None:
            self._launch(grid, block, stream, *args)
        else:
            self._launch(grid, block, self._pack(self._format, *args), 0, stream)


class State:
    """Everything `initialize` creates; one per process."""

    def __init__(self, ordinal):
        import pycuda.driver as drv
        import pycuda.tools

        from . import cublas, cudnn

        # the settings first: a bad value is then an error before any context is pushed
        self.tf32 = tf32_from_env()
        self.workspace_limit = workspace_limit_from_env()
        self.find_algorithms = os.environ.get("MPICONVNET_CUDNN_FIND", "1") != "0"
        self.cudnn_api = cudnn_api_from_env()
        self.deterministic = deterministic_from_env()
        mpi_cuda.override_from_env()   # read later, and only with 2+ ranks: a typo is found here, on 1 rank too
        self.drv = drv
        self.ordinal = ordinal
        self.thread = threading.get_ident()   # the thread whose context stack holds our context
        self.device = drv.Device(ordinal)
        # the primary context is the one the CUDA runtime (cuBLAS, cuDNN, a CUDA-aware
        # MPI) uses for this device, so all of them share our allocations and stream
        self.context = self.device.retain_primary_context()
        self.context.push()
        try:
            self.stream = drv.Stream()
            self.pool = pycuda.tools.DeviceMemoryPool()
            self.blas = cublas.Handle(self.stream.handle, self.tf32)
            self.dnn = cudnn.Handle(self.stream.handle)
            self.cudnn_version = int(cudnn.lib().cudnnGetVersion())
        except BaseException:
            # a library that fails to load or a handle that fails to create is a one-line
            # error (exit 2); left on the stack, the context would turn that into PyCUDA's
            # abort at exit ("The context stack was not empty upon module cleanup")
            self.context.pop()
            raise
        self._copy_stream = None   # made on first use (augment.stage_batch)
        self.staging = None        # augment.py's staging areas, made on first use
        self.pool_high_water = 0   # memory.memory_high_water's largest pool size seen
        self.descriptors = {}    # cache of cuDNN descriptors by their arguments
        self.workspace = None    # one growing cuDNN workspace
        self._modules = {}
        self._kernels = {}       # (name, dtype as given) -> Kernel

    @property
    def copy_stream(self):
        """A second stream for host-to-device copies of the next batch, so that the GPU's
        copy engine moves it while the compute stream runs (augment.py orders the two)."""
        if self._copy_stream is None:
            self._copy_stream = self.drv.Stream()
        return self._copy_stream

    def event(self):
        """A new event without timing (cheaper to record and wait for)."""
        return self.drv.Event(self.drv.event_flags.DISABLE_TIMING)

    def workspace_ptr(self, nbytes):
        """A device scratch buffer of at least nbytes (0 -> a null pointer)."""
        if nbytes == 0:
            return 0
        if self.workspace is None or self.workspace.size < nbytes:
            # the old buffer may still be read by queued work: the pool hands it out again
            # only to later allocations, whose work is queued after it on the same stream
            from .memory import empty
            self.workspace = empty((int(nbytes),), np.uint8)
        return self.workspace.ptr

    def kernel(self, name, dtype):
        """The Kernel `name` for dtype (float32 / float64), compiled on first use."""
        key = (name, dtype)
        kernel = self._kernels.get(key)
        if kernel is None:
            dtype = np.dtype(dtype)
            filename, signature = KERNELS[name]
            if dtype.char not in "fd" or (name in FLOAT32_ONLY and dtype.char != "f"):
                raise TypeError(f"kernel {name} has no {dtype} variant")
            suffix = "_f32" if dtype.char == "f" else "_f64"
            function = self._module(filename).get_function(name + suffix)
            kernel = self._kernels[key] = Kernel(name + suffix, function, signature.replace("F", dtype.char))
        return kernel

    def _module(self, filename):
        if filename not in self._modules:
            self._modules[filename] = load_module(filename)
        return self._modules[filename]

    def launch(self, name, dtype, n, *args):
        """Queue kernel `name` over n items (grid-stride) on the backend stream."""
        grid, block = launch_config(n)
        self.kernel(name, dtype)(grid, block, self.stream, *args)

    def launch_grid(self, name, dtype, grid, *args):
        """Queue kernel `name` on a grid of its own (blocks of THREADS threads)."""
        self.kernel(name, dtype)(grid, BLOCK, self.stream, *args)

    def launch_warps(self, name, dtype, rows, *args):
        """Queue a one-warp-per-row kernel (loss.cu, sum_cols) over `rows` rows."""
        warps_per_block = THREADS // 32
        grid = ((int(rows) + warps_per_block - 1) // warps_per_block or 1, 1)
        self.kernel(name, dtype)(grid, BLOCK, self.stream, *args)

    def set_tf32(self, enabled):
        self.tf32 = bool(enabled)
        self.blas.set_tf32(self.tf32)
        # convolution descriptors carry their math type; algorithm choices depend on it.
        # Queued work may still use what is cleared (an execution plan's engine, the mean
        # image the crop kernel reads): let it finish first
        self.stream.synchronize()
        self.descriptors.clear()

    def set_deterministic(self, enabled):
        """Only deterministic convolution algorithms (True) or the fastest (False); the
        convolutions' choices are made again (their plans are keyed by it)."""
        self.deterministic = bool(enabled)

    def conv_api(self, dtype=np.float32):
        """The cuDNN API that runs convolutions of `dtype` now: graph or legacy (auto: graph
        for float32 with TF32, cudnn_api_from_env says why; float64 gains nothing from TF32)."""
        if self.cudnn_api != "auto":
            return self.cudnn_api
        return "graph" if self.tf32 and np.dtype(dtype).char == "f" else "legacy"

    def close(self):
        # pop (PyCUDA aborts at exit when a context is still on the stack) but do not
        # detach: arrays garbage-collected after this re-activate the primary context to
        # free themselves
        try:
            self.stream.synchronize()
            if self._copy_stream is not None:
                self._copy_stream.synchronize()
            self.descriptors.clear()   # cuDNN descriptors and plans go before their handle,
            cudnn_graph.destroy_all()  # also those something else still holds
            self.blas.destroy()
            self.dnn.destroy()
            self.pool.stop_holding()
            self.context.pop()
        except Exception:
            pass  # the driver may already be shutting down at interpreter exit


def import_driver():
    """pycuda.driver, initialised; a missing pycuda or driver is a one-line error."""
    try:
        import pycuda.driver as drv
    except ImportError as e:
        raise RuntimeError(f"--backend cuda needs pycuda ({e}): pip install pycuda on a node with the CUDA toolkit "
                           f"(scripts/gpu-check.sh does it), or use --backend numpy") from None
    try:
        drv.init()
    except Exception as e:
        raise RuntimeError(f"--backend cuda: the CUDA driver did not initialise ({e}); run on a GPU node "
                           f"(nvidia-smi must work) or use --backend numpy") from None
    return drv


@contextlib.contextmanager
def _stop_signals_held():
    """TERM, USR1 and INT held back from this thread, and from the nvcc it starts (a child
    inherits the mask), until the block ends. SLURM signals every process of a job step: an
    nvcc killed in the first step's compile would fail the run, where the signal, held until
    the compile is done, reaches the trainer's handler and stops it with a checkpoint."""
    held = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def load_module(filename):
    """The compiled kernels of kernels/<filename>: built by nvcc through PyCUDA when nvcc
    exists (cached by PyCUDA across runs), else loaded from kernels/prebuilt/."""
    from .prebuild import nvcc_path
    nvcc = nvcc_path()
    prebuilt = os.path.join(PREBUILT_DIR, filename[:-3] + ".fatbin")
    if nvcc is not None:
        from pycuda.compiler import DEFAULT_NVCC_FLAGS, SourceModule
        with open(os.path.join(KERNEL_DIR, filename)) as f:
            source = f.read()
        # no_extern_c: the files declare their own extern "C" entry points around C++
        # templates; the include dir makes `#include "common.cuh"` resolve
        with _stop_signals_held():
            return SourceModule(source, nvcc=nvcc, no_extern_c=True, include_dirs=[KERNEL_DIR],
                                options=list(DEFAULT_NVCC_FLAGS) + NVCC_OPTIONS)
    if os.path.isfile(prebuilt):
        import pycuda.driver as drv
        return drv.module_from_file(prebuilt)
    raise RuntimeError(f"kernels/{filename}: nvcc not found and no {prebuilt}; put the CUDA toolkit's bin/ on PATH, "
                       f"or run python -m mpiconvnet.backends.cuda.prebuild where nvcc exists and carry kernels/prebuilt/")


_state = None


def initialize(local_rank=0, local_size=None):
    """Pick this rank's GPU, make its context current, create the stream and handles.

    Call once per process, before MPI touches CUDA; later calls return the existing state
    (a second call asking for a different device is an error). Returns the device ordinal.
    local_size: ranks on this node, or None where it is not known yet. Whether ranks share
    a GPU is checked later, across the ranks (distributed.init).
    """
    global _state
    drv = import_driver()
    ordinal = device_policy.choose_device(local_rank, local_size, drv.Device.count())
    if _state is not None:
        if _state.ordinal != ordinal:
            raise RuntimeError(f"CUDA backend already initialised on device {_state.ordinal}; "
                               f"initialize() was called again for device {ordinal}")
        return ordinal
    try:
        _state = State(ordinal)
    except drv.Error as e:   # PyCUDA's errors are no RuntimeErrors: give the set-up's one line
        raise RuntimeError(f"CUDA device {ordinal} (local rank {local_rank}) cannot be used: {e}; if its compute "
                           f"mode is exclusive-process (nvidia-smi -q -d COMPUTE), it takes one process: run one "
                           f"rank per GPU, or start MPS where ranks must share one") from None
    return ordinal


def device_identity():
    """The UUID of the GPU this process computes on ("GPU-" and the hex digits, as
    nvidia-smi -L prints a GPU's; a MIG instance has its own, which nvidia-smi prefixes
    "MIG-"), or None where the driver cannot say."""
    st = get()
    driver = libs.load_driver()
    get_uuid = getattr(driver, "cuDeviceGetUuid_v2", None) or getattr(driver, "cuDeviceGetUuid", None)
    device, uuid = ctypes.c_int(), (ctypes.c_ubyte * 16)()
    if get_uuid is None or driver.cuDeviceGet(ctypes.byref(device), ctypes.c_int(st.ordinal)) != 0 \
            or get_uuid(uuid, device) != 0:
        return None
    h = bytes(uuid).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def release_before_abort():
    """Pop this thread's push of the backend's context, for an exit that skips Python's own
    clean-up (MPI_Abort): PyCUDA's C++ clean-up at exit finds the context still pushed and
    calls abort(), which turns the run's exit code into a SIGABRT (6) and a banner."""
    if _state is not None and threading.get_ident() == _state.thread:
        try:
            _state.context.pop()
        except Exception:
            pass   # the driver may be in any state: the process is ending anyway


@atexit.register
def _close_at_exit():
    # the state current at exit, not the one of the first initialize(): the tests swap in
    # a state over stand-in libraries and take it out again, and closing that one against
    # the real cuBLAS at exit crashed the interpreter on a GPU node
    if _state is not None:
        _state.close()


class _ThreadContext:
    """The backend's context pushed on one thread's PyCUDA context stack, popped again when
    that thread ends: PyCUDA aborts the whole process ("The context stack was not empty
    upon module cleanup") when a thread exits with a context still on its stack."""

    def __init__(self, context):
        context.push()
        self.context = context

    def __del__(self):
        # runs in the ending thread, when Python clears its thread-locals (before the
        # C++ thread-local stack is destroyed)
        try:
            self.context.pop()
        except Exception:
            pass  # the driver may already be shutting down at interpreter exit


_threads = threading.local()


def use_in_this_thread():
    """Make the backend's context current in the calling thread (CUDA contexts are
    per-thread): for a thread other than the one that called initialize() that queues
    work or hands device buffers to a CUDA-aware MPI. Idempotent; a no-op on the
    initialising thread; the context is popped when the thread ends."""
    st = get()
    if threading.get_ident() == st.thread or getattr(_threads, "pushed", None) is not None:
        return
    _threads.pushed = _ThreadContext(st.context)


def get():
    """The process state, initialising on device 0 if nobody called initialize()."""
    if _state is None:
        initialize(0, 1)
    return _state


def is_initialized():
    return _state is not None
