"""Keep freed temporaries in the process instead of handing them back to the OS.

glibc serves blocks above M_MMAP_THRESHOLD (128 KiB at start) with fresh mmap pages and
unmaps them on free, so every slice temporary of a few MiB page-faults and is zeroed by
the kernel again on every call: that doubled the time of LRN. Raising the thresholds
makes malloc reuse the same memory call after call. No effect outside glibc.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20     # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 512 << 20


def keep_freed_memory():
    """Returns True when glibc accepted the new thresholds."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):               # not glibc (musl, macOS): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
