"""Inverted dropout with masks from a counter-based hash, identical on every backend.

The mask is a pure function of (seed, counter, offset + element index), not of a random
generator's state, so the CUDA kernel draws exactly the mask this file draws, a resumed run
draws the masks the uninterrupted run would have drawn (the trainer passes the step as
counter), and a rank holding rows r.. of the global batch passes offset = r * features per
sample to draw exactly those rows of the one-rank mask. A rank holding columns c0.. of a
2-D activation (rows, H) passes offset = c0 and row_stride = H to draw exactly those
columns of the one-rank mask.
"""
import math

import numpy as np

_MASK32 = 0xFFFFFFFF


def mix32(x):
    """lowbias32 (Chris Wellons' hash-prospector): a bijection on uint32 with good avalanche.

    x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16,
    all in uint32 with wrap-around. Works on Python ints (masked) and uint32 arrays.
    """
    if isinstance(x, np.ndarray):
        # numpy uint32 array arithmetic wraps silently, as the hash needs
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def keep_threshold(p):
    """The uint32 threshold below which an element is dropped: min(floor(p * 2**32), 2**32 - 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability p={p} is outside [0, 1]")
    return min(math.floor(p * 4294967296.0), _MASK32)


def dropout_keep(seed, counter, shape, p, offset=0, row_stride=None):
    """Which elements of an array of `shape` (an int n, or a tuple) dropout keeps: a bool
    array of that shape.

    Definition (every backend computes exactly this; all arithmetic in uint32 with
    wrap-around, seed, counter, offset and row_stride taken modulo 2**32):

        i         = offset + the flat C-order element index          (row_stride None)
        i         = offset + r * row_stride + c    for element (r, c) of a 2-D shape
        h(i)      = mix32(mix32(mix32(seed) ^ counter) ^ i)
        keep[i]   = h(i) >= min(floor(p * 2**32), 2**32 - 1)      compared as integers

    so p = 0 keeps every element, and each element is kept with probability 1 - p
    (to within 2**-32). Rank r of a batch split by rows passes the position of its first
    element in the global batch as offset; a rank holding columns c0..c0+w of a (rows, H)
    matrix passes offset = c0 (plus the first row's position times H) and row_stride = H.
    Either way N ranks draw the elements one rank with the whole matrix draws.
    """
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    key = np.uint32(mix32(mix32(seed & _MASK32) ^ (counter & _MASK32)))
    if row_stride is None:
        # wraps past 2**32 elements, as uint32 does
        index = (np.arange(math.prod(shape), dtype=np.uint64) + np.uint64(offset)).astype(np.uint32)
    else:
        if len(shape) != 2:
            raise ValueError(f"dropout: row_stride={row_stride} needs a 2-D x (rows, cols), got shape {shape}; "
                             f"reshape x to 2-D or leave row_stride=None")
        rows = np.arange(shape[0], dtype=np.uint32)[:, None]
        cols = np.arange(shape[1], dtype=np.uint32)[None, :]
        # uint32 arrays wrap silently, as the definition asks
        index = np.uint32(int(offset) & _MASK32) + rows * np.uint32(int(row_stride) & _MASK32) + cols
    return (mix32(index ^ key) >= keep_threshold(p)).reshape(shape)


def dropout_forward(x, p, seed, counter, offset=0, row_stride=None):
    # x: (...) -> y: (...), mask: (...) of x's dtype, 0 or 1; with row_stride x: (rows, cols)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: probability p={p} must be in [0, 1) (p = 1 would drop everything)")
    mask = dropout_keep(seed, counter, x.shape, p, offset, row_stride).astype(x.dtype)
    return x * mask * x.dtype.type(1.0 / (1.0 - p)), mask


def dropout_backward(dy, mask, p):
    # dy, mask: (...) -> dx: (...)
    return dy * mask * dy.dtype.type(1.0 / (1.0 - p))
