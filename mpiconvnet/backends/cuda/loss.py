"""Softmax cross-entropy and top-k counts (loss.cu), one warp per row of the logits.

logits: (N, classes)  labels: host int64 (N,)
"""
import numpy as np

from .. import mean_loss
from . import context
from .memory import empty, to_device, to_host


def _labels_on_device(labels, n, classes):
    host = np.asarray(labels)
    if host.shape != (n,):
        raise ValueError(f"labels have shape {host.shape}, expected ({n},)")
    if host.size and (host.min() < 0 or host.max() >= classes):
        raise ValueError(f"labels must lie in 0..{classes - 1}; got {host.min()}..{host.max()}")
    return to_device(host.astype(np.int64, copy=False))


def softmax_cross_entropy_rows(logits, labels):
    """(each row's loss, on the GPU; dlogits = (softmax - onehot) / N). Nothing waits."""
    st = context.get()
    n, classes = (int(s) for s in logits.shape)
    labels_d = _labels_on_device(labels, n, classes)
    loss_rows = empty((n,), logits.dtype)
    dlogits = empty(logits.shape, logits.dtype)
    st.launch_warps("softmax_xent", logits.dtype, n, loss_rows.ptr, dlogits.ptr, logits.ptr, labels_d.ptr, n, classes,
                    1.0 / n)
    return loss_rows, dlogits


def softmax_cross_entropy(logits, labels):
    """(mean loss as a Python float, dlogits = (softmax - onehot) / N)."""
    loss_rows, dlogits = softmax_cross_entropy_rows(logits, labels)
    # the mean in float64 on the host: N values, and the order of the sum is fixed
    return mean_loss(to_host(loss_rows)), dlogits


def topk_correct(logits, labels, ks):
    """How many labels are among the top k logits of their row, for each k in ks."""
    st = context.get()
    n, classes = (int(s) for s in logits.shape)
    labels_d = _labels_on_device(labels, n, classes)
    ranks = empty((n,), np.int32)
    st.launch_warps("label_rank", logits.dtype, n, ranks.ptr, logits.ptr, labels_d.ptr, n, classes)
    host_ranks = to_host(ranks)
    return tuple(int((host_ranks < int(k)).sum()) for k in ks)
