"""Fully connected layers (PyTorch's nn.Linear layout), softmax cross-entropy, top-k counts."""
import numpy as np


def linear_forward(x, w, b):
    # x: (N, F)  w: (O, F)  b: (O,) -> y: (N, O)
    y = x @ w.T
    y += b
    return y


def linear_backward_data(dy, w):
    # dy: (N, O)  w: (O, F) -> dx: (N, F)
    return dy @ w


def linear_backward_filter(x, dy):
    # x: (N, F)  dy: (N, O) -> dw: (O, F)
    return dy.T @ x


def linear_backward_bias(dy):
    # dy: (N, O) -> db: (O,)
    return dy.sum(axis=0)


def _check_labels(logits, labels):
    N, classes = logits.shape
    if labels.shape != (N,):
        raise ValueError(f"labels of shape {labels.shape} do not match logits of shape {logits.shape}; "
                         f"need one label per row")
    if N and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in 0..{classes - 1} for {classes} classes; "
                         f"got {labels.min()}..{labels.max()} (check the data set's class count)")


def softmax_cross_entropy(logits, labels):
    # logits: (N, classes)  labels: (N,) int -> loss: float (mean over N), dlogits: (N, classes)
    _check_labels(logits, labels)
    N = logits.shape[0]
    rows = np.arange(N)
    shifted = logits - logits.max(axis=1, keepdims=True)   # max shift: exp never overflows
    exp = np.exp(shifted)
    total = exp.sum(axis=1)                                 # (N,), >= 1
    loss = float(np.mean(np.log(total) - shifted[rows, labels]))
    dlogits = exp
    dlogits /= total[:, None]                               # softmax
    dlogits[rows, labels] -= 1
    dlogits /= N
    return loss, dlogits


def topk_correct(logits, labels, ks):
    # logits: (N, classes)  labels: (N,) -> one count per k.
    # the rank of the true class is the number of classes scoring strictly higher, so a
    # tie with the true class counts in its favour.
    _check_labels(logits, labels)
    true_score = logits[np.arange(logits.shape[0]), labels]
    rank = (logits > true_score[:, None]).sum(axis=1)      # (N,)
    return tuple(int((rank < k).sum()) for k in ks)
