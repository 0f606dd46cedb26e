"""Find and load libcublas and libcudnn for the ctypes bindings (cublas.py, cudnn.py).

Nothing here touches a GPU: it only finds files and dlopens them, so the search logic is
tested on machines without CUDA (tests/test_cuda_logic.py).

Where the libraries are looked for, first match wins (docs/gpu.md says the same):
  1. MPICONVNET_CUDA_LIBS: directories separated by ':' (the explicit override);
  2. the NVIDIA wheels on sys.path: site-packages/nvidia/*/lib and nvidia/*/*/lib
     (nvidia-cublas-cu12, nvidia-cublas (CUDA 13), nvidia-cudnn-cu12 / -cu13, and the
     same wheels that a CUDA build of PyTorch pulls in);
  3. PyTorch's own torch/lib (conda and some pip builds bundle the libraries there);
  4. CUDA_HOME / CUDA_PATH, /usr/local/cuda, and every LD_LIBRARY_PATH directory;
  5. the dynamic loader's own search by soname (ldconfig cache, rpath).
"""
import ctypes
import glob
import os
import sys

# sonames in order of preference: cuBLAS of CUDA 13 / 12 / 11; cuDNN 9 (the legacy API
# used here exists unchanged in 8, whose struct layouts are the same).
CUBLAS_SONAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so")
CUDNN_SONAMES = ("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so")


class LibraryNotFound(RuntimeError):
    """A CUDA library is missing; the message says where we looked and how to fix it."""


def candidate_dirs(environ=None, path_entries=None):
    """Directories to search, in order, without duplicates (see the module docstring)."""
    environ = os.environ if environ is None else environ
    path_entries = sys.path if path_entries is None else path_entries
    dirs = []
    dirs += [d for d in environ.get("MPICONVNET_CUDA_LIBS", "").split(":") if d]
    for entry in path_entries:
        if not entry or not os.path.isdir(entry):
            continue
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib")))
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "*", "lib")))
    for entry in path_entries:
        if entry and os.path.isdir(os.path.join(entry, "torch", "lib")):
            dirs.append(os.path.join(entry, "torch", "lib"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            dirs += [os.path.join(environ[var], "lib64"), os.path.join(environ[var], "lib")]
    dirs += ["/usr/local/cuda/lib64", "/usr/local/cuda/lib"]
    dirs += [d for d in environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    seen, ordered = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            ordered.append(d)
    return ordered


def find_library_file(sonames, dirs):
    """The first existing file named one of `sonames` in `dirs` (dirs outer, sonames inner).

    Returns None when none exists; the caller then tries the loader's own search.
    """
    for d in dirs:
        for name in sonames:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def not_found_message(what, sonames, dirs, fix):
    looked = ", ".join(dirs) if dirs else "(no candidate directories)"
    return (f"{what} not found: no {' / '.join(sonames)} in {looked} nor on the loader path; "
            f"{fix}, or set MPICONVNET_CUDA_LIBS=/dir/with/the/library (see docs/gpu.md)")


def _dlopen_first(sonames, dirs, what, fix, preload_pattern=None):
    path = find_library_file(sonames, dirs)
    if path is not None:
        if preload_pattern:
            # cuDNN 9 dlopens its sub-libraries (libcudnn_ops, _cnn, _engines_*) and cuBLAS
            # needs libcublasLt, each by soname; loading them first from the same directory
            # makes that lookup find them even when the directory is not on LD_LIBRARY_PATH.
            # they depend on each other, so retry until a pass loads nothing new; one that
            # never loads is an optional engine needing something absent (cuDNN reports it
            # only if a call needs it).
            pending = sorted(glob.glob(os.path.join(os.path.dirname(path), preload_pattern)))
            while pending:
                failed = []
                for sub in pending:
                    try:
                        ctypes.CDLL(sub, mode=ctypes.RTLD_GLOBAL)
                    except OSError:
                        failed.append(sub)
                if len(failed) == len(pending):
                    break
                pending = failed
        try:
            return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:   # found but not loadable: a dependency missing, another architecture
            raise LibraryNotFound(f"{what} at {path} did not load ({e}); {fix}, or set "
                                  f"MPICONVNET_CUDA_LIBS to a directory with a complete copy (see docs/gpu.md)") from None
    for name in sonames:
        try:
            return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    raise LibraryNotFound(not_found_message(what, sonames, dirs, fix))


_loaded = {}


def load_driver():
    """ctypes.CDLL of the CUDA driver (libcuda.so.1, already loaded by PyCUDA), for the few
    driver calls PyCUDA does not offer safely (memory.PinnedHostMemory)."""
    if "driver" not in _loaded:
        try:
            driver = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise LibraryNotFound(f"the CUDA driver libcuda.so.1 did not load ({e}); run on a GPU node") from None
        driver.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        driver.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        driver.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _loaded["driver"] = driver
    return _loaded["driver"]


def driver_error(status):
    """The driver's words for a CUresult."""
    text = ctypes.c_char_p()
    if load_driver().cuGetErrorString(status, ctypes.byref(text)) == 0 and text.value:
        return f"{text.value.decode()} (CUresult {status})"
    return f"CUresult {status}"


def load_cublas():
    """ctypes.CDLL of libcublas (cached)."""
    if "cublas" not in _loaded:
        _loaded["cublas"] = _dlopen_first(
            CUBLAS_SONAMES, candidate_dirs(), "cuBLAS",
            "pip install nvidia-cublas-cu12 (or the site's CUDA module / a CUDA build of PyTorch)",
            preload_pattern="libcublasLt.so.[0-9]*")
    return _loaded["cublas"]


def load_cudnn():
    """ctypes.CDLL of libcudnn (cached), with its sub-libraries preloaded."""
    if "cudnn" not in _loaded:
        _loaded["cudnn"] = _dlopen_first(
            CUDNN_SONAMES, candidate_dirs(), "cuDNN",
            "pip install nvidia-cudnn-cu12 (or nvidia-cudnn-cu13, the site's cuDNN module, or a CUDA build of PyTorch)",
            preload_pattern="libcudnn_*.so.[89]")
    return _loaded["cudnn"]
