"""Backends: the same small set of functions on every device.

A backend is a module. Layers, models, the optimizer and the trainer call only the
functions listed here, so they never branch on the backend. The NumPy backend
(`numpy_backend.py`) is the definition of every op; the CUDA backend (`cuda/`) must give
the same results within the tolerances in `tests/tolerances.py`.

Arrays are the backend's own type (numpy.ndarray, or the CUDA backend's DeviceArray). Layout is NCHW
for images and (N, features) for dense layers; the dtype of the inputs is kept
(float32 for training, float64 for gradient checks).

Memory
    to_device(host_array) -> array            copy of a NumPy array
    to_host(array) -> numpy.ndarray           copy back to the host
    empty(shape, dtype) / zeros(shape, dtype) -> array
    copy_into(dst, src)                       dst[...] = src (same shape)
    flat_views(flat, shapes, align=1) -> [array]
                                              views into one flat 1-D buffer, one per shape,
                                              laid end to end, each starting at a multiple
                                              of align elements (gradient buckets)
    synchronize()                             wait for all queued work (no-op on NumPy)
    memory_high_water() -> int                the most bytes the backend's arrays have held
                                              in this process: NumPy, the process's peak
                                              resident set; CUDA, the largest size of its
                                              device memory pool seen so far (the pool keeps
                                              what it allocates unless an allocation runs out
                                              of memory; the CUDA context and the libraries'
                                              own small allocations not counted)

Convolution  x: (N, C, H, W)  w: (K, C/groups, R, S)  b: (K,)  y: (N, K, P, Q)
    conv_forward(x, w, b, stride, pad, groups) -> y
    conv_backward_data(dy, w, x_shape, stride, pad, groups) -> dx
    conv_backward_filter(x, dy, w_shape, stride, pad, groups, out=None) -> dw
    conv_backward_bias(dy, out=None) -> db    sum over N, P, Q
        out: an array of the result's shape and dtype to write it into (and return),
        e.g. the parameter's view into a gradient bucket; the same for the dense ones

Elementwise and pooling
    relu_forward(x) -> y
    relu_backward(y, dy) -> dx                dx = dy where y > 0, else 0
    lrn_forward(x, size, alpha, beta, k) -> y
        cross-channel, Caffe/PyTorch convention:
        y[c] = x[c] / (k + alpha/size * sum_{c' in window(c)} x[c']^2) ** beta
        window(c) = channels c - size//2 .. c + (size-1)//2, clipped at the edges.
    lrn_backward(x, y, dy, size, alpha, beta, k) -> dx
    maxpool_forward(x, size, stride) -> y     no padding, floor division of sizes
    maxpool_backward(x, y, dy, size, stride) -> dx
        ties: the gradient goes to the first maximum in row-major window order.
    dropout_forward(x, p, seed, counter, offset=0, row_stride=None) -> (y, mask)
        inverted dropout: y = x * mask / (1 - p). mask (same shape as x, x's dtype, 0 or 1)
        is a pure function of (seed, counter, i) through the counter-based hash
        `dropout_keep(seed, counter, shape, p, offset, row_stride)` in numpy_backend, with
        i = offset + flat element index, or, given row_stride, x: (rows, cols) and
        i = offset + r * row_stride + c for element (r, c) (uint32 arithmetic). So every
        backend draws the same mask, a resumed run draws the masks it would have drawn,
        rank r (offset = its first sample's position in the global batch times the
        features per sample) draws the rows one rank with the whole batch would draw, and
        a rank holding columns c0.. of a (rows, H) activation (offset = c0, row_stride = H)
        draws those columns of the whole matrix's mask.
    dropout_backward(dy, mask, p) -> dx

Dense  x: (N, F)  w: (O, F)  b: (O,)  y: (N, O)   (PyTorch's nn.Linear layout)
    linear_forward(x, w, b) -> y              y = x @ w.T + b
    linear_backward_data(dy, w) -> dx
    linear_backward_filter(x, dy, out=None) -> dw
    linear_backward_bias(dy, out=None) -> db

Model input (what the loader's uint8 batch becomes; data/augment.py defines the maths)
    crop_flip_normalize(images, plan, crop_size, mean_chw, std=None) -> x
        images: host uint8 (n, S, S, 3); plan: a data.augment.CropPlan of m crops (host
        arrays sources, offsets, flips, lighting); mean_chw: float32 (3, 1, 1) per channel
        or (3, S, S) mean image; std: (3,) or None. x: float32 (m, 3, c, c) with
        x[i] = (window of images[sources[i]] at offsets[i], mirrored where flips[i],
                + lighting[i] - mean at the same source pixels) / std
        The loader ships uint8 images (4x fewer bytes than float32 crops) and does no
        pixel arithmetic; this op does it where the model lives (NumPy: crop_batch; CUDA:
        one kernel after a uint8 copy).
    stage_batch(images, plan, crop_size, mean_chw, std=None) -> staged
    crop_staged(staged) -> x
        crop_flip_normalize in two halves, so that a batch's copy to the device can run
        while the step before computes (BatchLoader.device_batches stages one batch ahead).
        stage_batch checks its arguments and starts the copy; staged.copied is an event
        (wait_event) after which `images` is no longer read, or None when stage_batch read
        it before returning. crop_staged returns the crops, ordered after the copy.
        At most 2 batches are staged and not yet cropped at a time: crop_staged raises for
        a batch whose staging memory a later stage_batch has reused. (NumPy: stage_batch
        makes the crops; CUDA: the uint8 batch goes on a copy stream, and the compute
        stream waits for it on the device before the crop kernel.)

Loss and metrics
    softmax_cross_entropy(logits, labels) -> (loss, dlogits)
        labels: a host numpy int64 array (N,). loss is the mean over the batch (a Python float,
        mean_loss below); dlogits is the gradient of that mean (softmax - onehot) / N.
        Numerically stable (max shift).
    softmax_cross_entropy_rows(logits, labels) -> (loss_rows, dlogits)
        the same, with each row's loss left where it was computed (an array (N,)): reading it
        waits for the GPU, so a training step reads it after queueing the backward pass
    topk_correct(logits, labels, ks) -> tuple of ints, how many labels are in the top k

Update (in place)
    sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay)
        Krizhevsky 2012 / Caffe form, learning rate inside the velocity:
        velocity = momentum * velocity + lr * (grad + weight_decay * param)
        param    = param - velocity
    sgd_momentum_update_many(params, grads, velocities, lrs, momentum, weight_decays)
        the same on each tensor of the lists, each with its own lr and weight decay (CUDA:
        one launch for up to 64 tensors instead of one each)
    scale_(array, factor)                     array *= factor (averaging after a sum)

Threads
    set_num_threads(n)                        CPU threads the backend's ops may use (NumPy: the
                                              width of its pool over batch slices; CUDA: none,
                                              the GPU does the work, so it is ignored)
    use_in_this_thread()                      make the backend usable from the calling thread
                                              (CUDA: make its context current there; NumPy:
                                              nothing to do)
    device_identity() -> str or None          the device this process computes on, so that
                                              ranks can tell whether they share one (CUDA:
                                              the GPU's UUID; NumPy: None, CPU cores are not
                                              owned by one rank)

Communication (how the trainer hands a flat gradient bucket to MPI)
    HOST_MEMORY: bool                         True when arrays live in host memory (NumPy):
                                              MPI reduces them in place
    pinned_host_empty(shape, dtype) -> numpy.ndarray   page-locked on CUDA (staging buffers)
    pin_host_memory(array) -> handle          page-lock an existing host array (the loader's
                                              batch slots) while the handle lives, so copies
                                              from it are asynchronous (None on NumPy)
    copy_to_host(dst_host, src)               device -> host, into an existing host array
    copy_to_host_async(dst_host, src)         the same, queued: dst_host is complete once an
                                              event recorded after it has been waited for
    record_event() -> event                   marks the work queued so far (None on NumPy)
    wait_event(event)                         blocks the calling thread until that work is
                                              done (another thread: use_in_this_thread first)
    copy_from_host(dst, src_host)             host -> device, into an existing array
    mpi_buffer(array)                         what mpi4py reads/writes in place: the ndarray
                                              on NumPy; on CUDA an object exposing
                                              __cuda_array_interface__ (only used when the
                                              MPI is CUDA-aware)
"""

import importlib

import numpy as np

BACKENDS = {
    "numpy": "mpiconvnet.backends.numpy_backend",
    "cuda": "mpiconvnet.backends.cuda",
}


def mean_loss(loss_rows):
    """The batch's loss from its rows' losses (a host array): summed in float64, in a fixed
    order, so both backends report the same number for the same rows."""
    rows = np.asarray(loss_rows, np.float64)
    return float(rows.sum() / rows.size) if rows.size else float("nan")


def get_backend(name):
    """Return the backend module called `name` ('numpy' or 'cuda')."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])
