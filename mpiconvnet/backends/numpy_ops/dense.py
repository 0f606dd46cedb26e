"""Fully connected layers (PyTorch's nn.Linear layout), softmax cross-entropy, top-k counts.

BLAS runs single-threaded (threads.py), so each GEMM is split into blocks on the thread pool,
always along a dimension of the weight matrix (output features for y and dw, input features
for dx): each block then reads its own part of the 4096 x 9216 weights once, where blocks of
batch rows would each stream all of them through the cache again.
"""
import numpy as np

from mpiconvnet.backends import mean_loss
from mpiconvnet.backends.numpy_ops.threads import get_num_threads, given_or_new, output, parallel_map

# a few blocks per thread: a thread the OS deschedules delays one block, not half the GEMM
BLOCKS_PER_THREAD = 4


def _blocks(length):
    count = min(length, BLOCKS_PER_THREAD * get_num_threads()) if get_num_threads() > 1 else 1
    bounds = np.linspace(0, length, count + 1).astype(int)
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def linear_forward(x, w, b):
    # x: (N, F)  w: (O, F)  b: (O,) -> y: (N, O) = x @ w.T + b
    y = output((x.shape[0], w.shape[0]), x.dtype)

    def forward(features):
        np.matmul(x, w[features].T, out=y[:, features])
        y[:, features] += b[features]
    parallel_map(forward, _blocks(w.shape[0]))
    return y


def linear_backward_data(dy, w):
    # dy: (N, O)  w: (O, F) -> dx: (N, F) = dy @ w
    dx = output((dy.shape[0], w.shape[1]), dy.dtype)
    parallel_map(lambda features: np.matmul(dy, w[:, features], out=dx[:, features]), _blocks(w.shape[1]))
    return dx


def linear_backward_filter(x, dy, out=None):
    # x: (N, F)  dy: (N, O) -> dw: (O, F) = dy.T @ x
    dw = given_or_new(out, (dy.shape[1], x.shape[1]), x.dtype, "linear_backward_filter")
    parallel_map(lambda features: np.matmul(dy[:, features].T, x, out=dw[features]), _blocks(dy.shape[1]))
    return dw


def linear_backward_bias(dy, out=None):
    # dy: (N, O) -> db: (O,)
    db = given_or_new(out, (dy.shape[1],), dy.dtype, "linear_backward_bias")
    return dy.sum(axis=0, out=db)


def _check_labels(logits, labels):
    N, classes = logits.shape
    if labels.shape != (N,):
        raise ValueError(f"labels of shape {labels.shape} do not match logits of shape {logits.shape}; "
                         f"need one label per row")
    if N and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in 0..{classes - 1} for {classes} classes; "
                         f"got {labels.min()}..{labels.max()} (check the data set's class count)")


def softmax_cross_entropy_rows(logits, labels):
    # logits: (N, classes)  labels: (N,) int -> loss_rows: (N,), dlogits: (N, classes), the
    # gradient of the rows' mean
    _check_labels(logits, labels)
    N = logits.shape[0]
    rows = np.arange(N)
    shifted = logits - logits.max(axis=1, keepdims=True)   # max shift: exp never overflows
    exp = np.exp(shifted)
    total = exp.sum(axis=1)                                 # (N,), >= 1
    loss_rows = np.log(total) - shifted[rows, labels]
    dlogits = exp
    dlogits /= total[:, None]                               # softmax
    dlogits[rows, labels] -= 1
    dlogits /= N
    return loss_rows, dlogits


def softmax_cross_entropy(logits, labels):
    # -> loss: float (mean over N), dlogits: (N, classes)
    loss_rows, dlogits = softmax_cross_entropy_rows(logits, labels)
    return mean_loss(loss_rows), dlogits


def topk_correct(logits, labels, ks):
    # logits: (N, classes)  labels: (N,) -> one count per k.
    # the rank of the true class is the number of classes scoring strictly higher, so a
    # tie with the true class counts in its favour.
    _check_labels(logits, labels)
    true_score = logits[np.arange(logits.shape[0]), labels]
    rank = (logits > true_score[:, None]).sum(axis=1)      # (N,)
    return tuple(int((rank < k).sum()) for k in ks)
