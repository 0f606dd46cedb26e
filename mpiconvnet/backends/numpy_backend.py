"""The NumPy backend: the reference definition of every op in the backend interface.

Every function listed in `mpiconvnet/backends/__init__.py` is here, with the same name and
signature; the CUDA backend is checked against these. Outputs keep the inputs' dtype
(float32 for training, float64 for gradient checks).

Conventions pinned here (and tested against PyTorch in tests/test_numpy_ops.py):
- convolution is cross-correlation with zero padding and groups, as in Caffe, PyTorch and
  cuDNN; output sizes by floor division (227 -> 55 for 11x11 stride 4);
- LRN is Caffe/PyTorch's b = a / (k + (alpha/n) * sum a^2)^beta over n channels. The 2012
  paper writes alpha without the /n; AlexNet uses k=2, n=5, alpha=1e-4, beta=0.75;
- max pooling has no padding; a tie gives the gradient to the first maximum (row-major);
- dropout is inverted (scaled by 1/(1-p) in training) with masks from `dropout_keep`, a
  counter-based hash of (seed, counter, offset + element index) that every backend
  reproduces; with row_stride, element (r, c) of a 2-D x has index r * row_stride + c, so
  a column slice draws its columns of the whole matrix's mask (numpy_ops/dropout.py gives
  the exact definition).

Each family of ops lives in numpy_ops/ (conv, lrn, pool, relu, dropout, dense, update).
Threads: `set_num_threads(n)` (default OMP_NUM_THREADS, else 1) runs the ops over slices of
the batch on n threads with BLAS single-threaded (numpy_ops/threads.py). Importing this
module raises glibc's malloc thresholds so slice temporaries are recycled (numpy_ops/malloc.py).
"""
import resource

import numpy as np

from mpiconvnet.backends.numpy_ops.conv import (conv_backward_bias, conv_backward_data,
                                                conv_backward_filter, conv_forward)
from mpiconvnet.backends.numpy_ops.dense import (linear_backward_bias, linear_backward_data,
                                                 linear_backward_filter, linear_forward,
                                                 softmax_cross_entropy, softmax_cross_entropy_rows,
                                                 topk_correct)
from mpiconvnet.backends.numpy_ops.dropout import dropout_backward, dropout_forward, dropout_keep
from mpiconvnet.backends.numpy_ops.lrn import lrn_backward, lrn_forward
from mpiconvnet.backends.numpy_ops.malloc import keep_freed_memory
from mpiconvnet.backends.numpy_ops.pool import maxpool_backward, maxpool_forward
from mpiconvnet.backends.numpy_ops.relu import relu_backward, relu_forward
from mpiconvnet.backends.numpy_ops.threads import get_num_threads, output, parallel_map, set_num_threads, split
from mpiconvnet.backends.numpy_ops.update import scale_, sgd_momentum_update, sgd_momentum_update_many
from mpiconvnet.data.augment import crop_batch

NAME = "numpy"

# the ops allocate temporaries of a few MiB per batch slice: let malloc recycle them
keep_freed_memory()

# ---------------------------------------------------------------------------- memory

def to_device(host_array):
    return np.array(host_array, copy=True)


def to_host(array):
    return np.array(array, copy=True)


def empty(shape, dtype):
    return np.empty(shape, dtype=dtype)


def zeros(shape, dtype):
    return np.zeros(shape, dtype=dtype)


def copy_into(dst, src):
    # dst[...] = src; the layers copy every gradient into its allreduce bucket (244 MB a step
    # for AlexNet), so large contiguous copies run in slices on the thread pool
    if dst.shape != src.shape:
        raise ValueError(f"copy_into: shapes differ, {dst.shape} <- {src.shape}")
    if not (dst.flags.c_contiguous and src.flags.c_contiguous):
        np.copyto(dst, src)
        return
    dst_flat, src_flat = dst.reshape(-1), src.reshape(-1)
    parallel_map(lambda part: np.copyto(dst_flat[part], src_flat[part]), split(dst.size, 2 * dst.itemsize))


def flat_views(flat, shapes, align=1):
    """Views into the 1-D buffer `flat`, one per shape, laid end to end, each starting at a
    multiple of `align` elements."""
    views, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        offset = -(-offset // align) * align
        if offset + size > flat.size:
            raise ValueError(f"flat_views: shapes need more than the buffer's {flat.size} elements; "
                             f"allocate sum(prod(shape)) elements (each rounded up to a multiple of align)")
        views.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return views


def synchronize():
    """NumPy runs every op to completion before returning: nothing is queued."""


def device_identity():
    return None   # the CPU: ranks sharing a node's cores is the normal case


def memory_high_water():
    # the arrays are the process's memory: its peak resident set (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------- model input

def crop_flip_normalize(images, plan, crop_size, mean_chw, std=None):
    # crop_batch over slices of the crops, one slice per thread of the pool
    out = output((len(plan), 3, crop_size, crop_size), np.float32)
    bytes_per_crop = 3 * crop_size * crop_size * (1 + 4)
    parallel_map(lambda part: crop_batch(images, plan[part], crop_size, mean_chw, std, out=out[part]),
                 split(len(plan), bytes_per_crop))
    return out


class StagedBatch:
    """What stage_batch returns here: the crops, already made (the host has no copy to
    overlap with compute), and no event to wait for."""
    __slots__ = ("crops", "copied")

    def __init__(self, crops):
        self.crops, self.copied = crops, None


def stage_batch(images, plan, crop_size, mean_chw, std=None):
    return StagedBatch(crop_flip_normalize(images, plan, crop_size, mean_chw, std))


def crop_staged(staged):
    return staged.crops


# ---------------------------------------------------------------------------- communication

HOST_MEMORY = True


def pinned_host_empty(shape, dtype):
    # host memory is all there is: nothing to pin
    return np.empty(shape, dtype=dtype)


def pin_host_memory(array):
    # host memory is all there is: nothing to pin
    return None


def copy_to_host(dst_host, src):
    np.copyto(dst_host, src)


def copy_to_host_async(dst_host, src):
    # nothing is queued on the host: the copy is done when this returns
    np.copyto(dst_host, src)


def record_event():
    return None


def wait_event(event):
    return None


def copy_from_host(dst, src_host):
    np.copyto(dst, src_host)


def mpi_buffer(array):
    return array


def use_in_this_thread():
    # host arrays need no per-thread set-up
    return None


__all__ = [
    "NAME", "to_device", "to_host", "empty", "zeros", "copy_into", "flat_views", "synchronize", "memory_high_water",
    "device_identity",
    "conv_forward", "conv_backward_data", "conv_backward_filter", "conv_backward_bias",
    "relu_forward", "relu_backward", "lrn_forward", "lrn_backward",
    "maxpool_forward", "maxpool_backward", "dropout_forward", "dropout_backward", "dropout_keep",
    "linear_forward", "linear_backward_data", "linear_backward_filter", "linear_backward_bias",
    "crop_flip_normalize", "stage_batch", "crop_staged", "softmax_cross_entropy", "softmax_cross_entropy_rows", "topk_correct", "sgd_momentum_update",
    "sgd_momentum_update_many", "scale_",
    "HOST_MEMORY", "pinned_host_empty", "pin_host_memory", "copy_to_host",
    "copy_to_host_async", "record_event", "wait_event", "copy_from_host", "mpi_buffer",
    "set_num_threads", "get_num_threads", "use_in_this_thread",
]
