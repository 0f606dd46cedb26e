"""Dense layers in PyTorch's nn.Linear layout through cuBLAS.

x: (N, F)  w: (O, F)  b: (O,)  y: (N, O);  y = x @ w.T + b
The row-major products are run as column-major GEMMs (cublas.gemm_args says how); the
bias add and the bias gradient are our kernels (bias.cu).
"""
from . import context, cublas
from .memory import empty, given_or_new


def _dims(x, w):
    if len(x.shape) != 2 or len(w.shape) != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit (need (N, F) and (O, F))")
    if x.dtype != w.dtype:
        raise TypeError(f"linear: x is {x.dtype} but w is {w.dtype}")
    return int(x.shape[0]), int(x.shape[1]), int(w.shape[0])


def linear_forward(x, w, b):
    st = context.get()
    n, f, o = _dims(x, w)
    y = empty((n, o), x.dtype)
    cublas.gemm(st.blas, x.dtype.char, cublas.gemm_args("forward", n, f, o), {"x": x.ptr, "w": w.ptr}, y.ptr)
    st.launch("bias_add_rows", x.dtype, n * o, y.ptr, b.ptr, n, o)
    return y


def linear_backward_data(dy, w):
    """dx = dy @ w: (N, F)."""
    st = context.get()
    n, o = int(dy.shape[0]), int(dy.shape[1])
    f = int(w.shape[1])
    if int(w.shape[0]) != o:
        raise ValueError(f"linear_backward_data: dy {tuple(dy.shape)} and w {tuple(w.shape)} do not fit")
    dx = empty((n, f), dy.dtype)
    cublas.gemm(st.blas, dy.dtype.char, cublas.gemm_args("data", n, f, o), {"dy": dy.ptr, "w": w.ptr}, dx.ptr)
    return dx


def linear_backward_filter(x, dy, out=None):
    """dw = dy.T @ x: (O, F)."""
    st = context.get()
    n, f = int(x.shape[0]), int(x.shape[1])
    o = int(dy.shape[1])
    if int(dy.shape[0]) != n:
        raise ValueError(f"linear_backward_filter: x {tuple(x.shape)} and dy {tuple(dy.shape)} differ in N")
    dw = given_or_new(out, (o, f), x.dtype, "linear_backward_filter")
    cublas.gemm(st.blas, x.dtype.char, cublas.gemm_args("filter", n, f, o), {"x": x.ptr, "dy": dy.ptr}, dw.ptr)
    return dw


def linear_backward_bias(dy, out=None):
    """db = dy summed over the batch: (O,)."""
    st = context.get()
    n, o = int(dy.shape[0]), int(dy.shape[1])
    db = given_or_new(out, (o,), dy.dtype, "linear_backward_bias")
    grid = ((o + context.THREADS - 1) // context.THREADS, 1)
    st.launch_grid("sum_rows", dy.dtype, grid, db.ptr, dy.ptr, n, o)
    return db
