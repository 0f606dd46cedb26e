"""The CUDA backend: PyCUDA memory and kernels, cuDNN and cuBLAS through ctypes.

Same functions, signatures and semantics as the NumPy backend (the contract is in
mpiconvnet/backends/__init__.py); arrays are DeviceArrays (array.py) in the same layouts, so a
checkpoint written with one backend loads in the other through to_host / to_device.

Importing this package touches no GPU and loads no CUDA library. The trainer calls
`initialize(local_rank, local_size)` first thing (before MPI uses CUDA);
any op called before that initialises on device 0.

Float32 GEMMs and convolutions run in true float32 unless MPICONVNET_TF32=1 or
set_tf32(True) allows TF32 tensor cores. See docs/gpu.md for installation and the stack.
"""
from .augment import crop_flip_normalize, crop_staged, stage_batch
from .context import device_identity, initialize, is_initialized, use_in_this_thread
from .conv import conv_backward_bias, conv_backward_data, conv_backward_filter, conv_forward
from .dense import linear_backward_bias, linear_backward_data, linear_backward_filter, linear_forward
from .layers import (dropout_backward, dropout_forward, lrn_backward, lrn_forward, maxpool_backward,
                     maxpool_forward, relu_backward, relu_forward)
from .loss import softmax_cross_entropy, softmax_cross_entropy_rows, topk_correct
from .memory import (HOST_MEMORY, copy_from_host, copy_into, copy_to_host, copy_to_host_async, empty, flat_views,
                     memory_high_water, mpi_buffer, pin_host_memory, pinned_host_empty, record_event, synchronize,
                     to_device, to_host, wait_event, zeros)
from .mpi_cuda import cuda_aware_mpi
from .update import scale_, sgd_momentum_update, sgd_momentum_update_many

NAME = "cuda"


def set_num_threads(n):
    """The CPU thread count of the NumPy backend's ops; here the GPU does the work."""
    return None


def set_tf32(enabled):
    """Allow (True) or forbid (False, the default) TF32 tensor cores for float32 GEMMs and
    convolutions; takes effect for the next op."""
    from . import context
    context.get().set_tf32(enabled)


__all__ = [
    "NAME", "initialize", "is_initialized", "use_in_this_thread", "device_identity", "set_tf32", "set_num_threads",
    "cuda_aware_mpi",
    "to_device", "to_host", "empty", "zeros", "copy_into", "flat_views", "synchronize", "memory_high_water",
    "conv_forward", "conv_backward_data", "conv_backward_filter", "conv_backward_bias",
    "relu_forward", "relu_backward", "lrn_forward", "lrn_backward", "maxpool_forward", "maxpool_backward",
    "dropout_forward", "dropout_backward",
    "linear_forward", "linear_backward_data", "linear_backward_filter", "linear_backward_bias",
    "softmax_cross_entropy", "softmax_cross_entropy_rows", "topk_correct", "sgd_momentum_update",
    "sgd_momentum_update_many", "scale_",
    "HOST_MEMORY", "pinned_host_empty", "pin_host_memory", "copy_to_host",
    "copy_to_host_async", "record_event", "wait_event", "copy_from_host", "mpi_buffer",
    "crop_flip_normalize", "stage_batch", "crop_staged",
]
