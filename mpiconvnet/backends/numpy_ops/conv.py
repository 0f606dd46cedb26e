"""Grouped 2-D convolution (cross-correlation, as in Caffe and PyTorch) as im2col + GEMM.

    y[n, k, p, q] = b[k] + sum_{c, r, s} w[k, c, r, s] * xpad[n, g*Cg + c, p*stride + r, q*stride + s]

with g = k // Kg the group of output channel k, Cg = C / groups input channels and
Kg = K / groups output channels per group, and xpad = x zero-padded by `pad` on each side.

The columns ("im2col") are laid out per group as (Cg*R*S, N*P*Q): one GEMM then covers a
whole group and the whole batch, which keeps BLAS at full speed even where the images are
small (13x13 in conv3-5), and the filter gradient becomes one GEMM with the batch inside the
long inner dimension instead of a sum of N small products.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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


def _pad(x, pad):
    # x: (N, C, H, W) -> (N, C, H + 2*pad, W + 2*pad), zeros around
    if pad == 0:
        return x
    N, C, H, W = x.shape
    xp = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=x.dtype)
    xp[:, :, pad:pad + H, pad:pad + W] = x
    return xp


def im2col(x, R, S, stride, pad, groups):
    """Columns of every receptive field, grouped: (G, Cg*R*S, N*P*Q).

    cols[g, (c, r, s), (n, p, q)] = xpad[n, g*Cg + c, p*stride + r, q*stride + s]
    """
    N, C, H, W = x.shape
    xp = _pad(x, pad)                                               # (N, C, Hp, Wp)
    windows = sliding_window_view(xp, (R, S), axis=(2, 3))          # (N, C, Hp-R+1, Wp-S+1, R, S)
    windows = windows[:, :, ::stride, ::stride]                     # (N, C, P, Q, R, S)
    P, Q = windows.shape[2:4]
    windows = windows.reshape(N, groups, C // groups, P, Q, R, S)   # (N, G, Cg, P, Q, R, S)
    cols = np.ascontiguousarray(windows.transpose(1, 2, 5, 6, 0, 3, 4))  # (G, Cg, R, S, N, P, Q)
    return cols.reshape(groups, (C // groups) * R * S, N * P * Q)


def col2im(cols, x_shape, R, S, stride, pad, groups, P, Q):
    """Adjoint of im2col: add every column entry back to the input pixel it was read from.

    cols: (G, Cg*R*S, N*P*Q) -> dx: (N, C, H, W)
    """
    N, C, H, W = x_shape
    cols = cols.reshape(groups, C // groups, R, S, N, P, Q)
    dxp = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=cols.dtype)
    # one strided add per kernel offset (r, s): the positions p*stride + r are distinct for
    # fixed (r, s), so each add is a plain vector op; overlaps between offsets accumulate.
    for r in range(R):
        for s in range(S):
            patch = cols[:, :, r, s].transpose(2, 0, 1, 3, 4).reshape(N, C, P, Q)  # (N, C, P, Q)
            dxp[:, :, r:r + stride * (P - 1) + 1:stride, s:s + stride * (Q - 1) + 1:stride] += patch
    return np.ascontiguousarray(dxp[:, :, pad:pad + H, pad:pad + W])


def conv_forward(x, w, b, stride, pad, groups):
    # x: (N, C, H, W)  w: (K, Cg, R, S)  b: (K,)  ->  y: (N, K, P, Q)
    N = x.shape[0]
    K, Cg, R, S = w.shape
    P, Q = _check_shapes(x.shape, w.shape, stride, pad, groups)
    cols = im2col(x, R, S, stride, pad, groups)                  # (G, Cg*R*S, N*P*Q)
    w_groups = w.reshape(groups, K // groups, Cg * R * S)        # (G, Kg, Cg*R*S)
    y_groups = np.matmul(w_groups, cols)                         # (G, Kg, N*P*Q)
    y_groups = y_groups.reshape(K, N, P, Q).transpose(1, 0, 2, 3)  # (N, K, P, Q) view
    return y_groups + b.reshape(1, K, 1, 1)                      # one pass: transpose + bias


def _dy_grouped(dy, groups):
    # dy: (N, K, P, Q) -> (G, Kg, N*P*Q), the layout of the GEMMs above
    N, K, P, Q = dy.shape
    return dy.transpose(1, 0, 2, 3).reshape(groups, K // groups, N * P * Q)


def conv_backward_data(dy, w, x_shape, stride, pad, groups):
    # dy: (N, K, P, Q)  w: (K, Cg, R, S)  ->  dx: x_shape = (N, C, H, W)
    K, Cg, R, S = w.shape
    P, Q = _check_shapes(x_shape, w.shape, stride, pad, groups)
    w_groups = w.reshape(groups, K // groups, Cg * R * S)        # (G, Kg, Cg*R*S)
    dcols = np.matmul(w_groups.transpose(0, 2, 1), _dy_grouped(dy, groups))  # (G, Cg*R*S, N*P*Q)
    return col2im(dcols, x_shape, R, S, stride, pad, groups, P, Q)


def conv_backward_filter(x, dy, w_shape, stride, pad, groups):
    # x: (N, C, H, W)  dy: (N, K, P, Q)  ->  dw: w_shape = (K, Cg, R, S)
    K, Cg, R, S = w_shape
    _check_shapes(x.shape, w_shape, stride, pad, groups)
    cols = im2col(x, R, S, stride, pad, groups)                  # (G, Cg*R*S, N*P*Q)
    dw = np.matmul(_dy_grouped(dy, groups), cols.transpose(0, 2, 1))  # (G, Kg, Cg*R*S)
    return dw.reshape(K, Cg, R, S)


def conv_backward_bias(dy):
    # dy: (N, K, P, Q) -> db: (K,)
    return dy.sum(axis=(0, 2, 3))
