"""Grouped 2-D convolution (cross-correlation, as in Caffe and PyTorch) as im2col + GEMM.

    y[n, k, p, q] = b[k] + sum_{c, r, s} w[k, c, r, s] * xpad[n, g*Cg + c, p*stride + r, q*stride + s]

with g = k // Kg the group of output channel k, Cg = C / groups input channels and
Kg = K / groups output channels per group, and xpad = x zero-padded by `pad` on each side.

The batch is processed in slices of a few images (threads.split), each on one thread, and
each slice's receptive fields are copied into a matrix ("im2col") so that one GEMM per group
covers the whole slice. The copies and their adjoint (col2im, a scatter-add) are NumPy loops
whose speed is set by the length of their contiguous runs, so the matrix comes in two layouts:

    channels first  cols (G, Cg*R*S, n*P*Q), runs along a row of pixels (Q long)
    channels last   cols (G, n*P*Q, R*S*Cg), runs along the channels (Cg long), from an
                    NHWC copy of the input

and each layer uses the one with the longer runs (conv1: 3 channels against 55 pixels a
row; conv2: 48 against 27; conv3-5: 192-384 against 13). Both give the same sums in
another order.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mpiconvnet.backends.numpy_ops.threads import given_or_new, output, parallel_map, parallel_sum, split


def conv_output_size(size, kernel, stride, pad):
    """Output length along one axis (floor division, as Caffe and PyTorch)."""
    return (size + 2 * pad - kernel) // stride + 1


class _Geometry:
    """The sizes of one convolution, checked once."""

    def __init__(self, x_shape, w_shape, stride, pad, groups):
        N, C, H, W = x_shape
        K, Cg, R, S = w_shape
        if C != Cg * groups or K % groups != 0:
            raise ValueError(f"conv: input with {C} channels and weights of shape {tuple(w_shape)} do not "
                             f"fit groups={groups}; need C == w.shape[1] * groups and K % groups == 0")
        P, Q = conv_output_size(H, R, stride, pad), conv_output_size(W, S, stride, pad)
        if P < 1 or Q < 1:
            raise ValueError(f"conv: a {R}x{S} kernel with stride {stride} and pad {pad} does not fit "
                             f"a {H}x{W} input; use a larger input or more padding")
        self.N, self.C, self.H, self.W, self.K, self.Cg, self.R, self.S = N, C, H, W, K, Cg, R, S
        self.P, self.Q, self.stride, self.pad, self.G, self.Kg = P, Q, stride, pad, groups, K // groups
        # the longer contiguous runs win (measured on AlexNet: conv2-5 take channels last)
        self.channels_last = Cg > Q

    def slices(self, itemsize):
        """Slices of the batch whose columns take about threads.CHUNK_BYTES each."""
        return split(self.N, self.C * self.R * self.S * self.P * self.Q * itemsize)

    def window_offset(self, a, r, s, axes):
        """View of a (padded image) picking kernel offset (r, s) of every window: P x Q strided."""
        index = [slice(None)] * a.ndim
        index[axes[0]] = slice(r, r + self.stride * (self.P - 1) + 1, self.stride)
        index[axes[1]] = slice(s, s + self.stride * (self.Q - 1) + 1, self.stride)
        return a[tuple(index)]


def _zero_padded(x, pad, spatial_axes):
    """x with `pad` zeros on both sides of the two spatial axes."""
    widths = [(pad, pad) if axis in spatial_axes else (0, 0) for axis in range(x.ndim)]
    return np.pad(x, widths) if pad else x


# ----------------------------------------------------------------------------- channels first

def _im2col_first(x, g):
    # x: (n, C, H, W) -> cols: (G, Cg*R*S, n*P*Q)
    # cols[g, (c, r, s), (i, p, q)] = xpad[i, g*Cg + c, p*stride + r, q*stride + s]
    n = x.shape[0]
    windows = sliding_window_view(_zero_padded(x, g.pad, (2, 3)), (g.R, g.S), axis=(2, 3))
    windows = windows[:, :, ::g.stride, ::g.stride]                    # (n, C, P, Q, R, S)
    windows = windows.reshape(n, g.G, g.Cg, g.P, g.Q, g.R, g.S)
    cols = np.ascontiguousarray(windows.transpose(1, 2, 5, 6, 0, 3, 4))   # (G, Cg, R, S, n, P, Q)
    return cols.reshape(g.G, g.Cg * g.R * g.S, n * g.P * g.Q)


def _col2im_first(cols, dx, g):
    # cols: (G, Cg*R*S, n*P*Q) -> dx: (n, C, H, W), each entry added back where im2col read it
    n = dx.shape[0]
    cols = cols.reshape(g.G, g.Cg, g.R, g.S, n, g.P, g.Q)
    dxp = np.zeros((n, g.C, g.H + 2 * g.pad, g.W + 2 * g.pad), dtype=cols.dtype)
    for r in range(g.R):
        for s in range(g.S):
            # for fixed (r, s) the windows read distinct pixels: a plain add, no overlaps
            dxp_window = g.window_offset(dxp, r, s, (2, 3))             # (n, C, P, Q)
            dxp_window += cols[:, :, r, s].transpose(2, 0, 1, 3, 4).reshape(n, g.C, g.P, g.Q)
    dx[...] = dxp[:, :, g.pad:g.pad + g.H, g.pad:g.pad + g.W]


def _dy_first(dy, g):
    # dy: (n, K, P, Q) -> (G, Kg, n*P*Q)
    return dy.transpose(1, 0, 2, 3).reshape(g.G, g.Kg, -1)


def _forward_first(x, w, b, y, g):
    n = x.shape[0]
    w_groups = w.reshape(g.G, g.Kg, -1)                                  # (G, Kg, Cg*R*S)
    y_groups = np.matmul(w_groups, _im2col_first(x, g))                 # (G, Kg, n*P*Q)
    y_images = y_groups.reshape(g.K, n, g.P, g.Q).transpose(1, 0, 2, 3)  # (n, K, P, Q) view
    np.add(y_images, b.reshape(g.K, 1, 1), out=y)                      # one pass: transpose + bias


def _backward_data_first(dy, w, dx, g):
    w_groups_t = w.reshape(g.G, g.Kg, -1).transpose(0, 2, 1)           # (G, Cg*R*S, Kg)
    _col2im_first(np.matmul(w_groups_t, _dy_first(dy, g)), dx, g)      # GEMM: (G, Cg*R*S, n*P*Q)


def _backward_filter_first(x, dy, g):
    cols = _im2col_first(x, g)                                          # (G, Cg*R*S, n*P*Q)
    dw = np.matmul(_dy_first(dy, g), cols.transpose(0, 2, 1))           # (G, Kg, Cg*R*S)
    return dw.reshape(g.K, g.Cg, g.R, g.S)


# ----------------------------------------------------------------------------- channels last

def _im2col_last(x, g):
    # x: (n, C, H, W) -> cols: (G, n*P*Q, R*S*Cg)
    # cols[g, (i, p, q), (r, s, c)] = xpad[i, g*Cg + c, p*stride + r, q*stride + s]
    n = x.shape[0]
    x_nhwc = np.zeros((n, g.H + 2 * g.pad, g.W + 2 * g.pad, g.C), dtype=x.dtype)   # (n, Hp, Wp, C)
    x_nhwc[:, g.pad:g.pad + g.H, g.pad:g.pad + g.W] = x.transpose(0, 2, 3, 1)
    windows = sliding_window_view(x_nhwc, (g.R, g.S), axis=(1, 2))
    windows = windows[:, ::g.stride, ::g.stride]                        # (n, P, Q, C, R, S)
    windows = windows.reshape(n, g.P, g.Q, g.G, g.Cg, g.R, g.S)
    cols = np.ascontiguousarray(windows.transpose(3, 0, 1, 2, 5, 6, 4))   # (G, n, P, Q, R, S, Cg)
    return cols.reshape(g.G, n * g.P * g.Q, g.R * g.S * g.Cg)


def _col2im_last(cols, dx, g):
    # cols: (G, n*P*Q, R*S*Cg) -> dx: (n, C, H, W), each entry added back where im2col read it
    n = dx.shape[0]
    cols = cols.reshape(g.G, n, g.P, g.Q, g.R, g.S, g.Cg)
    dxp = np.zeros((n, g.H + 2 * g.pad, g.W + 2 * g.pad, g.G, g.Cg), dtype=cols.dtype)  # NHWC
    for r in range(g.R):
        for s in range(g.S):
            dxp_window = g.window_offset(dxp, r, s, (1, 2))             # (n, P, Q, G, Cg)
            dxp_window += cols[:, :, :, :, r, s].transpose(1, 2, 3, 0, 4)
    dx_nhwc = dxp[:, g.pad:g.pad + g.H, g.pad:g.pad + g.W].reshape(n, g.H, g.W, g.C)
    dx[...] = dx_nhwc.transpose(0, 3, 1, 2)


def _weights_last(w, g):
    # w: (K, Cg, R, S) -> (G, Kg, R*S*Cg), the column order of _im2col_last
    return w.reshape(g.G, g.Kg, g.Cg, g.R, g.S).transpose(0, 1, 3, 4, 2).reshape(g.G, g.Kg, -1)


# the GEMMs take the columns transposed (BLAS reads either orientation at the same speed),
# so y and dy keep the channels-first (G, Kg, n*P*Q) layout and cost no extra transpose

def _forward_last(x, w_rows, b, y, g):
    n = x.shape[0]
    y_groups = np.matmul(w_rows, _im2col_last(x, g).transpose(0, 2, 1))  # (G, Kg, n*P*Q)
    y_images = y_groups.reshape(g.K, n, g.P, g.Q).transpose(1, 0, 2, 3)  # (n, K, P, Q) view
    np.add(y_images, b.reshape(g.K, 1, 1), out=y)


def _backward_data_last(dy, w_rows, dx, g):
    dcols = np.matmul(_dy_first(dy, g).transpose(0, 2, 1), w_rows)     # (G, n*P*Q, R*S*Cg)
    _col2im_last(dcols, dx, g)


def _backward_filter_last(x, dy, g):
    dw_rows = np.matmul(_dy_first(dy, g), _im2col_last(x, g))           # (G, Kg, R*S*Cg)
    return dw_rows.reshape(g.G, g.Kg, g.R, g.S, g.Cg).transpose(0, 1, 4, 2, 3).reshape(g.K, g.Cg, g.R, g.S)


# ----------------------------------------------------------------------------- the ops

def conv_forward(x, w, b, stride, pad, groups):
    # x: (N, C, H, W)  w: (K, Cg, R, S)  b: (K,)  ->  y: (N, K, P, Q)
    g = _Geometry(x.shape, w.shape, stride, pad, groups)
    y = output((g.N, g.K, g.P, g.Q), x.dtype)
    if g.channels_last:
        w_rows = _weights_last(w, g)
        parallel_map(lambda i: _forward_last(x[i], w_rows, b, y[i], g), g.slices(x.itemsize))
    else:
        parallel_map(lambda i: _forward_first(x[i], w, b, y[i], g), g.slices(x.itemsize))
    return y


def conv_backward_data(dy, w, x_shape, stride, pad, groups):
    # dy: (N, K, P, Q)  w: (K, Cg, R, S)  ->  dx: x_shape = (N, C, H, W)
    g = _Geometry(x_shape, w.shape, stride, pad, groups)
    dx = output(x_shape, dy.dtype)
    if g.channels_last:
        w_rows = _weights_last(w, g)
        parallel_map(lambda i: _backward_data_last(dy[i], w_rows, dx[i], g), g.slices(dy.itemsize))
    else:
        parallel_map(lambda i: _backward_data_first(dy[i], w, dx[i], g), g.slices(dy.itemsize))
    return dx


def conv_backward_filter(x, dy, w_shape, stride, pad, groups, out=None):
    # x: (N, C, H, W)  dy: (N, K, P, Q)  ->  dw: w_shape = (K, Cg, R, S), summed over the batch
    g = _Geometry(x.shape, w_shape, stride, pad, groups)
    backward = _backward_filter_last if g.channels_last else _backward_filter_first
    dw = parallel_sum(lambda i: backward(x[i], dy[i], g), g.slices(x.itemsize))
    if out is None:
        return dw
    out = given_or_new(out, dw.shape, dw.dtype, "conv_backward_filter")
    out[...] = dw
    return out


def conv_backward_bias(dy, out=None):
    # dy: (N, K, P, Q) -> db: (K,)
    db = given_or_new(out, (dy.shape[1],), dy.dtype, "conv_backward_bias")
    return dy.sum(axis=(0, 2, 3), out=db)
