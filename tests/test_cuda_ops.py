"""Every CUDA backend op against the NumPy reference, on fresh random inputs.

Needs a GPU, pycuda, cuBLAS and cuDNN; skipped with the reason otherwise. Run on a GPU
node: pytest -m cuda tests/test_cuda_ops.py   (or scripts/gpu-check.sh, which does it all)

Outputs are poisoned before each op: the memory pool is first handed NaN-filled blocks of
the output's size, so an op that leaves part of its output unwritten fails here.
"""
import zlib

import numpy as np
import pytest

from tests import tolerances as tol

pytestmark = pytest.mark.cuda


def _gpu_unavailable():
    try:
        import pycuda.driver as drv
    except ImportError as e:
        return f"pycuda is not installed ({e}); on a GPU node run scripts/gpu-check.sh"
    try:
        drv.init()
        count = drv.Device.count()
    except Exception as e:  # no driver, or a broken one
        return f"no usable CUDA driver ({e})"
    return None if count else "no CUDA device visible"


UNAVAILABLE = _gpu_unavailable()


@pytest.fixture(scope="module")
def cb():
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    from mpiconvnet.backends import cuda
    cuda.initialize(0, 1)
    return cuda


@pytest.fixture(scope="module")
def nb():
    from mpiconvnet.backends import numpy_backend
    return numpy_backend


@pytest.fixture
def rng(request):
    # a fresh stream per test, reproducible from the test's name
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def bucket_views(cb, dtype, *shapes):
    """(flat, views): a NaN-filled flat buffer and views into it laid out as gradient
    buckets lay them (each 256-byte aligned, padding between), for ops given out=."""
    from mpiconvnet.buckets import VIEW_ALIGN_BYTES, padded_size
    align = VIEW_ALIGN_BYTES // np.dtype(dtype).itemsize
    flat = cb.to_device(np.full(padded_size(shapes, align) + align, np.nan, dtype))
    return flat, cb.flat_views(flat, shapes, align)


def assert_padding_untouched(cb, flat, views):
    """Nothing outside the views was written: the padding is still NaN."""
    host = cb.to_host(flat)
    written = np.zeros(host.size, bool)
    for v in views:
        start = (v.ptr - flat.ptr) // host.itemsize
        written[start:start + v.size] = True
    assert np.isnan(host[~written]).all() and not np.isnan(host[written]).any()


def poison(cb, shape, dtype, copies=3):
    """Hand NaN-filled blocks of this size back to the pool, so the op's next empty() of
    this size very likely gets one."""
    fill = np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.full(shape, -7, dtype)
    blocks = [cb.to_device(fill) for _ in range(copies)]
    cb.synchronize()
    del blocks


def assert_close(actual, reference, kind="reduction", dtype=None):
    """A GPU result (on the host) against the NumPy reference, with the tolerance of the
    reference's dtype (or `dtype`, for a Python float) and of the op's kind
    (tests/tolerances.py)."""
    reference = np.asarray(reference)
    if np.dtype(dtype or reference.dtype) == np.float64:
        limits = tol.FLOAT64
    elif kind == "reduction":
        limits = tol.reduction_f32(reference)
    else:
        limits = tol.ELEMENTWISE_F32
    np.testing.assert_allclose(actual, reference, **limits)


DTYPES = [np.float32, np.float64]

# --- memory -----------------------------------------------------------------------------------


def test_initialize_is_idempotent(cb):
    assert cb.initialize(0, 1) == cb.initialize(0, None)
    assert cb.is_initialized()


def test_memory_round_trips(cb, rng):
    a = rng.standard_normal((3, 4, 5)).astype(np.float32)
    d = cb.to_device(a)
    assert d.shape == a.shape and d.dtype == a.dtype
    np.testing.assert_array_equal(cb.to_host(d), a)
    poison(cb, (3, 4, 5), np.float32)
    z = cb.zeros((3, 4, 5), np.float32)
    np.testing.assert_array_equal(cb.to_host(z), np.zeros_like(a))
    e = cb.empty((3, 4, 5), np.float32)
    cb.copy_into(e, d)
    np.testing.assert_array_equal(cb.to_host(e), a)
    labels = rng.integers(0, 1000, 17)
    np.testing.assert_array_equal(cb.to_host(cb.to_device(labels)), labels)


def test_flat_views_alias_the_buffer(cb, rng):
    shapes = [(2, 3), (4,), (1, 2, 2)]
    flat = cb.zeros((16,), np.float32)   # 14 elements of views; the last 2 must stay untouched
    views = cb.flat_views(flat, shapes)
    parts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    for view, part in zip(views, parts):
        assert view.shape == part.shape
        cb.copy_into(view, cb.to_device(part))
    expected = np.concatenate([p.ravel() for p in parts] + [np.zeros(2, np.float32)])
    np.testing.assert_array_equal(cb.to_host(flat), expected)
    with pytest.raises(ValueError):
        cb.flat_views(flat, [(17,)])


def test_staging_copies(cb, rng):
    a = rng.standard_normal(1000).astype(np.float32)
    d = cb.to_device(a)
    pinned = cb.pinned_host_empty((1000,), np.float32)
    cb.copy_to_host(pinned, d)
    np.testing.assert_array_equal(pinned, a)
    pinned *= 2
    cb.copy_from_host(d, pinned)
    cb.synchronize()
    np.testing.assert_array_equal(cb.to_host(d), 2 * a)
    assert cb.HOST_MEMORY is False
    iface = cb.mpi_buffer(d).__cuda_array_interface__
    assert iface["data"][0] == d.ptr and iface["shape"] == (1000,) and iface["typestr"] == "<f4"


# --- convolution ------------------------------------------------------------------------------

CONV_CASES = [
    # x shape, w shape, stride, pad, groups
    ((2, 3, 19, 19), (8, 3, 5, 5), 2, 1, 1),
    ((2, 8, 9, 9), (6, 4, 3, 3), 1, 1, 2),        # grouped, like AlexNet conv2/4/5
    ((3, 4, 12, 12), (4, 4, 1, 1), 1, 0, 1),
    ((2, 64, 13, 13), (32, 64, 3, 3), 1, 1, 1),   # 576-term sums: TF32 would show
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, pad, groups", CONV_CASES)
def test_conv(cb, nb, rng, dtype, x_shape, w_shape, stride, pad, groups):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y_ref = nb.conv_forward(x, w, b, stride, pad, groups)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    xd, wd, dyd = cb.to_device(x), cb.to_device(w), cb.to_device(dy)
    poison(cb, y_ref.shape, dtype)
    y = cb.conv_forward(xd, wd, cb.to_device(b), stride, pad, groups)
    assert_close(cb.to_host(y), y_ref)
    poison(cb, x_shape, dtype)
    assert_close(cb.to_host(cb.conv_backward_data(dyd, wd, x_shape, stride, pad, groups)),
                               nb.conv_backward_data(dy, w, x_shape, stride, pad, groups))
    poison(cb, w_shape, dtype)
    assert_close(cb.to_host(cb.conv_backward_filter(xd, dyd, w_shape, stride, pad, groups)),
                               nb.conv_backward_filter(x, dy, w_shape, stride, pad, groups))
    poison(cb, (w_shape[0],), dtype)
    assert_close(cb.to_host(cb.conv_backward_bias(dyd)), nb.conv_backward_bias(dy))
    # written into gradient-bucket views, as training does
    flat, (dw, db) = bucket_views(cb, dtype, w_shape, (w_shape[0],))
    assert cb.conv_backward_filter(xd, dyd, w_shape, stride, pad, groups, out=dw) is dw
    assert cb.conv_backward_bias(dyd, out=db) is db
    assert_close(cb.to_host(dw), nb.conv_backward_filter(x, dy, w_shape, stride, pad, groups))
    assert_close(cb.to_host(db), nb.conv_backward_bias(dy))
    assert_padding_untouched(cb, flat, (dw, db))


# --- ReLU, LRN, pooling -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu(cb, nb, rng, dtype):
    x = rng.standard_normal((4, 5, 6, 7)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    poison(cb, x.shape, dtype)
    y = cb.relu_forward(cb.to_device(x))
    np.testing.assert_array_equal(cb.to_host(y), nb.relu_forward(x))
    poison(cb, x.shape, dtype)
    dx = cb.relu_backward(y, cb.to_device(dy))
    np.testing.assert_array_equal(cb.to_host(dx), nb.relu_backward(nb.relu_forward(x), dy))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [5, 3, 4])   # odd: cuDNN; even: our kernel
def test_lrn(cb, nb, rng, dtype, size):
    # AlexNet's constants, with inputs scaled so the sum term matters against k
    alpha, beta, k = 1e-2, 0.75, 2.0
    x = (4 * rng.standard_normal((2, 11, 5, 6))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y_ref = nb.lrn_forward(x, size, alpha, beta, k)
    poison(cb, x.shape, dtype)
    y = cb.lrn_forward(cb.to_device(x), size, alpha, beta, k)
    assert_close(cb.to_host(y), y_ref)
    poison(cb, x.shape, dtype)
    dx = cb.lrn_backward(cb.to_device(x), cb.to_device(y_ref), cb.to_device(dy), size, alpha, beta, k)
    assert_close(cb.to_host(dx), nb.lrn_backward(x, y_ref, dy, size, alpha, beta, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size, stride", [((2, 3, 13, 13), 3, 2), ((2, 2, 8, 9), 2, 2), ((1, 4, 7, 7), 3, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool(cb, nb, rng, dtype, shape, size, stride, ties):
    x = (rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)).astype(dtype)
    y_ref = nb.maxpool_forward(x, size, stride)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    xd = cb.to_device(x)
    poison(cb, y_ref.shape, dtype)
    y = cb.maxpool_forward(xd, size, stride)
    np.testing.assert_array_equal(cb.to_host(y), y_ref)
    dx_ref = nb.maxpool_backward(x, y_ref, dy, size, stride)
    # through the first maxima the forward recorded, and through a y without them (found again)
    for y_given in (y, cb.to_device(y_ref)):
        poison(cb, shape, dtype)
        dx = cb.maxpool_backward(xd, y_given, cb.to_device(dy), size, stride)
        # overlapping windows add up to 4 values, possibly in another order
        assert_close(cb.to_host(dx), dx_ref, "elementwise")


# --- dropout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, seed, counter, offset", [(0.5, 1, 0, 0), (0.3, 2 ** 40 + 3, 17, 12345), (0.0, 5, 5, 0),
                                                      (0.9, 7, 2 ** 33, 2 ** 32 - 10)])
def test_dropout_matches_reference_bit_for_bit(cb, nb, rng, dtype, p, seed, counter, offset):
    x = rng.standard_normal((8, 300)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y_ref, mask_ref = nb.dropout_forward(x, p, seed, counter, offset)
    poison(cb, x.shape, dtype, copies=4)
    y, mask = cb.dropout_forward(cb.to_device(x), p, seed, counter, offset)
    mask_host = cb.to_host(mask)
    assert mask_host.dtype == dtype
    np.testing.assert_array_equal(mask_host, nb.dropout_keep(seed, counter, x.size, p, offset).reshape(x.shape).astype(dtype))
    np.testing.assert_array_equal(mask_host, mask_ref)
    np.testing.assert_array_equal(cb.to_host(y), y_ref)
    poison(cb, x.shape, dtype)
    dx = cb.dropout_backward(cb.to_device(dy), mask, p)
    np.testing.assert_array_equal(cb.to_host(dx), nb.dropout_backward(dy, mask_ref, p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, seed, counter, offset", [(0.5, 1, 0, 0), (0.3, 2 ** 40 + 3, 17, 12345),
                                                      (0.9, 7, 2 ** 33, 2 ** 32 - 10)])
def test_dropout_row_stride_matches_reference_bit_for_bit(cb, nb, rng, dtype, p, seed, counter, offset):
    # a rank holding columns 100 to 249 of an (8, 300) activation draws the reference's mask
    # for that slice, which is the whole matrix's mask in those columns
    whole = rng.standard_normal((8, 300)).astype(dtype)
    start, stop = 100, 250
    x = np.ascontiguousarray(whole[:, start:stop])
    y_ref, mask_ref = nb.dropout_forward(x, p, seed, counter, offset + start, row_stride=whole.shape[1])
    np.testing.assert_array_equal(mask_ref, nb.dropout_forward(whole, p, seed, counter, offset)[1][:, start:stop])
    poison(cb, x.shape, dtype, copies=4)
    y, mask = cb.dropout_forward(cb.to_device(x), p, seed, counter, offset + start, row_stride=whole.shape[1])
    np.testing.assert_array_equal(cb.to_host(mask), mask_ref)
    np.testing.assert_array_equal(cb.to_host(y), y_ref)
    with pytest.raises(ValueError, match="needs a 2-D x"):
        cb.dropout_forward(cb.to_device(x.reshape(2, 4, -1)), p, seed, counter, row_stride=whole.shape[1])


# --- dense ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, f, o", [(64, 512, 256), (3, 7, 5), (1, 9216, 10)])
def test_linear(cb, nb, rng, dtype, n, f, o):
    x = rng.standard_normal((n, f)).astype(dtype)
    w = rng.standard_normal((o, f)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    dy = rng.standard_normal((n, o)).astype(dtype)
    xd, wd, dyd = cb.to_device(x), cb.to_device(w), cb.to_device(dy)
    poison(cb, (n, o), dtype)
    assert_close(cb.to_host(cb.linear_forward(xd, wd, cb.to_device(b))), nb.linear_forward(x, w, b))
    poison(cb, (n, f), dtype)
    assert_close(cb.to_host(cb.linear_backward_data(dyd, wd)), nb.linear_backward_data(dy, w))
    poison(cb, (o, f), dtype)
    assert_close(cb.to_host(cb.linear_backward_filter(xd, dyd)), nb.linear_backward_filter(x, dy))
    poison(cb, (o,), dtype)
    assert_close(cb.to_host(cb.linear_backward_bias(dyd)), nb.linear_backward_bias(dy))
    flat, (dw, db) = bucket_views(cb, dtype, (o, f), (o,))
    assert cb.linear_backward_filter(xd, dyd, out=dw) is dw and cb.linear_backward_bias(dyd, out=db) is db
    assert_close(cb.to_host(dw), nb.linear_backward_filter(x, dy))
    assert_close(cb.to_host(db), nb.linear_backward_bias(dy))
    assert_padding_untouched(cb, flat, (dw, db))


def test_tf32_switch_restores_float32(cb, nb, rng):
    x = rng.standard_normal((64, 2048)).astype(np.float32)
    w = rng.standard_normal((128, 2048)).astype(np.float32)
    b = np.zeros(128, np.float32)
    ref = nb.linear_forward(x, w, b)
    xd, wd, bd = cb.to_device(x), cb.to_device(w), cb.to_device(b)
    cb.set_tf32(True)
    try:
        loose = cb.to_host(cb.linear_forward(xd, wd, bd))
        # TF32 keeps 10 mantissa bits: still close at the percent level
        np.testing.assert_allclose(loose, ref, rtol=5e-2, atol=5e-1)
    finally:
        cb.set_tf32(False)
    assert_close(cb.to_host(cb.linear_forward(xd, wd, bd)), ref)


# --- loss and metrics -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, classes, scale", [(32, 1000, 1.0), (5, 10, 40.0), (1, 3, 1.0)])
def test_softmax_cross_entropy(cb, nb, rng, dtype, n, classes, scale):
    logits = (scale * rng.standard_normal((n, classes))).astype(dtype)
    labels = rng.integers(0, classes, n)
    loss_ref, dlogits_ref = nb.softmax_cross_entropy(logits, labels)
    poison(cb, (n, classes), dtype)
    loss, dlogits = cb.softmax_cross_entropy(cb.to_device(logits), labels)
    assert isinstance(loss, float)
    assert_close(loss, loss_ref, dtype=dtype)
    assert_close(cb.to_host(dlogits), dlogits_ref)
    rows, _ = cb.softmax_cross_entropy_rows(cb.to_device(logits), labels)   # what a training step reads
    assert_close(cb.to_host(rows), nb.softmax_cross_entropy_rows(logits, labels)[0])
    with pytest.raises(ValueError):
        cb.softmax_cross_entropy(cb.to_device(logits), np.full(n, classes))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_correct(cb, nb, rng, dtype, ties):
    logits = (rng.integers(0, 4, (50, 20)) if ties else rng.standard_normal((50, 20))).astype(dtype)
    labels = rng.integers(0, 20, 50)
    assert cb.topk_correct(cb.to_device(logits), labels, (1, 5)) == nb.topk_correct(logits, labels, (1, 5))


# --- update -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_momentum_update(cb, nb, rng, dtype):
    param, grad, velocity = (rng.standard_normal((37, 11)).astype(dtype) for _ in range(3))
    pd, gd, vd = cb.to_device(param), cb.to_device(grad), cb.to_device(velocity)
    for _ in range(3):
        nb.sgd_momentum_update(param, grad, velocity, 0.01, 0.9, 5e-4)
        cb.sgd_momentum_update(pd, gd, vd, 0.01, 0.9, 5e-4)
    assert_close(cb.to_host(pd), param, "elementwise")
    assert_close(cb.to_host(vd), velocity, "elementwise")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_momentum_update_many(cb, nb, rng, dtype):
    # 70 tensors: two launches (64 + 6), each tensor with its own lr and weight decay
    shapes = [(37, 11), (300,), (5,)] + [(int(n),) for n in rng.integers(1, 200, 67)]
    host = [[rng.standard_normal(shape).astype(dtype) for _ in range(3)] for shape in shapes]
    device = [[cb.to_device(a) for a in t] for t in host]
    lrs = list(rng.uniform(0.001, 0.02, len(shapes)))
    decays = list(rng.choice([0.0, 5e-4], len(shapes)))
    for _ in range(3):
        nb.sgd_momentum_update_many(*zip(*host), lrs, 0.9, decays)
        cb.sgd_momentum_update_many(*zip(*device), lrs, 0.9, decays)
    for (p, _, v), (pd, _, vd) in zip(host, device):
        assert_close(cb.to_host(pd), p, "elementwise")
        assert_close(cb.to_host(vd), v, "elementwise")


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale(cb, nb, rng, dtype):
    a = rng.standard_normal(1001).astype(dtype)
    d = cb.to_device(a)
    cb.scale_(d, 0.25)
    nb.scale_(a, 0.25)
    np.testing.assert_array_equal(cb.to_host(d), a)


# --- augmentation -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["train-mean-image", "train-channel-std", "eval-10-crops"])
def test_crop_flip_normalize(cb, nb, rng, kind):
    from mpiconvnet.data import augment
    n, side, size = 6, 20, 13
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    std = None
    if kind == "eval-10-crops":
        plan = augment.eval_plan(n, side, size, crops=10)
        mean_chw = augment.mean_as_chw(rng.uniform(50, 200, 3))
    else:
        plan = augment.batch_augmentation(1, 0, 3, 0, n, 1, side, size, pca_lighting=True)
        if kind == "train-channel-std":
            mean_chw, std = augment.mean_as_chw(rng.uniform(50, 200, 3)), np.array([58.4, 57.1, 57.4], np.float32)
        else:
            mean_chw = augment.mean_as_chw(rng.uniform(50, 200, (side, side, 3)))
    expected = nb.crop_flip_normalize(images, plan, size, mean_chw, std)
    poison(cb, expected.shape, np.float32)
    out = cb.crop_flip_normalize(images, plan, size, mean_chw, std)
    np.testing.assert_allclose(cb.to_host(out), expected, **tol.ELEMENTWISE_F32)
    bad = augment.CropPlan(plan.sources, plan.offsets + side, plan.flips, plan.lighting)
    with pytest.raises(ValueError, match="crop offsets outside"):
        cb.crop_flip_normalize(images, bad, size, mean_chw, std)


def test_staged_batches_one_ahead_from_reused_page_locked_slots(cb, nb, rng):
    # the loader's pattern (BatchLoader.device_batches): two page-locked slots, the next
    # batch staged on the copy stream before this one is cropped, a slot refilled once its
    # copy's event is waited for; batches of growing size take staging memory anew. A
    # matrix product between crops keeps the compute stream busy while the copy runs.
    from mpiconvnet.data import augment
    side, size, mean_chw = 24, 19, augment.mean_as_chw(rng.uniform(50, 200, 3))
    std = np.array([58.4, 57.1, 57.4], np.float32)
    sizes = [3, 3, 5, 2, 7, 7, 1]
    slots = np.zeros((2, max(sizes), side, side, 3), np.uint8)
    pinned = cb.pin_host_memory(slots)
    busy = cb.to_device(rng.standard_normal((1024, 1024)).astype(np.float32))
    no_bias = cb.zeros((1024,), np.float32)
    expected, staged, handed_out = [], [], []

    def stage(k):
        slot = slots[k % 2, :sizes[k]]
        if k >= 2:
            cb.wait_event(staged[k - 2].copied)     # the slot's previous copy is done
        slot[...] = rng.integers(0, 256, slot.shape, dtype=np.uint8)
        plan = augment.batch_augmentation(1, 0, k, 0, sizes[k], 1, side, size, pca_lighting=True)
        expected.append(nb.crop_flip_normalize(slot.copy(), plan, size, mean_chw, std))
        staged.append(cb.stage_batch(slot, plan, size, mean_chw, std))

    stage(0)
    for k in range(len(sizes)):
        if k + 1 < len(sizes):
            stage(k + 1)
        handed_out.append(cb.crop_staged(staged[k]))
        cb.linear_forward(busy, busy, no_bias)
    for k, x in enumerate(handed_out):
        np.testing.assert_allclose(cb.to_host(x), expected[k], err_msg=f"batch {k}", **tol.ELEMENTWISE_F32)
    with pytest.raises(RuntimeError, match="staging area was reused"):
        cb.crop_staged(staged[0])
    cb.synchronize()
    pinned.close()


# --- a whole model ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_alexnet_mini_step_matches_numpy(cb, rng, dtype):
    """Forward, loss and every parameter gradient of alexnet-mini (groups, LRN, overlapping
    pooling, dropout) agree between backends built from the same seed."""
    from mpiconvnet.models import build_model
    nets = {name: build_model("alexnet-mini", num_classes=10, backend=name, dtype=dtype, seed=0)
            for name in ("numpy", "cuda")}
    size = nets["numpy"].input_size
    x = rng.standard_normal((4, 3, size, size)).astype(dtype)
    labels = rng.integers(0, 10, 4)
    loss_np, grads_np = nets["numpy"].loss_and_grads(x, labels, step=3)
    loss_cu, grads_cu = nets["cuda"].loss_and_grads(cb.to_device(x), labels, step=3)
    assert set(grads_cu) == set(grads_np)
    if dtype == "float64":
        np.testing.assert_allclose(loss_cu, loss_np, **tol.FLOAT64)
        for name, g in grads_np.items():
            np.testing.assert_allclose(cb.to_host(grads_cu[name]), g, err_msg=name, **tol.FLOAT64)
        return
    # float32: rounding of ~1e-7 per op compounds through eight layers and back, and can
    # flip a near-tied max-pool window or a ReLU at zero; compare each gradient as a whole
    np.testing.assert_allclose(loss_cu, loss_np, rtol=1e-4)
    for name, g in grads_np.items():
        error = np.linalg.norm(cb.to_host(grads_cu[name]).astype(np.float64) - g) / max(np.linalg.norm(g), 1e-30)
        assert error < 1e-3, f"{name}: relative error {error:.2e}"


def test_deterministic_convolutions_repeat_a_step_bit_for_bit(cb, rng):
    """MPICONVNET_DETERMINISTIC=1 (here set_deterministic): the same step twice gives the
    same gradients to the last bit (our kernels use no atomics; the convolutions are then
    chosen among cuDNN's deterministic algorithms)."""
    from mpiconvnet.backends.cuda import context
    from mpiconvnet.models import build_model
    st = context.get()
    st.set_deterministic(True)
    try:
        net = build_model("alexnet-mini", num_classes=10, backend="cuda", dtype="float32", seed=0)
        size = net.input_size
        x = cb.to_device(rng.standard_normal((16, 3, size, size)).astype(np.float32))
        labels = rng.integers(0, 10, 16)
        runs = []
        for _ in range(2):
            loss, grads = net.loss_and_grads(x, labels, step=1)
            runs.append((loss, {name: cb.to_host(g) for name, g in grads.items()}))
        assert runs[0][0] == runs[1][0]
        for name, g in runs[0][1].items():
            np.testing.assert_array_equal(runs[1][1][name], g, err_msg=name)
    finally:
        st.set_deterministic(False)
