"""ReLU, in slices of the batch on the thread pool (memory-bound: one pass each way)."""
import numpy as np

from mpiconvnet.backends.numpy_ops.threads import output, parallel_map, split


def relu_forward(x):
    # x: (N, ...) -> y: (N, ...), max(x, 0)
    y = output(x.shape, x.dtype)
    parallel_map(lambda rows: np.maximum(x[rows], 0, out=y[rows]), split(x.shape[0], x[0].nbytes))
    return y


def relu_backward(y, dy):
    # y, dy: (N, ...) -> dx: (N, ...), dy where the unit was active (y > 0), else 0
    dx = output(dy.shape, dy.dtype)
    # multiplying by the boolean mask is several times faster than np.where
    parallel_map(lambda rows: np.multiply(dy[rows], y[rows] > 0, out=dx[rows]), split(dy.shape[0], dy[0].nbytes))
    return dx
