"""How many threads the NumPy backend uses: `set_num_threads(n)`.

The count applies to the BLAS that NumPy was built with (OpenBLAS in the wheels from PyPI),
found among the loaded libraries through its `*openblas_set_num_threads*` entry point.
The default is OMP_NUM_THREADS, else 1.
"""
import ctypes
import os

import numpy as np

_SETTER_NAMES = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads64_", "openblas_set_num_threads")
_num_threads = 1


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
    """Use n threads for BLAS calls; returns False when the BLAS cannot be told."""
    global _num_threads
    if int(n) < 1:
        raise ValueError(f"set_num_threads: need at least one thread, got {n}")
    _num_threads = int(n)
    if _blas_setter is None:
        return False
    _blas_setter(_num_threads)
    return True


def get_num_threads():
    return _num_threads


set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
