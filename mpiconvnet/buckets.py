"""Gradient buckets and their allreduce, overlapped with backward.

Gradients live in a few flat buffers (buckets of ~25 MB, DDP's default), planned once in
reverse layer order: backward finishes fc8 first and conv1 last, so the first bucket is
ready while most of backward still runs. Each parameter's gradient is a view into its
bucket, so nothing is packed or unpacked per step.

When a bucket is complete it is handed to a communication thread that runs a *blocking*
MPI Allreduce on it (mpi4py releases the GIL inside MPI; Open MPI refuses device buffers
in non-blocking reductions, so a thread is the portable way to overlap). With a CUDA
backend and an MPI that is not CUDA-aware, the bucket is first copied into a persistent
pinned host buffer and copied back after the reduction. On a GPU the bucket goes with an
event recorded after its gradients (and their copy to the host): the communication thread
waits for that event, while the main thread goes on queueing backward; waiting on the main
thread would leave the GPU idle at every bucket while Python queued the next layers.
"""
import queue
import threading
import time

import numpy as np


def plan_buckets(param_shapes, itemsize, bucket_bytes):
    """Group parameter names into buckets in reverse order, each up to bucket_bytes.

    param_shapes: {name: shape} in forward order. A parameter larger than a bucket gets a
    bucket of its own (fc6.weight is 151 MB in float32). Returns [[name, ...], ...].
    """
    buckets, current, current_bytes = [], [], 0
    for name in reversed(list(param_shapes)):
        size = int(np.prod(param_shapes[name])) * itemsize
        if current and current_bytes + size > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        buckets.append(current)
    return buckets


# each gradient's view starts at a multiple of this many bytes into its bucket:
# the backward ops write gradients straight into the views, and cuDNN's and cuBLAS's
# vectorised kernels want aligned addresses (the pool's own blocks are 256-byte aligned).
# The padding between views is zeros, and stays zeros through the reduction.
VIEW_ALIGN_BYTES = 256


def padded_size(shapes, align):
    """Elements of a flat buffer holding `shapes` end to end, each starting at a multiple of align."""
    total = 0
    for shape in shapes:
        total = -(-total // align) * align + int(np.prod(shape, dtype=np.int64))
    return total


class GradientBuckets:
    """Flat gradient buffers on the backend and a view per parameter."""

    def __init__(self, ops, param_shapes, dtype, bucket_bytes):
        self.ops = ops
        itemsize = np.dtype(dtype).itemsize
        self.names = plan_buckets(param_shapes, itemsize, bucket_bytes)
        self.buffers, self.views, self.bucket_of = [], {}, {}
        align = VIEW_ALIGN_BYTES // itemsize
        for b, names in enumerate(self.names):
            shapes = [tuple(param_shapes[n]) for n in names]
            flat = ops.zeros((padded_size(shapes, align),), dtype)
            self.buffers.append(flat)
            for name, view in zip(names, ops.flat_views(flat, shapes, align)):
                self.views[name] = view
                self.bucket_of[name] = b

    @property
    def sizes(self):
        return [int(buf.shape[0]) for buf in self.buffers]


class GradientReducer:
    """Averages (or sums) the buckets over all ranks; starts each one as soon as it is complete.

    Per step: `begin()`, then `grads_ready(names)` from backward as layers finish, then
    `finish()`, which waits for the last reductions and returns the seconds the caller
    spent waiting (the communication that backward did not hide).

    average=False leaves the sum: the trainer scales the loss gradient by 1/size instead
    (each rank's gradient is then its share of the global-batch mean), which spares a
    pass over all 244 MB of AlexNet's gradients every step.
    """

    def __init__(self, world, buckets, overlap=True, cuda_aware=False, timeout=300.0, on_stall=None, average=True):
        self.world, self.buckets, self.ops = world, buckets, buckets.ops
        self.average = average
        self.on_stall = on_stall   # called when a reduction makes no progress for `timeout`
        self.overlap = overlap and world.size > 1
        self.timeout = timeout
        # device buffers go to MPI directly only when the MPI can read them; one rank reduces
        # nothing, and needs no page-locked copy of every gradient (244 MB for AlexNet)
        self.staged = world.size > 1 and not self.ops.HOST_MEMORY and not cuda_aware
        self.host = [self.ops.pinned_host_empty(buf.shape, buf.dtype) for buf in buckets.buffers] if self.staged else None
        self.remaining = None
        self.launched = []    # (bucket, its event) of this step, in launch order
        self.done = queue.Queue()
        self.work = queue.Queue()
        self.thread = None
        if self.overlap:
            self.thread = threading.Thread(target=self._serve, name="allreduce", daemon=True)
            self.thread.start()

    # -- the communication thread ---------------------------------------------------

    def _serve(self):
        # this thread waits for the GPU's events, and a CUDA-aware MPI reads device memory here
        try:
            self.ops.use_in_this_thread()
            failure = None
        except BaseException as e:   # answered to every bucket: finish() raises it at once
            failure = e
        while True:
            item = self.work.get()
            if item is None:
                return
            b, ready = item
            if failure is not None:
                self.done.put((b, failure))
                continue
            try:
                self.ops.wait_event(ready)   # the bucket's gradients, or their host copy, are complete
                self._reduce_and_average(b)
                self.done.put((b, None))
            except BaseException as e:   # reported to the main thread, which raises it
                self.done.put((b, e))

    def _reduce_and_average(self, b):
        """Sum bucket b over ranks and, where it lives in host memory, divide by the rank
        count right away (in the communication thread, behind backward). A device bucket
        of a CUDA-aware MPI is divided in finish(), on the thread that owns the GPU."""
        from mpi4py import MPI
        buf = self.host[b] if self.staged else self.ops.mpi_buffer(self.buckets.buffers[b])
        self.world.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if not self.average:
            return
        if self.staged:
            buf *= buf.dtype.type(1.0 / self.world.size)
        elif self.ops.HOST_MEMORY:
            self.ops.scale_(self.buckets.buffers[b], 1.0 / self.world.size)

    # -- the main thread ------------------------------------------------------------

    def begin(self):
        self.remaining = [len(names) for names in self.buckets.names]
        self.launched = []

    def grads_ready(self, names):
        for name in names:
            b = self.buckets.bucket_of[name]
            self.remaining[b] -= 1
            if self.remaining[b] == 0:
                self._launch(b)

    def _launch(self, b):
        if self.world.size == 1:
            return
        if self.staged:
            self.ops.copy_to_host_async(self.host[b], self.buckets.buffers[b])
        # MPI must not read the bucket (or its host copy) before the GPU has written it:
        # whoever reduces it waits for this event first
        ready = self.ops.record_event()
        self.launched.append((b, ready))
        if self.overlap:
            self.work.put((b, ready))

    def finish(self):
        """Wait for every bucket, divide by the rank count; return exposed seconds."""
        if any(self.remaining):
            missing = [n for n, b in self.buckets.bucket_of.items() if self.remaining[b]]
            raise RuntimeError(f"backward did not report gradients for {missing[:4]}")
        start = time.perf_counter()
        if self.world.size > 1:
            if self.overlap:
                for _ in self.launched:
                    try:
                        b, error = self.done.get(timeout=self.timeout)
                    except queue.Empty:
                        if self.on_stall is not None:
                            self.on_stall()   # names the silent rank and aborts
                        raise RuntimeError(f"rank {self.world.rank}: gradient allreduce made no progress "
                                           f"for {self.timeout:.0f} s; another rank is dead or hung") from None
                    if error is not None:
                        raise error
            else:
                for b, ready in self.launched:
                    self.ops.wait_event(ready)
                    self._reduce_and_average(b)
            for b, _ in self.launched:
                if self.staged:
                    self.ops.copy_from_host(self.buckets.buffers[b], self.host[b])
                elif not self.ops.HOST_MEMORY and self.average:
                    # CUDA-aware: the sum is on the device; one scaling kernel per bucket
                    self.ops.scale_(self.buckets.buffers[b], 1.0 / self.world.size)
        return time.perf_counter() - start

    def close(self):
        if self.thread is not None:
            self.work.put(None)
            self.thread.join(timeout=5)
            self.thread = None
