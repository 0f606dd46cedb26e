"""Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).

Convention (Caffe, PyTorch's local_response_norm, cuDNN): alpha is divided by the window size,

    d[c] = k + (alpha / size) * sum_{c' in window(c)} x[c']^2
    y[c] = x[c] / d[c] ** beta

window(c) = channels c - size//2 .. c + (size-1)//2, clipped at the edges. The 2012 paper
writes alpha without the /size; its AlexNet values are k=2, size=5, alpha=1e-4, beta=0.75.

Backward, by the product and chain rules (i runs over the channels whose window holds c):

    dx[c] = dy[c] * d[c]**-beta  -  (2 * alpha * beta / size) * x[c] * sum_i dy[i] * y[i] / d[i]

The sum over i is a window sum with the window mirrored (c - (size-1)//2 .. c + size//2).
"""
import numpy as np


def channel_window_sum(a, before, after):
    """out[:, c] = sum of a[:, c'] for c' in c - before .. c + after, clipped to 0..C-1.

    a: (N, C, H, W). A running sum over channels: each channel costs one add and one
    subtract of an (N, H, W) slice, whatever the window size.
    """
    C = a.shape[1]
    out = np.empty_like(a)
    running = np.zeros_like(a[:, 0])                      # (N, H, W)
    for c in range(min(after, C - 1) + 1):                # window of channel 0: 0 .. after
        running += a[:, c]
    for c in range(C):
        out[:, c] = running
        entering, leaving = c + 1 + after, c - before
        if entering < C:
            running += a[:, entering]
        if leaving >= 0:
            running -= a[:, leaving]
    return out


def _power_neg(d, beta):
    """d ** -beta; for AlexNet's beta = 0.75 through square roots, exact and cheaper than pow."""
    if beta == 0.75:
        root = np.sqrt(d)
        root *= np.sqrt(root)                             # d ** 0.75
        return np.reciprocal(root, out=root)
    return d ** -beta


def _denominator(x, size, alpha, k):
    # x: (N, C, H, W) -> d: (N, C, H, W), d = k + alpha/size * window sum of x^2
    d = channel_window_sum(x * x, size // 2, (size - 1) // 2)
    d *= alpha / size
    d += k
    return d


def lrn_forward(x, size, alpha, beta, k):
    # x: (N, C, H, W) -> y: (N, C, H, W)
    d = _denominator(x, size, alpha, k)
    return x * _power_neg(d, beta)


def lrn_backward(x, y, dy, size, alpha, beta, k):
    # x, y, dy: (N, C, H, W) -> dx: (N, C, H, W)
    d = _denominator(x, size, alpha, k)
    ratio = dy * y / d                                    # dy[i] * y[i] / d[i]
    mirrored = channel_window_sum(ratio, (size - 1) // 2, size // 2)
    dx = dy * _power_neg(d, beta)
    dx -= (2 * alpha * beta / size) * x * mirrored
    return dx
