"""The CUDA backend's array: a C-contiguous block of device memory with a shape and a dtype.

The ops need no more than that (shape, dtype, size, nbytes, the device address as `ptr`,
reshape, 1-D slices), and an AlexNet training step makes ~50 of them. PyCUDA's GPUArray costs
several times more to construct (strides, a launch shape from driver queries, checks) for
features we do not use; host time is what bounds small and TF32 steps on a GPU (see
scripts/host-time.sh and docs/benchmarks.md).

The memory is a PyCUDA pool allocation; an array and every view of it hold a reference,
and the last one gone returns the block to the pool.
"""
import math

import numpy as np


class DeviceArray:
    __slots__ = ("shape", "dtype", "size", "nbytes", "ptr", "memory")

    def __init__(self, shape, dtype, memory, ptr):
        # shape: a tuple of ints; dtype: a numpy dtype (callers normalise both)
        self.shape = shape
        self.dtype = dtype
        self.size = math.prod(shape)
        self.nbytes = self.size * dtype.itemsize
        self.memory = memory   # keeps the block alive; None for an empty array
        self.ptr = ptr         # device address (int); 0 for an empty array

    @property
    def ndim(self):
        return len(self.shape)

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d device array")
        return self.shape[0]

    def reshape(self, *shape):
        """A view with another shape (one dimension may be -1), as numpy's reshape."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        shape = tuple(map(int, shape))
        if shape.count(-1) > 1:
            raise ValueError(f"reshape {self.shape} to {shape}: only one dimension may be -1")
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            if known == 0 or self.size % known:
                raise ValueError(f"cannot reshape a device array of shape {self.shape} into {shape}")
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.size or min(shape, default=0) < 0:
            raise ValueError(f"cannot reshape a device array of shape {self.shape} into {shape}")
        return DeviceArray(shape, self.dtype, self.memory, self.ptr)

    def __getitem__(self, index):
        """x[a:b] of a 1-D array: a view (the only indexing the backend needs)."""
        if len(self.shape) != 1 or not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"device arrays support x[a:b] views of 1-D arrays only, got [{index!r}] "
                            f"of shape {self.shape}")
        start, stop, _ = index.indices(self.shape[0])
        count = max(stop - start, 0)
        ptr = self.ptr + start * self.dtype.itemsize if count else 0
        return DeviceArray((count,), self.dtype, self.memory, ptr)

    def astype(self, dtype):
        """A copy in another dtype, made on the host: float32 -> float64 input for float64
        models (a debugging precision), where a round trip costs nothing that matters."""
        from .memory import to_device, to_host
        return to_device(to_host(self).astype(dtype))

    def get(self):
        """A numpy copy (as GPUArray.get)."""
        from .memory import to_host
        return to_host(self)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "strides": None, "stream": None, "version": 3}

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr={self.ptr:#x})"


def normalized_shape(shape):
    """A shape as a tuple of ints (an int, or any sequence of integers)."""
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(map(int, shape))
