"""Grouped 2-D convolution (cross-correlation, as in Caffe and PyTorch) as im2col + GEMM.

    y[n, k, p, q] = b[k] + sum_{c, r, s} w[k, c, r, s] * xpad[n, g*Cg + c, p*stride + r, q*stride + s]

with g = k // Kg the group of output channel k, Cg = C / groups input channels and
Kg = K / groups output channels per group, and xpad = x zero-padded by `pad` on each side.

The batch is processed in slices of a few images (threads.split), each on one thread: the
slice's columns ("im2col") are laid out per group as (Cg*R*S, n*P*Q), so one GEMM covers a
group and the whole slice, and the columns are still in cache when the GEMM reads them.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mpiconvnet.backends.numpy_ops.threads import output, parallel_map, parallel_sum, split


def conv_output_size(size, kernel, stride, pad):
    """Output length along one axis (floor division, as Caffe and PyTorch)."""
    return (size + 2 * pad - kernel) // stride + 1


def _check_shapes(x_shape, w_shape, stride, pad, groups):
    N, C, H, W = x_shape
    K, Cg, R, S = w_shape
    if C != Cg * groups or K % groups != 0:
        raise ValueError(f"conv: input with {C} channels and weights of shape {tuple(w_shape)} "
                         f"do not fit groups={groups}; need C == w.shape[1] * groups and K % groups == 0")
    P, Q = conv_output_size(H, R, stride, pad), conv_output_size(W, S, stride, pad)
    if P < 1 or Q < 1:
        raise ValueError(f"conv: a {R}x{S} kernel with stride {stride} and pad {pad} does not fit "
                         f"a {H}x{W} input; use a larger input or more padding")
    return P, Q


def _cols_bytes_per_image(x, w_shape, P, Q):
    K, Cg, R, S = w_shape
    return x.shape[1] * R * S * P * Q * x.itemsize


def _pad(x, pad):
    # x: (n, C, H, W) -> (n, C, H + 2*pad, W + 2*pad), zeros around
    if pad == 0:
        return x
    n, C, H, W = x.shape
    xp = np.zeros((n, C, H + 2 * pad, W + 2 * pad), dtype=x.dtype)
    xp[:, :, pad:pad + H, pad:pad + W] = x
    return xp


def im2col(x, R, S, stride, pad, groups):
    """Columns of every receptive field, grouped: x (n, C, H, W) -> (G, Cg*R*S, n*P*Q).

    cols[g, (c, r, s), (i, p, q)] = xpad[i, g*Cg + c, p*stride + r, q*stride + s]
    """
    n, C, H, W = x.shape
    xp = _pad(x, pad)                                               # (n, C, Hp, Wp)
    windows = sliding_window_view(xp, (R, S), axis=(2, 3))          # (n, C, Hp-R+1, Wp-S+1, R, S)
    windows = windows[:, :, ::stride, ::stride]                     # (n, C, P, Q, R, S)
    P, Q = windows.shape[2:4]
    windows = windows.reshape(n, groups, C // groups, P, Q, R, S)   # (n, G, Cg, P, Q, R, S)
    cols = np.ascontiguousarray(windows.transpose(1, 2, 5, 6, 0, 3, 4))  # (G, Cg, R, S, n, P, Q)
    return cols.reshape(groups, (C // groups) * R * S, n * P * Q)


def col2im(cols, dx, R, S, stride, pad, groups, P, Q):
    """Adjoint of im2col: add every column entry back to the input pixel it was read from.

    cols: (G, Cg*R*S, n*P*Q) -> written into dx: (n, C, H, W)
    """
    n, C, H, W = dx.shape
    cols = cols.reshape(groups, C // groups, R, S, n, P, Q)
    dxp = np.zeros((n, C, H + 2 * pad, W + 2 * pad), dtype=cols.dtype)
    # one strided add per kernel offset (r, s): the positions p*stride + r are distinct for
    # fixed (r, s), so each add is a plain vector op; overlaps between offsets accumulate.
    for r in range(R):
        for s in range(S):
            patch = cols[:, :, r, s].transpose(2, 0, 1, 3, 4).reshape(n, C, P, Q)  # (n, C, P, Q)
            dxp[:, :, r:r + stride * (P - 1) + 1:stride, s:s + stride * (Q - 1) + 1:stride] += patch
    dx[...] = dxp[:, :, pad:pad + H, pad:pad + W]


def _grouped(a, groups):
    # a: (n, K, P, Q) -> (G, Kg, n*P*Q), the layout of the GEMMs (a copy)
    n, K, P, Q = a.shape
    return a.transpose(1, 0, 2, 3).reshape(groups, K // groups, n * P * Q)


def conv_forward(x, w, b, stride, pad, groups):
    # x: (N, C, H, W)  w: (K, Cg, R, S)  b: (K,)  ->  y: (N, K, P, Q)
    N = x.shape[0]
    K, Cg, R, S = w.shape
    P, Q = _check_shapes(x.shape, w.shape, stride, pad, groups)
    w_groups = w.reshape(groups, K // groups, Cg * R * S)            # (G, Kg, Cg*R*S)
    y = output((N, K, P, Q), x.dtype)

    def forward(images):
        n = images.stop - images.start
        cols = im2col(x[images], R, S, stride, pad, groups)          # (G, Cg*R*S, n*P*Q)
        y_groups = np.matmul(w_groups, cols)                         # (G, Kg, n*P*Q)
        y_images = y_groups.reshape(K, n, P, Q).transpose(1, 0, 2, 3)  # (n, K, P, Q) view
        np.add(y_images, b.reshape(K, 1, 1), out=y[images])          # one pass: transpose + bias

    parallel_map(forward, split(N, _cols_bytes_per_image(x, w.shape, P, Q)))
    return y


def conv_backward_data(dy, w, x_shape, stride, pad, groups):
    # dy: (N, K, P, Q)  w: (K, Cg, R, S)  ->  dx: x_shape = (N, C, H, W)
    K, Cg, R, S = w.shape
    P, Q = _check_shapes(x_shape, w.shape, stride, pad, groups)
    w_groups_t = w.reshape(groups, K // groups, Cg * R * S).transpose(0, 2, 1)  # (G, Cg*R*S, Kg)
    dx = output(x_shape, dy.dtype)

    def backward_data(images):
        dcols = np.matmul(w_groups_t, _grouped(dy[images], groups))  # (G, Cg*R*S, n*P*Q)
        col2im(dcols, dx[images], R, S, stride, pad, groups, P, Q)

    parallel_map(backward_data, split(x_shape[0], _cols_bytes_per_image(dy, w.shape, P, Q)))
    return dx


def conv_backward_filter(x, dy, w_shape, stride, pad, groups):
    # x: (N, C, H, W)  dy: (N, K, P, Q)  ->  dw: w_shape = (K, Cg, R, S)
    K, Cg, R, S = w_shape
    P, Q = _check_shapes(x.shape, w_shape, stride, pad, groups)

    def backward_filter(images):
        cols = im2col(x[images], R, S, stride, pad, groups)          # (G, Cg*R*S, n*P*Q)
        return np.matmul(_grouped(dy[images], groups), cols.transpose(0, 2, 1))  # (G, Kg, Cg*R*S)

    dw = parallel_sum(backward_filter, split(x.shape[0], _cols_bytes_per_image(x, w_shape, P, Q)))
    return dw.reshape(K, Cg, R, S)


def conv_backward_bias(dy):
    # dy: (N, K, P, Q) -> db: (K,)
    return dy.sum(axis=(0, 2, 3))
