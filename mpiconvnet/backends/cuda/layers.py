"""ReLU and max pooling (our kernels), LRN (cuDNN, with our kernel where the interface's
exact rule differs from what cuDNN documents), and dropout (our counter-based kernel).

Shapes follow the interface: x, y, dy, dx are (N, C, H, W) for pooling and LRN, any shape
for ReLU and dropout.
"""
import numpy as np

from . import context, cudnn
from .array import DeviceArray
from .memory import empty


def _nchw_desc(st, shape, dtype):
    key = ("nchw", tuple(int(s) for s in shape), dtype.char)
    if key not in st.descriptors:
        st.descriptors[key] = cudnn.TensorDesc(shape, dtype)
    return st.descriptors[key]


def relu_forward(x):
    """y = max(x, 0): our kernel (relu.cu), whose launch costs the host far less than a cuDNN call."""
    st = context.get()
    y = empty(x.shape, x.dtype)
    st.launch("relu_forward", x.dtype, x.size, y.ptr, x.ptr, x.size)
    return y


def relu_backward(y, dy):
    """dx = dy * (y > 0) (relu.cu): y > 0 exactly where x > 0."""
    st = context.get()
    dx = empty(y.shape, y.dtype)
    st.launch("relu_backward", y.dtype, y.size, dx.ptr, y.ptr, dy.ptr, y.size)
    return dx


# --- LRN ----------------------------------------------------------------------------------


def lrn_uses_cudnn(size):
    """cuDNN for odd windows (centred, the same as the interface's); our kernel for even
    ones: cudnn_ops.h gives cuDNN's window as c - lookBehind .. c + lookAhead with
    lookBehind = (n-1)//2, lookAhead = n-1-lookBehind, which puts the extra channel of an
    even window after c, where the interface (PyTorch) puts it before. Also our kernel
    past cuDNN's maximum window."""
    return size % 2 == 1 and cudnn.LRN_MIN_N <= size <= cudnn.LRN_MAX_N


def _lrn_desc(st, size, alpha, beta, k):
    key = ("lrn", int(size), float(alpha), float(beta), float(k))
    if key not in st.descriptors:
        st.descriptors[key] = cudnn.LRNDesc(int(size), alpha, beta, k)
    return st.descriptors[key]


def _nchw(x):
    if len(x.shape) != 4:
        raise ValueError(f"expected an (N, C, H, W) array, got shape {tuple(x.shape)}")
    n, c, h, w = (int(s) for s in x.shape)
    return n, c, h * w


def lrn_forward(x, size, alpha, beta, k):
    st = context.get()
    n, c, hw = _nchw(x)
    y = empty(x.shape, x.dtype)
    if lrn_uses_cudnn(size):
        d = _nchw_desc(st, x.shape, x.dtype)
        one, zero = cudnn.scalars(x.dtype)
        cudnn.call("cudnnLRNCrossChannelForward", st.dnn.ptr, _lrn_desc(st, size, alpha, beta, k).ptr,
                   cudnn.CUDNN_LRN_CROSS_CHANNEL_DIM1, one, d.ptr, x.ptr, zero, d.ptr, y.ptr)
    else:
        st.launch("lrn_forward", x.dtype, x.size, y.ptr, x.ptr, n, c, hw, int(size), alpha, beta, k)
    return y


def lrn_backward(x, y, dy, size, alpha, beta, k):
    st = context.get()
    n, c, hw = _nchw(x)
    dx = empty(x.shape, x.dtype)
    if lrn_uses_cudnn(size):
        d = _nchw_desc(st, x.shape, x.dtype)
        one, zero = cudnn.scalars(x.dtype)
        cudnn.call("cudnnLRNCrossChannelBackward", st.dnn.ptr, _lrn_desc(st, size, alpha, beta, k).ptr,
                   cudnn.CUDNN_LRN_CROSS_CHANNEL_DIM1, one, d.ptr, y.ptr, d.ptr, dy.ptr,
                   d.ptr, x.ptr, zero, d.ptr, dx.ptr)
    else:
        st.launch("lrn_backward", x.dtype, x.size, dx.ptr, x.ptr, y.ptr, dy.ptr, n, c, hw, int(size), alpha, beta, k)
    return dx


# --- max pooling --------------------------------------------------------------------------


class MaxPoolOutput(DeviceArray):
    """y of maxpool_forward, carrying each window's first maximum (int32 offsets in the
    plane), so that the backward pass gathers through them instead of finding them again.
    A reshape or slice of it is a plain DeviceArray."""
    __slots__ = ("first_max",)


def _pool_sizes(x, y_shape, size, stride):
    """The kernels' size arguments: planes, H, W, P, Q, size, stride."""
    n, c, h, w = x.shape
    return (n * c, h, w, y_shape[2], y_shape[3], int(size), int(stride))


def maxpool_forward(x, size, stride):
    """Our kernel (pool.cu), not cudnnPoolingForward: the same values (NaN-propagating
    max), the first maxima recorded for the backward pass, and a launch instead of a
    cuDNN call (~12 against ~73 us of host time on an H100 node)."""
    st = context.get()
    if len(x.shape) != 4:
        raise ValueError(f"expected an (N, C, H, W) array, got shape {tuple(x.shape)}")
    y_shape = cudnn.pool_output_shape(x.shape, size, stride)
    if min(y_shape[2:]) < 1:
        raise ValueError(f"max pooling {size}/{stride} of {tuple(x.shape)} has an empty output")
    out = empty(y_shape, x.dtype)
    y = MaxPoolOutput(out.shape, out.dtype, out.memory, out.ptr)
    y.first_max = empty(y_shape, np.int32)
    st.launch("maxpool_forward", x.dtype, y.size, y.ptr, y.first_max.ptr, x.ptr, *_pool_sizes(x, y_shape, size, stride))
    return y


def maxpool_backward(x, y, dy, size, stride):
    """Our gather (pool.cu): each window's gradient goes to its first maximum in row-major
    order, deterministically. The first maxima come from maxpool_forward through y, or are
    found from x when y is some other array of the right shape."""
    st = context.get()
    sizes = _pool_sizes(x, tuple(dy.shape), size, stride)
    first_max = getattr(y, "first_max", None)
    if first_max is None or first_max.shape != tuple(dy.shape):
        first_max = empty(dy.shape, np.int32)
        st.launch("maxpool_first_max", x.dtype, first_max.size, first_max.ptr, x.ptr, *sizes)
    dx = empty(x.shape, x.dtype)
    st.launch("maxpool_backward", x.dtype, x.size, dx.ptr, first_max.ptr, dy.ptr, *sizes)
    return dx


# --- dropout ------------------------------------------------------------------------------
MASK32 = 0xFFFFFFFF


def mix32(x):
    """The dropout hash's finaliser in Python (uint32 arithmetic), for the per-call base."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def dropout_base(seed, counter):
    """mix32(mix32(seed) ^ counter): the part of h(i) shared by every element."""
    return mix32(mix32(int(seed) & MASK32) ^ (int(counter) & MASK32))


def dropout_threshold(p):
    """keep iff h >= threshold; threshold = min(floor(p * 2**32), 2**32 - 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} outside [0, 1)")
    return min(int(np.floor(p * 2.0 ** 32)), MASK32)


def dropout_forward(x, p, seed, counter, offset=0, row_stride=None):
    st = context.get()
    threshold = dropout_threshold(p)
    if row_stride is None:
        # one row of n elements: index = offset + flat index, as in the reference
        cols, row_stride = int(x.size), 0
    elif len(x.shape) == 2:
        cols = int(x.shape[1])
    else:
        raise ValueError(f"dropout: row_stride={row_stride} needs a 2-D x (rows, cols), got shape {tuple(x.shape)}; "
                         f"reshape x to 2-D or leave row_stride=None")
    y = empty(x.shape, x.dtype)
    mask = empty(x.shape, x.dtype)
    # the reference multiplies by 1/(1-p) rounded to x's dtype; so do we, for equal bits
    scale = float(x.dtype.type(1.0 / (1.0 - p)))
    st.launch("dropout_forward", x.dtype, x.size, y.ptr, mask.ptr, x.ptr, int(x.size), cols, int(row_stride) & MASK32,
              dropout_base(seed, counter), int(offset) & MASK32, threshold, scale)
    return y, mask


def dropout_backward(dy, mask, p):
    st = context.get()
    dropout_threshold(p)  # validates p
    dx = empty(dy.shape, dy.dtype)
    st.launch("dropout_apply", dy.dtype, dy.size, dx.ptr, dy.ptr, mask.ptr, int(dy.size),
              float(dy.dtype.type(1.0 / (1.0 - p))))
    return dx
