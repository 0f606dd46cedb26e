"""The loader's uint8 NHWC batch -> the model's float32 NCHW crops, on the GPU.

crop_flip_normalize(images, plan, crop_size, mean_chw, std) does what
data/augment.py's crop_batch does (the definition; see the backend interface): the uint8
batch is copied to the device once (4x fewer bytes than float32 crops, and 10x fewer than
ten-crop evaluation's crops), then one kernel cuts, mirrors, lights and normalises every
crop. This is what keeps the host loader to moving bytes.
"""
import numpy as np

from mpiconvnet.data.augment import check_plan

from . import context
from .memory import empty, to_device


def _mean_image(st, mean_chw, side):
    """The (S, S, 3) float32 mean image on the device, from a (3, 1, 1) or (3, S, S)
    mean_chw; cached per mean array (the loader passes the same one every step)."""
    key = ("mean_image", id(mean_chw), side)
    cached = st.descriptors.get(key)
    if cached is not None and cached[0] is mean_chw:
        return cached[1]
    host = np.asarray(mean_chw, dtype=np.float32)
    if host.shape not in ((3, 1, 1), (3, side, side)):
        raise ValueError(f"mean_chw must have shape (3, 1, 1) or (3, {side}, {side}), got {host.shape}")
    image = np.ascontiguousarray(np.broadcast_to(host, (3, side, side)).transpose(1, 2, 0))
    device = to_device(image)
    st.descriptors[key] = (mean_chw, device)   # holding mean_chw keeps its id from being reused
    return device


def crop_flip_normalize(images, plan, crop_size, mean_chw, std=None):
    st = context.get()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (N, S, S, 3) uint8, got {images.shape} {images.dtype}")
    n, side = images.shape[0], images.shape[1]
    m, size = len(plan), int(crop_size)
    check_plan(plan, n, side, size)
    sources = np.asarray(plan.sources, dtype=np.int64)
    offsets = np.asarray(plan.offsets, dtype=np.int64).reshape(m, 2)
    shift = np.zeros((m, 3), np.float32) if plan.lighting is None else np.asarray(plan.lighting, np.float32)
    # the reciprocal exactly as crop_batch takes it, so unlit crops agree bit for bit
    inv_std = np.ones(3, np.float32) if std is None else (1.0 / np.asarray(std, dtype=np.float32)).reshape(3)
    out = empty((m, 3, size, size), np.float32)
    if m == 0:
        return out
    # the device inputs are held in names until the launch is queued: a temporary whose .ptr
    # is taken goes back to the memory pool at once, and the next upload of the same size
    # (sources, tops and lefts are all m int32) would get that block and overwrite it
    inputs = [to_device(np.ascontiguousarray(images)), to_device(sources.astype(np.int32)),
              to_device(np.ascontiguousarray(offsets[:, 0], np.int32)),
              to_device(np.ascontiguousarray(offsets[:, 1], np.int32)),
              to_device(np.asarray(plan.flips, dtype=bool).astype(np.uint8)), _mean_image(st, mean_chw, side),
              to_device(np.ascontiguousarray(shift)), to_device(inv_std)]
    # after the launch they may go back to the pool: whatever reuses them is queued behind
    # this kernel on the same stream
    st.launch("crop_flip_normalize", np.float32, out.size, out.ptr, *(a.ptr for a in inputs), m, side, size)
    return out
