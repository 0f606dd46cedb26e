"""A thin ctypes layer over cuBLAS: a handle, its stream and math mode, and row-major GEMMs.

Only what the dense layers need. Enum values are those of cublas_api.h (CUDA 11-13):
they are part of the ABI, so they are written out here rather than read from a header.
The row-major <-> column-major mapping lives in `gemm_args`, pure Python, tested on
machines without CUDA (tests/test_cuda_logic.py).
"""
import ctypes

from . import libs

# cublasStatus_t
CUBLAS_STATUS_SUCCESS = 0
STATUS_NAMES = {
    0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE", 8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
    13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
    15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR",
}
# cublasOperation_t
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
# cublasMath_t
CUBLAS_DEFAULT_MATH = 0
CUBLAS_PEDANTIC_MATH = 2
CUBLAS_TF32_TENSOR_OP_MATH = 3


class CublasError(RuntimeError):
    pass


def check(status, call):
    if status != CUBLAS_STATUS_SUCCESS:
        raise CublasError(f"{call} failed with {STATUS_NAMES.get(status, status)}")


_lib = None


def lib():
    """libcublas with argument types declared (loaded on first use, never at import)."""
    global _lib
    if _lib is None:
        L = libs.load_cublas()
        vp, i, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_int
        L.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        L.cublasDestroy_v2.argtypes = [vp]
        L.cublasSetStream_v2.argtypes = [vp, vp]
        L.cublasSetMathMode.argtypes = [vp, c]
        # cublas{S,D}gemm_v2(handle, transa, transb, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc)
        for name, scalar in (("cublasSgemm_v2", ctypes.c_float), ("cublasDgemm_v2", ctypes.c_double)):
            f = getattr(L, name)
            f.argtypes = [vp, c, c, i, i, i, ctypes.POINTER(scalar), vp, i, vp, i,
                          ctypes.POINTER(scalar), vp, i]
        for f in (L.cublasCreate_v2, L.cublasDestroy_v2, L.cublasSetStream_v2, L.cublasSetMathMode,
                  L.cublasSgemm_v2, L.cublasDgemm_v2):
            f.restype = ctypes.c_int
        _lib = L
    return _lib


def math_mode(tf32):
    """cuBLAS math mode: TF32 tensor cores only when asked; otherwise pedantic, so single
    precision GEMMs are true float32 (the default mode may already pick TF32 for FP32 on
    some versions when NVIDIA_TF32_OVERRIDE is unset)."""
    return CUBLAS_TF32_TENSOR_OP_MATH if tf32 else CUBLAS_PEDANTIC_MATH


class Handle:
    """A cuBLAS handle bound to one stream (create it with the CUDA context current)."""

    def __init__(self, stream_handle, tf32):
        self.ptr = ctypes.c_void_p()
        check(lib().cublasCreate_v2(ctypes.byref(self.ptr)), "cublasCreate_v2")
        check(lib().cublasSetStream_v2(self.ptr, ctypes.c_void_p(stream_handle)), "cublasSetStream_v2")
        self.set_tf32(tf32)

    def set_tf32(self, tf32):
        check(lib().cublasSetMathMode(self.ptr, math_mode(tf32)), "cublasSetMathMode")

    def destroy(self):
        if self.ptr:
            lib().cublasDestroy_v2(self.ptr)
            self.ptr = ctypes.c_void_p()


def gemm_args(kind, n, f, o):
    """Column-major GEMM arguments for the three row-major products of a dense layer.

    Row-major (r, c) memory read column-major is the (c, r) transpose, so each product is
    computed transposed (x: (n, f), w: (o, f), dy: (n, o)):
      "forward": y (n, o) = x @ w.T   ->  y^T (o, n)  = (w^T)^T . x^T
      "data":    dx (n, f) = dy @ w   ->  dx^T (f, n) = w^T . dy^T
      "filter":  dw (o, f) = dy.T @ x ->  dw^T (f, o) = x^T . (dy^T)^T
    Returns the cuBLAS arguments by name; "A" / "B" say which operand ('x', 'w', 'dy')
    goes in that slot. tests/test_cuda_logic.py replays them in NumPy with column-major
    semantics.
    """
    if kind == "forward":   # y^T (o x n) = (w^T)^T (o x f) . x^T (f x n)
        return dict(transa=CUBLAS_OP_T, transb=CUBLAS_OP_N, m=o, n=n, k=f, A="w", lda=f, B="x", ldb=f, ldc=o)
    if kind == "data":      # dx^T (f x n) = w^T (f x o) . dy^T (o x n)
        return dict(transa=CUBLAS_OP_N, transb=CUBLAS_OP_N, m=f, n=n, k=o, A="w", lda=f, B="dy", ldb=o, ldc=f)
    if kind == "filter":    # dw^T (f x o) = x^T (f x n) . (dy^T)^T (n x o)
        return dict(transa=CUBLAS_OP_N, transb=CUBLAS_OP_T, m=f, n=o, k=n, A="x", lda=f, B="dy", ldb=o, ldc=f)
    raise ValueError(f"unknown dense product {kind!r}; expected forward, data or filter")


def gemm(handle, dtype_char, args, ptrs, out_ptr):
    """Run C = op(A) op(B) (alpha 1, beta 0) with `args` from gemm_args and `ptrs` mapping
    operand names to device pointers. dtype_char: 'f' (float32) or 'd' (float64)."""
    L = lib()
    if dtype_char == "f":
        fn, scalar, name = L.cublasSgemm_v2, ctypes.c_float, "cublasSgemm_v2"
    else:
        fn, scalar, name = L.cublasDgemm_v2, ctypes.c_double, "cublasDgemm_v2"
    one, zero = scalar(1.0), scalar(0.0)
    check(fn(handle.ptr, args["transa"], args["transb"], args["m"], args["n"], args["k"],
             ctypes.byref(one), ctypes.c_void_p(ptrs[args["A"]]), args["lda"],
             ctypes.c_void_p(ptrs[args["B"]]), args["ldb"], ctypes.byref(zero),
             ctypes.c_void_p(out_ptr), args["ldc"]), name)
