"""How the NumPy backend uses several cores: a thread pool over slices of the batch.

Each op is written for a slice of the batch and mapped over slices sized so one slice's
arrays fit in cache (CHUNK_BYTES), several per thread. NumPy releases the GIL inside ufuncs,
copies and BLAS calls, so the threads run in parallel; a thread that the OS deschedules
(the machine is shared) only delays its current slice, the others take the rest.

BLAS itself is kept single-threaded: the pool is the only source of parallelism, so two
layers of threads never fight over the cores. `set_num_threads(n)` sets the pool's width
(default OMP_NUM_THREADS, else 1).
"""
import ctypes
import functools
import math
import operator
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# working set of one slice of the batch: big enough that per-call overhead is small, small
# enough to stay in L2/L3 and to be recycled by malloc (no fresh page faults every call)
CHUNK_BYTES = 4 << 20

# tests set this: outputs are then filled with NaN before the slices write them, so a slice
# that is never written shows up instead of passing on leftover memory
POISON_OUTPUTS = False

_SETTER_NAMES = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads64_", "openblas_set_num_threads")
_num_threads = 1
_pool = None


def _loaded_openblas_setter():
    """The C function that sets OpenBLAS's thread count, or None when NumPy uses another BLAS."""
    np.ones((2, 2)) @ np.ones((2, 2))                      # make sure the BLAS is loaded
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:                                       # not Linux: no way to find it
        return None
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        for name in _SETTER_NAMES:
            setter = getattr(library, name, None)
            if setter is not None:
                return setter
    return None


_blas_setter = _loaded_openblas_setter()


def set_num_threads(n):
    """Run the backend's ops on n threads. Returns False when the BLAS could not be made
    single-threaded (NumPy built against another BLAS: set OMP_NUM_THREADS=1 instead)."""
    global _num_threads, _pool
    if int(n) < 1:
        raise ValueError(f"set_num_threads: need at least one thread, got {n}")
    _num_threads = int(n)
    if _pool is not None:
        _pool.shutdown()
    _pool = ThreadPoolExecutor(_num_threads, thread_name_prefix="numpy-backend") if _num_threads > 1 else None
    if _blas_setter is None:
        return False
    _blas_setter(1)
    return True


def get_num_threads():
    return _num_threads


def parallel_map(function, items):
    """[function(item) for item in items], spread over the pool's threads."""
    if _pool is None or len(items) < 2:
        return [function(item) for item in items]
    return list(_pool.map(function, items))


def parallel_sum(function, items):
    """sum(function(item) for item in items): one contiguous run of items per thread, each
    summed in order, then the runs' totals in order. The order of the additions is fixed by
    the item and thread counts alone, not by which thread got which item first, so the
    rounding is the same on every run (a resumed run, or one rank against another)."""
    items = list(items)
    runs = min(_num_threads, len(items))
    if runs < 2:
        return functools.reduce(operator.add, map(function, items))
    bounds = [i * len(items) // runs for i in range(runs + 1)]
    totals = parallel_map(lambda r: functools.reduce(operator.add, map(function, items[bounds[r]:bounds[r + 1]])),
                          range(runs))
    return functools.reduce(operator.add, totals)


def output(shape, dtype):
    """An uninitialised array that the slices of an op will fill (NaN-filled in tests)."""
    return np.full(shape, np.nan, dtype=dtype) if POISON_OUTPUTS else np.empty(shape, dtype=dtype)


def given_or_new(out, shape, dtype, op):
    """`out` when the caller gave one (checked: same shape and dtype, writable), else a new
    output() array: gradients go straight into the model's arrays (views into the
    allreduce buckets) instead of being copied there."""
    if out is None:
        return output(shape, dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)} {out.dtype}, the result is {tuple(shape)} {dtype}")
    return out


def split(length, bytes_per_item):
    """Contiguous slices covering range(length), about CHUNK_BYTES of working set each and
    at least one per thread."""
    per_slice = max(1, min(CHUNK_BYTES // max(bytes_per_item, 1), math.ceil(length / _num_threads)))
    return [slice(start, min(start + per_slice, length)) for start in range(0, length, per_slice)]


def _threads_from_environment():
    """OMP_NUM_THREADS, as OpenMP reads it ("4", or "4,2" for nested levels); else 1."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


set_num_threads(_threads_from_environment())
