"""Device arrays (array.DeviceArray over one PyCUDA memory pool), host transfers, MPI buffers.

Every transfer is ordered on the backend stream; copies to the host end with a stream
synchronisation, so the host array is complete when the call returns.
"""
import ctypes
import math

import numpy as np

from . import context, libs
from .array import DeviceArray, normalized_shape


def _contiguous_host(host_array):
    a = np.asarray(host_array)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def empty(shape, dtype):
    shape, dtype = normalized_shape(shape), np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return DeviceArray(shape, dtype, None, 0)
    memory = context.get().pool.allocate(nbytes)
    return DeviceArray(shape, dtype, memory, int(memory))


def given_or_new(out, shape, dtype, op):
    """`out` when the caller gave one (checked: same shape and dtype), else a new array:
    gradients are written straight into the model's arrays (views into the allreduce
    buckets), saving a copy of every parameter on the device each step."""
    if out is None:
        return empty(shape, dtype)
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)} {out.dtype}, the result is {tuple(shape)} {dtype}")
    return out


def zeros(shape, dtype):
    a = empty(shape, dtype)
    st = context.get()
    if a.nbytes:
        st.drv.memset_d8_async(a.ptr, 0, a.nbytes, st.stream)
    return a


def to_device(host_array):
    """A device copy of a NumPy array (same shape and dtype)."""
    host = _contiguous_host(host_array)
    a = empty(host.shape, host.dtype)
    if host.nbytes:
        st = context.get()
        # from pageable memory the driver stages the copy before returning, so `host`
        # may be freed afterwards even though the call is asynchronous
        st.drv.memcpy_htod_async(a.ptr, host, st.stream)
    return a


def to_host(array):
    """A NumPy copy of a device array (waits for the queued work that produces it)."""
    out = np.empty(array.shape, array.dtype)
    copy_to_host(out, array)
    return out


def copy_into(dst, src):
    """dst[...] = src on the device (same shape and dtype)."""
    if tuple(dst.shape) != tuple(src.shape) or dst.dtype != src.dtype:
        raise ValueError(f"copy_into: destination {dst.shape} {dst.dtype} does not match source {src.shape} {src.dtype}")
    if src.nbytes:
        st = context.get()
        st.drv.memcpy_dtod_async(dst.ptr, src.ptr, src.nbytes, st.stream)


def flat_views(flat, shapes, align=1):
    """Views into the 1-D device buffer `flat`, one per shape, laid end to end, each
    starting at a multiple of `align` elements."""
    if len(flat.shape) != 1:
        raise ValueError(f"flat_views needs a 1-D buffer, got shape {flat.shape}")
    views, start = [], 0
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        start = -(-start // align) * align
        if start + n > flat.shape[0]:
            raise ValueError(f"flat_views: shapes need {start + n} elements, buffer has {flat.shape[0]}")
        views.append(flat[start:start + n].reshape(shape))
        start += n
    return views


def synchronize():
    context.get().stream.synchronize()


# --- communication ----------------------------------------------------------------------
HOST_MEMORY = False


def memory_high_water():
    # what the pool manages (blocks in use and blocks held for reuse) only shrinks when an
    # allocation ran out of memory and the pool freed its held blocks to retry: keep the
    # largest size seen (sampled when asked: at every metrics line in training)
    st = context.get()
    st.pool_high_water = max(st.pool_high_water, int(st.pool.managed_bytes))
    return st.pool_high_water


def pinned_host_empty(shape, dtype):
    """A page-locked host array (fast, truly asynchronous staging copies)."""
    import pycuda.driver as drv
    context.get()  # page-locked memory belongs to a context
    return drv.pagelocked_empty(normalized_shape(shape), np.dtype(dtype))


class PinnedHostMemory:
    """An existing host array page-locked (cuMemHostRegister) until close() or until it is
    garbage-collected.

    Through the driver API directly, not PyCUDA's register_host_memory: PyCUDA 2026.1's,
    built against NumPy 2.4, segfaults on a plain contiguous array (in subtype_dealloc,
    right after its PyArray_SetBaseObject; found by scripts/host-time.sh --run, which runs
    the real PyCUDA; upstream: inducer/pycuda#459, open)."""

    def __init__(self, array):
        self.array, self.ptr = array, array.ctypes.data
        driver = libs.load_driver()
        status = driver.cuMemHostRegister_v2(ctypes.c_void_p(self.ptr), ctypes.c_size_t(array.nbytes), 0)
        if status != 0:
            self.array = None
            raise RuntimeError(f"cuMemHostRegister of {array.nbytes} bytes failed: {libs.driver_error(status)}")

    def close(self):
        if self.array is not None:
            self.array = None
            try:
                libs.load_driver().cuMemHostUnregister(ctypes.c_void_p(self.ptr))
            except Exception:
                pass   # the driver may already be shutting down at interpreter exit

    __del__ = close


def pin_host_memory(array):
    """Page-lock an existing C-contiguous host array (the loader's shared batch slots) while
    the returned handle lives. Copies from it are then DMA, asynchronous to the host: from
    pageable memory the driver first waits for the stream, then copies through its own
    buffers on the host (~2.5 ms a step for a batch of 128 uint8 images of 256 x 256 while
    the GPU idles). The device reads the array until the stream passes the copy: record an
    event after it and wait for that before overwriting the array."""
    context.get()   # page-locked memory belongs to a context, which must be current here
    if not array.flags.c_contiguous:
        raise ValueError("pin_host_memory: the host array must be C-contiguous")
    return PinnedHostMemory(array)


def copy_to_host(dst_host, src):
    """dst_host[...] = src, complete on return."""
    _queue_copy_to_host("copy_to_host", dst_host, src)
    context.get().stream.synchronize()


def copy_to_host_async(dst_host, src):
    """dst_host[...] = src, queued on the backend stream: complete once an event recorded
    after it has been waited for (record_event / wait_event). dst_host should be
    page-locked (pinned_host_empty): from pageable memory the driver may wait for the copy."""
    _queue_copy_to_host("copy_to_host_async", dst_host, src)


def _queue_copy_to_host(op, dst_host, src):
    if tuple(dst_host.shape) != tuple(src.shape) or dst_host.dtype != src.dtype:
        raise ValueError(f"{op}: host {dst_host.shape} {dst_host.dtype} does not match device {src.shape} {src.dtype}")
    if not dst_host.flags.c_contiguous:
        raise ValueError(f"{op}: the host array must be C-contiguous")
    if src.nbytes:
        st = context.get()
        st.drv.memcpy_dtoh_async(dst_host, src.ptr, st.stream)


def record_event():
    """An event after the work queued so far on the backend stream. Waiting for it instead
    of synchronising lets the thread that queues the work go on queueing (the gradient
    buckets: the communication thread waits, the main thread queues the rest of backward)."""
    st = context.get()
    event = st.event()
    event.record(st.stream)
    return event


def wait_event(event):
    """Block the calling thread until the work before `event` is done (PyCUDA releases the
    GIL meanwhile). A thread other than the initialising one calls use_in_this_thread() first."""
    event.synchronize()


def copy_from_host(dst, src_host):
    """dst[...] = src_host, queued on the backend stream (later work sees the data).

    From page-locked memory the copy is truly asynchronous: do not overwrite src_host
    before the next synchronize().
    """
    if tuple(dst.shape) != tuple(np.shape(src_host)) or dst.dtype != np.asarray(src_host).dtype:
        raise ValueError(f"copy_from_host: device {dst.shape} {dst.dtype} does not match host "
                         f"{np.shape(src_host)} {np.asarray(src_host).dtype}")
    if dst.nbytes:
        st = context.get()
        st.drv.memcpy_htod_async(dst.ptr, _contiguous_host(src_host), st.stream)


class DeviceBuffer:
    """What mpi4py reads and writes for a CUDA-aware MPI: the __cuda_array_interface__
    (version 3) of a contiguous device array, viewed 1-D. The stream field is None: the
    caller synchronises the backend stream first (mpi4py / MPI do not order themselves
    against our stream)."""

    def __init__(self, array):
        self.array = array  # keeps the memory alive while MPI uses it
        self.__cuda_array_interface__ = {
            "shape": (int(array.size),),
            "typestr": np.dtype(array.dtype).str,
            "data": (int(array.ptr), False),
            "strides": None,
            "stream": None,
            "version": 3,
        }


def mpi_buffer(array):
    return DeviceBuffer(array)
