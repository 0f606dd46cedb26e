"""Max pooling without padding, output sizes by floor division (Caffe's ceil mode is not used:
AlexNet's 55 -> 27 -> 13 -> 6 come out the same either way for 3/2 pooling).

Both directions walk the size x size window offsets (r, s) in row-major order; at each offset
a strided view of the input holds that element of every window. The batch is processed in
slices of a few images, one per thread (threads.split).
"""
import numpy as np

from mpiconvnet.backends.numpy_ops.threads import output, parallel_map, split


def pool_output_size(size, window, stride):
    return (size - window) // stride + 1


def _window_offset(x, r, s, stride, P, Q):
    # the (n, C, P, Q) strided view of x holding window element (r, s) of every window
    return x[:, :, r:r + stride * (P - 1) + 1:stride, s:s + stride * (Q - 1) + 1:stride]


def _output_size(x_shape, size, stride):
    H, W = x_shape[2:]
    P, Q = pool_output_size(H, size, stride), pool_output_size(W, size, stride)
    if P < 1 or Q < 1:
        raise ValueError(f"maxpool: a {size}x{size} window does not fit a {H}x{W} input; "
                         f"pool a larger feature map or use a smaller window")
    return P, Q


def maxpool_forward(x, size, stride):
    # x: (N, C, H, W) -> y: (N, C, P, Q), y = max over each size x size window
    N, C = x.shape[:2]
    P, Q = _output_size(x.shape, size, stride)
    y = output((N, C, P, Q), x.dtype)

    def forward(images):
        x_, y_ = x[images], y[images]
        y_[...] = _window_offset(x_, 0, 0, stride, P, Q)
        for r in range(size):
            for s in range(size):
                np.maximum(y_, _window_offset(x_, r, s, stride, P, Q), out=y_)

    parallel_map(forward, split(N, x[0].nbytes))
    return y


def maxpool_backward(x, y, dy, size, stride):
    # x: (N, C, H, W)  y, dy: (N, C, P, Q) -> dx: (N, C, H, W)
    # the gradient of each window goes to its first maximum in row-major order (r, then s):
    # `unclaimed` holds the gradient of the windows whose maximum has not been met yet.
    P, Q = y.shape[2:]
    dx = output(x.shape, x.dtype)

    def backward(images):
        x_, y_, dx_ = x[images], y[images], dx[images]
        dx_[...] = 0
        unclaimed = dy[images].copy()                     # (n, C, P, Q)
        for r in range(size):
            for s in range(size):
                is_max = _window_offset(x_, r, s, stride, P, Q) == y_
                gradient = unclaimed * is_max               # the first maximum takes it all
                unclaimed -= gradient
                # for fixed (r, s) the windows read distinct pixels, so this add has no overlaps
                dx_window = _window_offset(dx_, r, s, stride, P, Q)
                dx_window += gradient

    parallel_map(backward, split(x.shape[0], x[0].nbytes * 2))
    return dx
