"""Does the MPI library accept CUDA device buffers? Decides between reducing gradients on
the GPU and staging them through pinned host buffers.

In order:
  1. MPICONVNET_CUDA_AWARE=0|1 overrides everything (for MPIs with no query function,
     e.g. MVAPICH2-GDR, or to force staging while debugging);
  2. Open MPI (and MPICH >= 4.1): int MPIX_Query_cuda_support(void) -> 1 when built with
     CUDA and CUDA support is enabled at run time (documented so; Open MPI 4.x builds may
     answer from the build alone: MPICONVNET_CUDA_AWARE=0 when such a run dies in MPI);
  3. MPICH >= 4.0 (and Cray MPICH): int MPIX_GPU_query_support(int gpu_type, int *ok)
     with gpu_type MPIX_GPU_SUPPORT_CUDA = 0 (mpi.h);
  4. otherwise False: staging through the host always works.
The symbols are looked up in the MPI library that mpi4py loaded: through mpi4py's
extension module (dlsym searches a library's dependencies too) and through the libmpi*
files mapped into this process (/proc/self/maps). Call after MPI is initialised (importing
mpi4py.MPI does that); the answer is cached.

Even a CUDA-aware Open MPI does not accept device buffers in non-blocking reductions
(Iallreduce): the trainer uses blocking Allreduce on device memory, never Iallreduce.
"""
import ctypes
import os

MPIX_GPU_SUPPORT_CUDA = 0

_cached = None


def override_from_env(environ=None):
    """True / False from MPICONVNET_CUDA_AWARE, or None when it is unset or empty."""
    environ = os.environ if environ is None else environ
    value = environ.get("MPICONVNET_CUDA_AWARE", "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"MPICONVNET_CUDA_AWARE={value!r}: use 1 (MPI reads GPU buffers) or 0 (stage through the host)")
    return value == "1"


def query_library(lib):
    """What `lib` (a ctypes library, or anything with the same attributes) says about CUDA
    support: True / False, or None when it has neither query function."""
    fn = getattr(lib, "MPIX_Query_cuda_support", None)
    if fn is not None:
        fn.argtypes = []
        fn.restype = ctypes.c_int
        return fn() == 1
    fn = getattr(lib, "MPIX_GPU_query_support", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        fn.restype = ctypes.c_int
        supported = ctypes.c_int(0)
        if fn(MPIX_GPU_SUPPORT_CUDA, ctypes.byref(supported)) != 0:
            return False  # the call itself failed: do not trust device buffers
        return supported.value != 0
    return None


def mapped_mpi_libraries(maps_path="/proc/self/maps"):
    """Paths of the libmpi* / libmpich* shared objects mapped into this process."""
    paths = []
    try:
        with open(maps_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or not parts[5].startswith("/"):
                    continue
                path = parts[5]
                name = os.path.basename(path)
                if (name.startswith("libmpi") or name.startswith("libmpich")) and ".so" in name and path not in paths:
                    paths.append(path)
    except OSError:
        pass  # not Linux: only the mpi4py module is searched
    return paths


def _loaded_mpi_libraries():
    """ctypes handles on the MPI library mpi4py uses (importing mpi4py.MPI initialises MPI)."""
    from mpi4py import MPI
    libs = []
    for path in [MPI.__file__] + mapped_mpi_libraries():
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def cuda_aware_mpi(environ=None, libraries=None):
    """True when MPI calls may be handed device buffers (see the module docstring).

    environ / libraries are injectable for tests; by default the process environment and
    the MPI library mpi4py loaded are used, and the answer is cached.
    """
    global _cached
    forced = override_from_env(environ)
    if forced is not None:
        return forced
    use_cache = libraries is None
    if use_cache and _cached is not None:
        return _cached
    answer = False
    for lib in (_loaded_mpi_libraries() if libraries is None else libraries):
        result = query_library(lib)
        if result is not None:
            answer = result
            break
    if use_cache:
        _cached = answer
    return answer
