"""The in-place SGD-with-momentum update and gradient scaling (sgd.cu)."""
import struct

from . import context

# sgd.cu's SgdTable: SGD_MAX_SEGMENTS x (p, g, v, n, lr, weight_decay), then momentum, count
MAX_SEGMENTS = 64
SEGMENT_FORMAT = "PPPqdd"
TABLE = struct.Struct("@" + SEGMENT_FORMAT * MAX_SEGMENTS + "dq")
MANY_BLOCKS = 2048   # blocks per tensor: a grid-stride loop, enough to fill a GPU on fc6's 37.7 M


def _check_like(name, a, b):
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        raise ValueError(f"sgd_momentum_update: {name} {tuple(b.shape)} {b.dtype} does not match param "
                         f"{tuple(a.shape)} {a.dtype}")


def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay):
    """velocity = momentum * velocity + lr * (grad + weight_decay * param); param -= velocity."""
    _check_like("grad", param, grad)
    _check_like("velocity", param, velocity)
    context.get().launch("sgd_momentum", param.dtype, param.size, param.ptr, grad.ptr, velocity.ptr, int(param.size),
                         float(lr), float(momentum), float(weight_decay))


def sgd_momentum_update_many(params, grads, velocities, lrs, momentum, weight_decays):
    """sgd_momentum_update on each (param, grad, velocity, lr, weight_decay), in one launch
    per MAX_SEGMENTS tensors: the same arithmetic as the one-tensor kernel, bit for bit."""
    st = context.get()
    rows = list(zip(params, grads, velocities, lrs, weight_decays))
    if not (len(rows) == len(params) == len(grads) == len(velocities) == len(lrs) == len(weight_decays)):
        raise ValueError(f"sgd_momentum_update_many: {len(params)} params, {len(grads)} grads, "
                         f"{len(velocities)} velocities, {len(lrs)} lrs and {len(weight_decays)} weight decays")
    for first in range(0, len(rows), MAX_SEGMENTS):
        chunk = rows[first:first + MAX_SEGMENTS]
        values, largest, dtype = [], 1, chunk[0][0].dtype
        for param, grad, velocity, lr, weight_decay in chunk:
            _check_like("grad", param, grad)
            _check_like("velocity", param, velocity)
            if param.dtype != dtype:
                raise TypeError(f"sgd_momentum_update_many: one launch takes one dtype, got {dtype} and {param.dtype}")
            values += (param.ptr, grad.ptr, velocity.ptr, param.size, float(lr), float(weight_decay))
            largest = max(largest, param.size)
        values += (0, 0, 0, 0, 0.0, 0.0) * (MAX_SEGMENTS - len(chunk))
        table = TABLE.pack(*values, float(momentum), len(chunk))
        grid = (min((largest + context.THREADS - 1) // context.THREADS, MANY_BLOCKS), len(chunk))
        st.launch_grid("sgd_momentum_many", dtype, grid, table)


def scale_(array, factor):
    """array *= factor, in place."""
    context.get().launch("scale", array.dtype, array.size, array.ptr, int(array.size), float(factor))
