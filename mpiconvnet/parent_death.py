"""Helper processes that end with their parent, however the parent ends."""
import ctypes
import signal


def die_with_parent():
    """Linux: the kernel kills this process when its parent ends, even when the parent ends
    by MPI_Abort or SIGKILL and this one hangs or is stopped, where no check of ours runs.
    Elsewhere a no-op: the caller's own checks must do."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
