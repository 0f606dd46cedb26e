"""Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).

Convention (Caffe, PyTorch's local_response_norm, cuDNN): alpha is divided by the window size,

    d[c] = k + (alpha / size) * sum_{c' in window(c)} x[c']^2
    y[c] = x[c] / d[c] ** beta

window(c) = channels c - size//2 .. c + (size-1)//2, clipped at the edges. The 2012 paper
writes alpha without the /size; its AlexNet values are k=2, size=5, alpha=1e-4, beta=0.75.

Backward, by the product and chain rules (i runs over the channels whose window holds c):

    dx[c] = dy[c] * d[c]**-beta  -  (2 * alpha * beta / size) * x[c] * sum_i dy[i] * y[i] / d[i]

The sum over i is a window sum with the window mirrored (c - (size-1)//2 .. c + size//2).
The batch is processed in slices of a few images, one per thread (threads.split).
"""
import numpy as np

from mpiconvnet.backends.numpy_ops.threads import output, parallel_map, split


def channel_window_sum(a, before, after):
    """out[:, c] = sum of a[:, c'] for c' in c - before .. c + after, clipped to 0..C-1.

    a: (n, C, H, W); one shifted add of the whole array per window offset.
    """
    out = a.copy()
    for offset in range(1, after + 1):                     # channels after c
        out[:, :-offset] += a[:, offset:]
    for offset in range(1, before + 1):                    # channels before c
        out[:, offset:] += a[:, :-offset]
    return out


def _power(d, beta):
    """d ** beta; for AlexNet's beta = 0.75 through square roots, exact and cheaper than pow."""
    if beta == 0.75:
        root = np.sqrt(d)
        root *= np.sqrt(root)                              # d**0.5 * d**0.25
        return root
    return d ** beta


def _denominator(x, size, alpha, k):
    # x: (n, C, H, W) -> d: (n, C, H, W), d = k + alpha/size * window sum of x^2
    d = channel_window_sum(x * x, size // 2, (size - 1) // 2)
    d *= alpha / size
    d += k
    return d


def lrn_forward(x, size, alpha, beta, k):
    # x: (N, C, H, W) -> y: (N, C, H, W)
    y = output(x.shape, x.dtype)

    def forward(images):
        np.divide(x[images], _power(_denominator(x[images], size, alpha, k), beta), out=y[images])

    parallel_map(forward, split(x.shape[0], x[0].nbytes * 4))
    return y


def lrn_backward(x, y, dy, size, alpha, beta, k):
    # x, y, dy: (N, C, H, W) -> dx: (N, C, H, W)
    dx = output(x.shape, x.dtype)

    def backward(images):
        x_, y_, dy_ = x[images], y[images], dy[images]
        d = _denominator(x_, size, alpha, k)
        ratio = dy_ * y_
        ratio /= d                                         # dy[i] * y[i] / d[i]
        mirrored = channel_window_sum(ratio, (size - 1) // 2, size // 2)
        mirrored *= x_
        mirrored *= 2 * alpha * beta / size
        np.divide(dy_, _power(d, beta), out=dx[images])
        dx[images] -= mirrored

    parallel_map(backward, split(x.shape[0], x[0].nbytes * 6))
    return dx
