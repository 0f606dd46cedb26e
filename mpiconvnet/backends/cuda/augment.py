"""The loader's uint8 NHWC batch -> the model's float32 NCHW crops, on the GPU.

crop_flip_normalize(images, plan, crop_size, mean_chw, std) does what data/augment.py's
crop_batch does (the definition; see the backend interface): the uint8 batch is copied to
the device once (4x fewer bytes than float32 crops, and 10x fewer than ten-crop
evaluation's crops), then one kernel cuts, mirrors, lights and normalises every crop. This
is what keeps the host loader to moving bytes.

It is stage_batch then crop_staged. stage_batch queues the copies on a second stream, the
copy stream, so a batch staged one step ahead (BatchLoader.device_batches) is moved by the
GPU's copy engine while the step before computes: at batch 128 a step's pixels are 25 MB,
~0.5-1 ms of PCIe time that on the compute stream sat between two steps with the
compute idle. crop_staged makes the compute stream wait for the copy, on the device (the
host does not wait), and queues the kernel.

Two staging areas on the device are used in turn: the batch being cropped and the batch
being copied. Ordering between the two streams:
  - the copy stream rewrites an area only after the compute stream has passed the crop
    that last read it (it waits for an event recorded after that crop, or after the
    area's memory was taken from the pool, whose blocks compute-stream work may still read);
  - the compute stream crops only after the area's copy (it waits for the copy's event);
  - the host rewrites an area's page-locked plan buffer only after its last copy is done;
  - the caller's host images are read until `staged.copied` (the loader waits for it
    before refilling a slot).
"""
import numpy as np

from mpiconvnet.data.augment import check_plan

from . import context
from .memory import empty, to_device

NUM_AREAS = 2   # the batch being cropped and the next one, being copied


def _mean_image(st, mean_chw, side):
    """The (S, S, 3) float32 mean image on the device, from a (3, 1, 1) or (3, S, S)
    mean_chw. One is kept per image side: the loader passes the same array every step,
    and every new loader (each epoch, each evaluation) an equal one, which must not
    leave another copy on the device each time."""
    key = ("mean_image", side)
    cached = st.descriptors.get(key)       # (the caller's array, our host image, the device copy)
    if cached is not None and cached[0] is mean_chw:
        return cached[2]
    host = np.asarray(mean_chw, dtype=np.float32)
    if host.shape not in ((3, 1, 1), (3, side, side)):
        raise ValueError(f"mean_chw must have shape (3, 1, 1) or (3, {side}, {side}), got {host.shape}")
    image = np.ascontiguousarray(np.broadcast_to(host, (3, side, side)).transpose(1, 2, 0))
    if cached is not None and np.array_equal(cached[1], image):
        device = cached[2]
    else:
        # the copy replaced may still be read by a queued crop: the pool hands its block
        # out again only to work ordered after that crop (see StagingArea.reserve)
        device = to_device(image)
    st.descriptors[key] = (mean_chw, image, device)
    return device


class PlanLayout:
    """Where a plan of m crops lies in one byte buffer (one copy for all of it): sources,
    tops, lefts (int32 m each), lighting shifts (float32 3m), 1/std (float32 3), flips
    (uint8 m). Every section starts at a multiple of 4 bytes."""

    def __init__(self, m):
        self.sources, self.tops, self.lefts, self.shift = 0, 4 * m, 8 * m, 12 * m
        self.inv_std = 24 * m
        self.flips = self.inv_std + 12
        self.nbytes = self.flips + m

    def fill(self, buffer, plan, inv_std):
        """Write plan and inv_std into the host byte array buffer."""
        m = len(plan)
        offsets = np.asarray(plan.offsets, dtype=np.int64).reshape(m, 2)
        shift = np.zeros((m, 3), np.float32) if plan.lighting is None else np.asarray(plan.lighting, np.float32)
        for start, values, dtype in ((self.sources, plan.sources, np.int32), (self.tops, offsets[:, 0], np.int32),
                                     (self.lefts, offsets[:, 1], np.int32), (self.shift, shift.reshape(-1), np.float32),
                                     (self.inv_std, inv_std, np.float32)):
            values = np.asarray(values)
            buffer[start:start + values.size * 4].view(dtype)[:] = values
        buffer[self.flips:self.flips + m] = np.asarray(plan.flips, dtype=bool)


class StagingArea:
    """Device memory for one staged batch (uint8 pixels and its plan), grown as needed,
    and a page-locked host buffer the plan is copied from."""

    def __init__(self):
        self.pixels = self.plan = self.plan_host = None
        self.copied = None      # event on the copy stream after the area's last copies
        self.read = None        # event on the compute stream after which the area may be rewritten
        self.generation = 0     # counts the batches staged here

    def reserve(self, st, pixel_bytes, plan_bytes):
        """Make room; new device memory comes from the pool, so `read` is then recorded on
        the compute stream: work queued there may still use those blocks' previous owners."""
        grown = False
        if self.pixels is None or self.pixels.nbytes < pixel_bytes:
            self.pixels, grown = empty((pixel_bytes,), np.uint8), True
        if self.plan is None or self.plan.nbytes < plan_bytes:
            self.plan, grown = empty((plan_bytes,), np.uint8), True
            self.plan_host = st.drv.pagelocked_empty((plan_bytes,), np.uint8)
        if grown:
            self.read = st.event()
            self.read.record(st.stream)


class StagedBatch:
    """A batch whose copy to the device is queued (stage_batch); crop_staged finishes it."""
    __slots__ = ("area", "generation", "copied", "side", "size", "m", "layout", "mean")

    def __init__(self, area, copied, side, size, m, layout, mean):
        self.area, self.generation, self.copied = area, area.generation, copied
        self.side, self.size, self.m, self.layout, self.mean = side, size, m, layout, mean


def _areas(st):
    """This process's staging areas and whose turn it is: [areas, next index]. Held by the
    state, not in its descriptor cache, which set_tf32 clears: an area must not go back
    to the pool while a copy into it may still be running."""
    if st.staging is None:
        st.staging = [[StagingArea() for _ in range(NUM_AREAS)], 0]
    return st.staging


def stage_batch(images, plan, crop_size, mean_chw, std=None):
    st = context.get()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (N, S, S, 3) uint8, got {images.shape} {images.dtype}")
    if not images.flags.c_contiguous:
        images = np.ascontiguousarray(images)
    n, side = images.shape[0], images.shape[1]
    m, size = len(plan), int(crop_size)
    check_plan(plan, n, side, size)
    # the reciprocal exactly as crop_batch takes it, so unlit crops agree bit for bit
    inv_std = np.ones(3, np.float32) if std is None else (1.0 / np.asarray(std, dtype=np.float32)).reshape(3)
    mean = _mean_image(st, mean_chw, side)     # on the compute stream, before the crop
    layout = PlanLayout(m)
    holder = _areas(st)
    area = holder[0][holder[1]]
    holder[1] = (holder[1] + 1) % NUM_AREAS
    if area.copied is not None:
        area.copied.synchronize()    # the host plan buffer is read by its last copy until then
    area.generation += 1
    area.reserve(st, max(images.nbytes, 1), layout.nbytes)
    layout.fill(area.plan_host, plan, inv_std)
    copy = st.copy_stream
    if area.read is not None:
        copy.wait_for_event(area.read)
    st.drv.memcpy_htod_async(area.plan.ptr, area.plan_host[:layout.nbytes], copy)
    if images.nbytes:
        st.drv.memcpy_htod_async(area.pixels.ptr, images, copy)
    area.copied = st.event()
    area.copied.record(copy)
    return StagedBatch(area, area.copied, side, size, m, layout, mean)


def crop_staged(staged):
    st = context.get()
    area = staged.area
    if area.generation != staged.generation:
        raise RuntimeError(f"crop_staged: this batch's staging area was reused by a later stage_batch "
                           f"(only {NUM_AREAS} batches can be staged at once); crop each staged batch before "
                           f"staging {NUM_AREAS} more")
    out = empty((staged.m, 3, staged.size, staged.size), np.float32)
    if staged.m == 0:
        return out
    st.stream.wait_for_event(staged.copied)
    layout, base = staged.layout, area.plan.ptr
    st.launch("crop_flip_normalize", np.float32, out.size, out.ptr, area.pixels.ptr, base + layout.sources,
              base + layout.tops, base + layout.lefts, base + layout.flips, staged.mean.ptr, base + layout.shift,
              base + layout.inv_std, staged.m, staged.side, staged.size)
    area.read = st.event()
    area.read.record(st.stream)
    return out


def crop_flip_normalize(images, plan, crop_size, mean_chw, std=None):
    staged = stage_batch(images, plan, crop_size, mean_chw, std)
    x = crop_staged(staged)
    # as on NumPy, the caller may change `images` once this returns, page-locked or not
    staged.copied.synchronize()
    return x
