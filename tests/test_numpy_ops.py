"""The NumPy backend, the reference for every op: finite-difference gradients in float64,
each fast formulation against a naive loop written here, and the conventions pinned against
PyTorch (skipped where torch does not import).

    OMP_NUM_THREADS=1 pytest tests/test_numpy_ops.py
"""
import subprocess
import sys

import numpy as np
import pytest

import mpiconvnet.backends.numpy_backend as B
from mpiconvnet.backends.numpy_ops import threads
from mpiconvnet.backends.numpy_ops.conv import _Geometry
from mpiconvnet.backends.numpy_ops.dropout import mix32
from tests.gradcheck import check_gradient
from tests.tolerances import ELEMENTWISE_F32, FLOAT64, REDUCTION_F32

ALEXNET_LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Ops fill their outputs slice by slice: start them as NaN so a missed slice shows."""
    monkeypatch.setattr(threads, "POISON_OUTPUTS", True)


@pytest.fixture(params=["one-slice", "sliced-2-threads"])
def slicing(request, monkeypatch):
    """Run an op on the whole batch at once, or one image per slice over two threads."""
    if request.param == "sliced-2-threads":
        monkeypatch.setattr(threads, "CHUNK_BYTES", 1)
        B.set_num_threads(2)
        yield request.param
        B.set_num_threads(1)
    else:
        yield request.param


def away_from_zero(rng, shape, margin=0.1):
    """Random values with |x| >= margin: a finite-difference step never crosses a ReLU kink."""
    return rng.choice([-1.0, 1.0], size=shape) * (margin + rng.random(shape))


def distinct_values(rng, shape, gap=1e-2):
    """Random values at least `gap` apart: a max-pool window never has a near tie."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * gap + rng.random(n) * gap / 10).reshape(shape)


# ----------------------------------------------------------------------- naive references

def naive_conv(x, w, b, stride, pad, groups):
    # x: (N, C, H, W)  w: (K, Cg, R, S) -> y: (N, K, P, Q); seven loops, straight from the definition
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    Kg = K // groups
    P, Q = (H + 2 * pad - R) // stride + 1, (W + 2 * pad - S) // stride + 1
    y = np.zeros((N, K, P, Q), dtype=x.dtype)
    for n in range(N):
        for k in range(K):
            g = k // Kg
            for p in range(P):
                for q in range(Q):
                    total = b[k]
                    for c in range(Cg):
                        for r in range(R):
                            for s in range(S):
                                i, j = p * stride + r - pad, q * stride + s - pad
                                if 0 <= i < H and 0 <= j < W:
                                    total += w[k, c, r, s] * x[n, g * Cg + c, i, j]
                    y[n, k, p, q] = total
    return y


def naive_conv_backward(x, w, dy, stride, pad, groups):
    # the same seven loops, scattering dy back to dx and dw
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    Kg = K // groups
    P, Q = dy.shape[2:]
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for n in range(N):
        for k in range(K):
            g = k // Kg
            for p in range(P):
                for q in range(Q):
                    for c in range(Cg):
                        for r in range(R):
                            for s in range(S):
                                i, j = p * stride + r - pad, q * stride + s - pad
                                if 0 <= i < H and 0 <= j < W:
                                    dx[n, g * Cg + c, i, j] += w[k, c, r, s] * dy[n, k, p, q]
                                    dw[k, c, r, s] += x[n, g * Cg + c, i, j] * dy[n, k, p, q]
    return dx, dw


def naive_maxpool(x, dy, size, stride):
    # forward max and backward to the first maximum of each window in row-major order
    N, C, H, W = x.shape
    P, Q = (H - size) // stride + 1, (W - size) // stride + 1
    y = np.zeros((N, C, P, Q), dtype=x.dtype)
    dx = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for p in range(P):
                for q in range(Q):
                    window = x[n, c, p * stride:p * stride + size, q * stride:q * stride + size]
                    y[n, c, p, q] = window.max()
                    r, s = divmod(int(np.argmax(window)), size)   # argmax: first occurrence
                    dx[n, c, p * stride + r, q * stride + s] += dy[n, c, p, q]
    return y, dx


def naive_lrn(x, dy, size, alpha, beta, k):
    # per-channel loops over the window; backward from the explicit Jacobian sum
    N, C = x.shape[:2]
    window = [range(max(0, c - size // 2), min(C, c + (size - 1) // 2 + 1)) for c in range(C)]
    d = np.stack([k + alpha / size * sum(x[:, j] ** 2 for j in window[c]) for c in range(C)], axis=1)
    y = x / d ** beta
    dx = dy * d ** -beta
    for j in range(C):
        for i in range(C):
            if j in window[i]:
                # d y[i] / d x[j] through d[i]: -beta * x[i] * d[i]^(-beta-1) * alpha/size * 2 x[j]
                dx[:, j] -= dy[:, i] * x[:, i] * beta * d[:, i] ** (-beta - 1) * alpha / size * 2 * x[:, j]
    return y, dx


# ----------------------------------------------------------------------- gradient checks

# (channels, height, width, stride, pad, groups) covering both im2col layouts of conv.py:
# channels last where a group has more channels than a row has pixels
CONV_CASES = [
    (4, 7, 6, 2, 1, 2, "first"),
    (4, 7, 6, 1, 0, 1, "first"),
    (4, 7, 6, 3, 2, 2, "first"),
    (20, 5, 4, 1, 1, 2, "last"),
    (10, 5, 4, 1, 1, 2, "last"),
    (12, 5, 5, 1, 0, 1, "last"),
    (8, 6, 5, 2, 1, 1, "last"),
]


def conv_case(rng, C, H, W, stride, pad, groups, layout):
    x = rng.standard_normal((2, C, H, W))
    w = rng.standard_normal((6, C // groups, 3, 3))
    b = rng.standard_normal(6)
    assert _Geometry(x.shape, w.shape, stride, pad, groups).channels_last == (layout == "last")
    return x, w, b


@pytest.mark.parametrize("C,H,W,stride,pad,groups,layout", CONV_CASES)
def test_conv_gradients(rng, C, H, W, stride, pad, groups, layout):
    x, w, b = conv_case(rng, C, H, W, stride, pad, groups, layout)
    y = B.conv_forward(x, w, b, stride, pad, groups)
    dy = rng.standard_normal(y.shape)
    check_gradient(lambda x_: np.sum(B.conv_forward(x_, w, b, stride, pad, groups) * dy), x,
                   B.conv_backward_data(dy, w, x.shape, stride, pad, groups))
    check_gradient(lambda w_: np.sum(B.conv_forward(x, w_, b, stride, pad, groups) * dy), w,
                   B.conv_backward_filter(x, dy, w.shape, stride, pad, groups))
    check_gradient(lambda b_: np.sum(B.conv_forward(x, w, b_, stride, pad, groups) * dy), b,
                   B.conv_backward_bias(dy))


def test_relu_gradient(rng):
    x = away_from_zero(rng, (3, 4, 5))
    dy = rng.standard_normal(x.shape)
    check_gradient(lambda x_: np.sum(B.relu_forward(x_) * dy), x, B.relu_backward(B.relu_forward(x), dy))


@pytest.mark.parametrize("lrn", [
    ALEXNET_LRN,
    dict(size=5, alpha=0.5, beta=0.75, k=1.0),     # a large alpha: the cross-channel term matters
    dict(size=4, alpha=0.8, beta=0.6, k=1.5),      # even size (asymmetric window), general beta
])
def test_lrn_gradient(rng, lrn):
    x = rng.standard_normal((2, 7, 3, 4))
    dy = rng.standard_normal(x.shape)
    y = B.lrn_forward(x, **lrn)
    check_gradient(lambda x_: np.sum(B.lrn_forward(x_, **lrn) * dy), x, B.lrn_backward(x, y, dy, **lrn))


@pytest.mark.parametrize("size,stride", [(3, 2), (2, 2), (3, 1)])
def test_maxpool_gradient(rng, size, stride):
    x = distinct_values(rng, (2, 3, 7, 7))
    y = B.maxpool_forward(x, size, stride)
    dy = rng.standard_normal(y.shape)
    check_gradient(lambda x_: np.sum(B.maxpool_forward(x_, size, stride) * dy), x,
                   B.maxpool_backward(x, y, dy, size, stride))


def test_dropout_gradient(rng):
    x = rng.standard_normal((4, 10))
    dy = rng.standard_normal(x.shape)
    _, mask = B.dropout_forward(x, 0.5, seed=7, counter=3)
    assert 0 < mask.sum() < mask.size
    check_gradient(lambda x_: np.sum(B.dropout_forward(x_, 0.5, seed=7, counter=3)[0] * dy), x,
                   B.dropout_backward(dy, mask, 0.5))


def test_linear_gradients(rng):
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    dy = rng.standard_normal((3, 4))
    check_gradient(lambda x_: np.sum(B.linear_forward(x_, w, b) * dy), x, B.linear_backward_data(dy, w))
    check_gradient(lambda w_: np.sum(B.linear_forward(x, w_, b) * dy), w, B.linear_backward_filter(x, dy))
    check_gradient(lambda b_: np.sum(B.linear_forward(x, w, b_) * dy), b, B.linear_backward_bias(dy))


def test_softmax_cross_entropy_gradient(rng):
    logits = rng.standard_normal((4, 6)) * 3
    labels = np.array([0, 5, 2, 2])
    loss, dlogits = B.softmax_cross_entropy(logits, labels)
    assert isinstance(loss, float)
    check_gradient(lambda z: B.softmax_cross_entropy(z, labels)[0], logits, dlogits)


# ----------------------------------------------------------------------- fast vs naive loops

@pytest.mark.parametrize("C,H,W,stride,pad,groups,layout", CONV_CASES + [(4, 9, 8, 4, 1, 2, "first")])
def test_conv_matches_loops(rng, C, H, W, stride, pad, groups, layout, slicing):
    x, w, b = conv_case(rng, C, H, W, stride, pad, groups, layout)
    y = B.conv_forward(x, w, b, stride, pad, groups)
    np.testing.assert_allclose(y, naive_conv(x, w, b, stride, pad, groups), **FLOAT64)
    dy = rng.standard_normal(y.shape)
    dx, dw = naive_conv_backward(x, w, dy, stride, pad, groups)
    np.testing.assert_allclose(B.conv_backward_data(dy, w, x.shape, stride, pad, groups), dx, **FLOAT64)
    np.testing.assert_allclose(B.conv_backward_filter(x, dy, w.shape, stride, pad, groups), dw, **FLOAT64)
    np.testing.assert_allclose(B.conv_backward_bias(dy), dy.sum(axis=(0, 2, 3)), **FLOAT64)


def test_relu_matches_definition(rng, slicing):
    x = away_from_zero(rng, (5, 3, 4, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y = B.relu_forward(x)
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
    np.testing.assert_array_equal(B.relu_backward(y, dy), np.where(x > 0, dy, 0))


@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_maxpool_matches_loops(rng, values, slicing):
    shape = (2, 3, 9, 9)
    # small integers make many ties: the gradient must go to the first maximum
    x = distinct_values(rng, shape) if values == "distinct" else rng.integers(0, 3, shape).astype(np.float64)
    y = B.maxpool_forward(x, 3, 2)
    dy = rng.standard_normal(y.shape)
    y_loop, dx_loop = naive_maxpool(x, dy, 3, 2)
    np.testing.assert_array_equal(y, y_loop)
    np.testing.assert_allclose(B.maxpool_backward(x, y, dy, 3, 2), dx_loop, **FLOAT64)


@pytest.mark.parametrize("lrn", [ALEXNET_LRN, dict(size=4, alpha=0.8, beta=0.6, k=1.5),
                                 dict(size=3, alpha=2.0, beta=0.75, k=1.0)])
def test_lrn_matches_loops(rng, lrn, slicing):
    x = rng.standard_normal((2, 9, 3, 3)) * 3
    dy = rng.standard_normal(x.shape)
    y = B.lrn_forward(x, **lrn)
    y_loop, dx_loop = naive_lrn(x, dy, **lrn)
    np.testing.assert_allclose(y, y_loop, **FLOAT64)
    np.testing.assert_allclose(B.lrn_backward(x, y, dy, **lrn), dx_loop, **FLOAT64)


# ----------------------------------------------------------------------- sizes and dtypes

def test_alexnet_output_sizes():
    x = np.zeros((1, 1, 227, 227), dtype=np.float32)
    conv1 = B.conv_forward(x, np.zeros((1, 1, 11, 11), np.float32), np.zeros(1, np.float32), 4, 0, 1)
    assert conv1.shape[2:] == (55, 55)
    pool1 = B.maxpool_forward(conv1, 3, 2)
    assert pool1.shape[2:] == (27, 27)
    conv2 = B.conv_forward(pool1, np.zeros((1, 1, 5, 5), np.float32), np.zeros(1, np.float32), 1, 2, 1)
    assert conv2.shape[2:] == (27, 27)
    pool2 = B.maxpool_forward(conv2, 3, 2)
    assert pool2.shape[2:] == (13, 13)
    conv3 = B.conv_forward(pool2, np.zeros((1, 1, 3, 3), np.float32), np.zeros(1, np.float32), 1, 1, 1)
    assert conv3.shape[2:] == (13, 13)
    assert B.maxpool_forward(conv3, 3, 2).shape[2:] == (6, 6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(rng, dtype):
    make = lambda *shape: rng.standard_normal(shape).astype(dtype)
    x, w, b = make(2, 4, 8, 8), make(6, 2, 3, 3), make(6)
    y = B.conv_forward(x, w, b, 1, 1, 2)
    outputs = [y, B.conv_backward_data(y, w, x.shape, 1, 1, 2), B.conv_backward_filter(x, y, w.shape, 1, 1, 2),
               B.conv_backward_bias(y), B.relu_forward(x), B.relu_backward(x, x),
               B.lrn_forward(x, **ALEXNET_LRN), B.lrn_backward(x, x, x, **ALEXNET_LRN),
               B.maxpool_forward(x, 3, 2), B.maxpool_backward(x, B.maxpool_forward(x, 3, 2),
                                                             B.maxpool_forward(x, 3, 2), 3, 2),
               *B.dropout_forward(x, 0.5, 1, 2), B.dropout_backward(x, x, 0.5),
               B.linear_forward(make(3, 4), make(5, 4), make(5)), B.linear_backward_data(make(3, 5), make(5, 4)),
               B.linear_backward_filter(make(3, 4), make(3, 5)), B.linear_backward_bias(make(3, 5)),
               B.softmax_cross_entropy(make(3, 4), np.array([0, 1, 3]))[1]]
    assert [o.dtype for o in outputs] == [dtype] * len(outputs)


# ----------------------------------------------------------------------- dropout hash

def scalar_hash(seed, counter, i):
    """h(i) from the docstring (offset folded into i), in plain Python integers masked to 32 bits."""
    def mix(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    return mix(mix(mix(seed) ^ counter) ^ i)


def test_dropout_hash_matches_definition():
    seed, counter, p = 2**32 + 12345, 987654321, 0.3   # the seed is taken modulo 2**32
    keep = B.dropout_keep(seed, counter, 2000, p)
    threshold = int(p * 2**32)
    expected = [scalar_hash(seed % 2**32, counter, i) >= threshold for i in range(2000)]
    np.testing.assert_array_equal(keep, expected)
    assert mix32(np.arange(5, dtype=np.uint32)).dtype == np.uint32
    # the offset shifts the element index, wrapping modulo 2**32
    offset = 2**32 - 700
    shifted = B.dropout_keep(seed, counter, 2000, p, offset)
    expected = [scalar_hash(seed % 2**32, counter, (offset + i) % 2**32) >= threshold for i in range(2000)]
    np.testing.assert_array_equal(shifted, expected)


def test_dropout_offset_splits_the_batch():
    # two ranks with rows 0-2 and 3-5 draw exactly the rows of one rank's 6-row mask
    x = np.ones((6, 50), dtype=np.float32)
    _, whole = B.dropout_forward(x, 0.5, seed=3, counter=9)
    _, top = B.dropout_forward(x[:3], 0.5, seed=3, counter=9, offset=0)
    _, bottom = B.dropout_forward(x[3:], 0.5, seed=3, counter=9, offset=3 * 50)
    np.testing.assert_array_equal(np.concatenate([top, bottom]), whole)


@pytest.mark.parametrize("trial", range(4))
def test_dropout_row_stride_splits_the_columns(trial):
    # ranks holding column slices of a (B, H) activation draw exactly the columns of the
    # mask one rank holding the whole matrix draws (offset = first column + the sample
    # offset, row_stride = H); the sample offset near 2**32 makes the index wrap
    rng = np.random.default_rng(trial)
    rows, width = int(rng.integers(1, 9)), int(rng.integers(6, 70))
    sample_offset = int(rng.choice([0, int(rng.integers(0, 10**6)), 2**32 - int(rng.integers(1, 200))]))
    seed, counter, p = int(rng.integers(0, 2**40)), int(rng.integers(0, 2**33)), float(rng.uniform(0.1, 0.9))
    x = rng.standard_normal((rows, width)).astype(np.float32)
    y_whole, whole = B.dropout_forward(x, p, seed, counter, sample_offset)
    # the whole matrix with row_stride = its own width is the plain flat-index mask
    np.testing.assert_array_equal(B.dropout_forward(x, p, seed, counter, sample_offset, row_stride=width)[1], whole)
    parts = int(rng.integers(2, 4))
    bounds = [0, *sorted(rng.choice(np.arange(1, width), parts - 1, replace=False).tolist()), width]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        y, mask = B.dropout_forward(np.ascontiguousarray(x[:, start:stop]), p, seed, counter,
                                    sample_offset + start, row_stride=width)
        np.testing.assert_array_equal(mask, whole[:, start:stop])
        np.testing.assert_array_equal(y, y_whole[:, start:stop])
    # and the definition itself, element by element
    start = bounds[1]
    keep = B.dropout_keep(seed, counter, (rows, width - start), p, sample_offset + start, row_stride=width)
    threshold = int(p * 2**32)
    expected = [[scalar_hash(seed % 2**32, counter % 2**32, (sample_offset + start + r * width + c) % 2**32) >= threshold
                 for c in range(width - start)] for r in range(rows)]
    np.testing.assert_array_equal(keep, expected)


def test_dropout_row_stride_needs_a_matrix():
    with pytest.raises(ValueError, match=r"row_stride=12 needs a 2-D x .*\(2, 3, 4\)"):
        B.dropout_forward(np.ones((2, 3, 4), dtype=np.float32), 0.5, 1, 2, row_stride=12)


def test_dropout_masks():
    x = np.ones((1000, 1000), dtype=np.float32)
    y, mask = B.dropout_forward(x, 0.5, seed=11, counter=4)
    _, same = B.dropout_forward(x, 0.5, seed=11, counter=4)
    _, other = B.dropout_forward(x, 0.5, seed=11, counter=5)
    np.testing.assert_array_equal(mask, same)
    assert np.mean(mask != other) > 0.45                 # an independent mask differs in half the places
    assert abs(mask.mean() - 0.5) < 3e-3                 # 1e6 draws: standard error 5e-4
    assert abs(y.mean() - 1.0) < 6e-3                    # inverted scaling keeps the mean
    assert set(np.unique(y)) == {0.0, 2.0}
    assert abs(B.dropout_keep(3, 1, 10**6, 0.2).mean() - 0.8) < 3e-3
    assert B.dropout_keep(3, 1, 1000, 0.0).all()
    with pytest.raises(ValueError):
        B.dropout_forward(x, 1.0, 1, 1)


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_dropout_divides_what_it_keeps_by_the_keep_probability(p):
    # at p = 0.5, 1/p and 1/(1 - p) agree: other rates tell the inverted scaling apart
    x = np.full((400, 500), 3.0)
    y, mask = B.dropout_forward(x, p, seed=11, counter=4)
    kept = mask == 1
    assert abs(kept.mean() - (1 - p)) < 5e-3
    np.testing.assert_allclose(y[kept], 3.0 / (1 - p), rtol=1e-15)
    assert (y[~kept] == 0).all()
    assert abs(y.mean() - 3.0) < 0.03                      # the expectation is kept: 2e5 draws
    np.testing.assert_allclose(B.dropout_backward(np.ones_like(x), mask, p), mask / (1 - p), rtol=1e-15)


# ----------------------------------------------------------------------- loss, metrics, update

def test_softmax_cross_entropy_is_stable():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], dtype=np.float32)
    loss, dlogits = B.softmax_cross_entropy(logits, np.array([0, 0]))
    # row 0 is certain and right (loss 0), row 1 splits between classes 1 and 2 (loss 1e4 + ln 2)
    assert loss == pytest.approx((0 + 1e4 + np.log(2)) / 2, rel=1e-6)
    np.testing.assert_allclose(dlogits, [[0, 0, 0], [-0.5, 0.25, 0.25]], atol=1e-7)


def test_softmax_cross_entropy_value(rng):
    logits = rng.standard_normal((5, 7))
    labels = rng.integers(0, 7, 5)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss, _ = B.softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(-np.mean(np.log(softmax[np.arange(5), labels])), rel=1e-12)
    with pytest.raises(ValueError, match="labels must lie in"):
        B.softmax_cross_entropy(logits, np.array([0, 1, 2, 3, 7]))


def test_topk_correct():
    logits = np.array([[0.1, 0.5, 0.2, 0.9],     # label 3 is the top: counts for k=1 and k=2
                       [0.1, 0.5, 0.2, 0.9],     # label 1 is second: counts for k=2 only
                       [0.1, 0.5, 0.2, 0.9],     # label 0 is last: counts for neither
                       [0.3, 0.3, 0.3, 0.3]])    # all tied: the label counts as top-1
    assert B.topk_correct(logits, np.array([3, 1, 0, 2]), (1, 2)) == (2, 3)
    assert B.topk_correct(logits, np.array([3, 1, 0, 2]), (4,)) == (4,)


def test_sgd_momentum_update(rng, slicing):
    param, grad, velocity = (rng.standard_normal((5, 7)) for _ in range(3))
    lr, momentum, wd = 0.01, 0.9, 5e-4
    expected_velocity = momentum * velocity + lr * (grad + wd * param)
    expected_param = param - expected_velocity
    B.sgd_momentum_update(param, grad, velocity, lr, momentum, wd)
    np.testing.assert_allclose(velocity, expected_velocity, **FLOAT64)
    np.testing.assert_allclose(param, expected_param, **FLOAT64)
    B.scale_(param, 0.5)
    np.testing.assert_allclose(param, expected_param * 0.5, **FLOAT64)


@pytest.mark.parametrize("kind", ["train", "eval-10"])
def test_crop_flip_normalize_is_crop_batch(rng, slicing, kind):
    """The op is the augment.crop_batch reference, run over slices of the crops."""
    from mpiconvnet.data import augment
    size, crop = 12, 8
    images = rng.integers(0, 256, size=(5, size, size, 3), dtype=np.uint8)
    if kind == "train":
        plan = augment.batch_augmentation(1, 0, 2, 0, 5, 1, size, crop, pca_lighting=True)
        mean = augment.mean_as_chw(rng.uniform(0, 255, size=(size, size, 3)))
    else:
        plan = augment.eval_plan(5, size, crop, crops=10)
        mean = augment.mean_as_chw([120.0, 110.0, 90.0])
    std = np.array([60.0, 55.0, 50.0], dtype=np.float32)
    x = B.crop_flip_normalize(images, plan, crop, mean, std)
    assert x.shape == (len(plan), 3, crop, crop) and x.dtype == np.float32
    np.testing.assert_array_equal(x, augment.crop_batch(images, plan, crop, mean, std))


def test_thread_settings(monkeypatch):
    with pytest.raises(ValueError, match="at least one thread"):
        B.set_num_threads(0)
    for value, expected in [("3", 3), ("4,2", 4), ("", 1), ("zero", 1)]:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert threads._threads_from_environment() == expected
    # small items: one slice per thread; items bigger than CHUNK_BYTES: one slice each
    B.set_num_threads(2)
    try:
        assert threads.parallel_map(lambda part: list(range(10))[part], threads.split(10, 1)) == \
            [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
        assert len(threads.split(10, 1 << 30)) == 10
        assert threads.parallel_sum(lambda part: np.arange(10)[part].sum(), threads.split(10, 1 << 30)) == 45
    finally:
        B.set_num_threads(1)


def test_memory_helpers(slicing):
    flat = np.arange(10.0)
    a, b = B.flat_views(flat, [(2, 3), (4,)])
    b[:] = -1
    assert a.shape == (2, 3) and flat[6:].tolist() == [-1.0] * 4
    with pytest.raises(ValueError):
        B.flat_views(flat, [(3, 4)])
    c, d = B.flat_views(flat, [(3,), (2,)], align=4)      # d starts at element 4, not 3
    assert c.tolist() == [0.0, 1.0, 2.0] and np.shares_memory(d, flat[4:6]) and d.tolist() == [4.0, 5.0]
    with pytest.raises(ValueError):
        B.flat_views(flat, [(3,), (7,)], align=4)
    dst = B.zeros((5, 3), np.float32)
    B.copy_into(dst, np.arange(15, dtype=np.float32).reshape(5, 3))
    assert B.to_host(dst).ravel().tolist() == list(range(15))
    B.copy_into(dst[:, :2], np.ones((5, 2), np.float32))     # a strided destination
    assert dst[:, :2].sum() == 10 and dst[:, 2].tolist() == [2, 5, 8, 11, 14]
    assert B.mpi_buffer(dst) is dst and B.HOST_MEMORY


# ----------------------------------------------------------------------- against PyTorch (float32)

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _torch_grads(torch, fn, *arrays):
    """Run fn on torch copies of arrays; return the output and each input's gradient for a random dy."""
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    dy = np.random.default_rng(5).standard_normal(out.shape).astype(np.float32)
    out.backward(torch.tensor(dy))
    return out.detach().numpy(), dy, [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize("C,H,W,layout", [(6, 15, 14, "first"), (24, 9, 8, "last")])
def test_conv_matches_torch(rng, torch, C, H, W, layout, slicing):
    x = rng.standard_normal((3, C, H, W)).astype(np.float32)
    w = rng.standard_normal((8, C // 2, 5, 5)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    assert _Geometry(x.shape, w.shape, 2, 2, 2).channels_last == (layout == "last")
    y_t, dy, (dx_t, dw_t, db_t) = _torch_grads(
        torch, lambda x_, w_, b_: torch.nn.functional.conv2d(x_, w_, b_, stride=2, padding=2, groups=2), x, w, b)
    np.testing.assert_allclose(B.conv_forward(x, w, b, 2, 2, 2), y_t, **REDUCTION_F32)
    np.testing.assert_allclose(B.conv_backward_data(dy, w, x.shape, 2, 2, 2), dx_t, **REDUCTION_F32)
    np.testing.assert_allclose(B.conv_backward_filter(x, dy, w.shape, 2, 2, 2), dw_t, **REDUCTION_F32)
    np.testing.assert_allclose(B.conv_backward_bias(dy), db_t, **REDUCTION_F32)


@pytest.mark.parametrize("lrn", [ALEXNET_LRN, dict(size=4, alpha=0.8, beta=0.6, k=1.5)])
def test_lrn_matches_torch(rng, torch, lrn, slicing):
    x = (rng.standard_normal((2, 11, 5, 5)) * 4).astype(np.float32)
    y_t, dy, (dx_t,) = _torch_grads(
        torch, lambda x_: torch.nn.functional.local_response_norm(
            x_, lrn["size"], alpha=lrn["alpha"], beta=lrn["beta"], k=lrn["k"]), x)
    y = B.lrn_forward(x, **lrn)
    np.testing.assert_allclose(y, y_t, **REDUCTION_F32)     # a window sum of squares and a power
    np.testing.assert_allclose(B.lrn_backward(x, y, dy, **lrn), dx_t, **REDUCTION_F32)


def test_maxpool_matches_torch(rng, torch, slicing):
    x = distinct_values(rng, (2, 3, 13, 13)).astype(np.float32)
    y_t, dy, (dx_t,) = _torch_grads(torch, lambda x_: torch.nn.functional.max_pool2d(x_, 3, 2), x)
    y = B.maxpool_forward(x, 3, 2)
    np.testing.assert_array_equal(y, y_t)
    np.testing.assert_allclose(B.maxpool_backward(x, y, dy, 3, 2), dx_t, **ELEMENTWISE_F32)


def test_linear_matches_torch(rng, torch, slicing):
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in [(10, 20), (9, 20), (9,)])
    y_t, dy, (dx_t, dw_t, db_t) = _torch_grads(torch, torch.nn.functional.linear, x, w, b)
    np.testing.assert_allclose(B.linear_forward(x, w, b), y_t, **REDUCTION_F32)
    np.testing.assert_allclose(B.linear_backward_data(dy, w), dx_t, **REDUCTION_F32)
    np.testing.assert_allclose(B.linear_backward_filter(x, dy), dw_t, **REDUCTION_F32)
    np.testing.assert_allclose(B.linear_backward_bias(dy), db_t, **REDUCTION_F32)


def test_cross_entropy_matches_torch(rng, torch):
    logits = (rng.standard_normal((6, 10)) * 5).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    z = torch.tensor(logits, requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(z, torch.tensor(labels))
    loss_t.backward()
    loss, dlogits = B.softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(loss_t.item(), rel=REDUCTION_F32["rtol"])
    np.testing.assert_allclose(dlogits, z.grad.numpy(), **REDUCTION_F32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_written_into_given_arrays(slicing, rng, dtype):
    # what training does: each parameter's gradient goes straight into its bucket view
    x = rng.standard_normal((3, 4, 9, 9)).astype(dtype)
    dy = rng.standard_normal((3, 6, 5, 5)).astype(dtype)
    xf, dyf = rng.standard_normal((5, 7)).astype(dtype), rng.standard_normal((5, 3)).astype(dtype)
    flat = np.full(200, np.nan, dtype)
    dw, db, fw, fb = B.flat_views(flat, [(6, 2, 3, 3), (6,), (3, 7), (3,)], align=8)
    assert B.conv_backward_filter(x, dy, (6, 2, 3, 3), 2, 1, 2, out=dw) is dw
    assert B.conv_backward_bias(dy, out=db) is db
    assert B.linear_backward_filter(xf, dyf, out=fw) is fw and B.linear_backward_bias(dyf, out=fb) is fb
    np.testing.assert_array_equal(dw, B.conv_backward_filter(x, dy, (6, 2, 3, 3), 2, 1, 2))
    np.testing.assert_array_equal(db, B.conv_backward_bias(dy))
    np.testing.assert_array_equal(fw, B.linear_backward_filter(xf, dyf))
    np.testing.assert_array_equal(fb, B.linear_backward_bias(dyf))
    with pytest.raises(ValueError, match=r"linear_backward_bias: out has shape \(4,\)"):
        B.linear_backward_bias(dyf, out=np.zeros(4, dtype))
    with pytest.raises(ValueError, match="conv_backward_filter: out has shape"):
        B.conv_backward_filter(x, dy, (6, 2, 3, 3), 2, 1, 2, out=np.zeros((6, 2, 3, 3), np.float16))


def test_memory_high_water_is_the_process_peak_resident_set():
    # a fresh process: 256 MB of touched pages on top of what is resident now set a new
    # peak (the peak before may be higher than the resident set, from memory since freed)
    script = ("import os, numpy as np; from mpiconvnet.backends import numpy_backend as ops\n"
              "before = ops.memory_high_water()\n"
              "resident = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
              "a = np.ones(2**25); after = ops.memory_high_water()\n"
              "print(before, resident, after)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, resident, after = map(int, result.stdout.split())
    assert before >= resident > 10 * 2**20
    assert resident + 0.95 * 2**28 <= after <= before + 1.05 * 2**28
