"""Max pooling without padding, output sizes by floor division (Caffe's ceil mode is not used:
AlexNet's 55 -> 27 -> 13 -> 6 come out the same either way for 3/2 pooling)."""
import numpy as np


def pool_output_size(size, window, stride):
    return (size - window) // stride + 1


def _window_offset(x, r, s, stride, P, Q):
    # the (N, C, P, Q) strided view of x holding window element (r, s) of every window
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
    P, Q = _output_size(x.shape, size, stride)
    y = _window_offset(x, 0, 0, stride, P, Q).copy()
    for r in range(size):
        for s in range(size):
            np.maximum(y, _window_offset(x, r, s, stride, P, Q), out=y)
    return y


def maxpool_backward(x, y, dy, size, stride):
    # x: (N, C, H, W)  y, dy: (N, C, P, Q) -> dx: (N, C, H, W)
    # the gradient of each window goes to its first maximum in row-major order (r, then s);
    # `unclaimed` marks the windows whose maximum has not been met yet.
    P, Q = y.shape[2:]
    dx = np.zeros_like(x)
    unclaimed = np.ones(y.shape, dtype=bool)
    for r in range(size):
        for s in range(size):
            is_first_max = (_window_offset(x, r, s, stride, P, Q) == y) & unclaimed
            unclaimed &= ~is_first_max
            # for fixed (r, s) the windows read distinct pixels, so this add has no overlaps
            dx_window = _window_offset(dx, r, s, stride, P, Q)
            dx_window += np.where(is_first_max, dy, 0)
    return dx
