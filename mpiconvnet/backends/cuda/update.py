"""The in-place SGD-with-momentum update and gradient scaling (sgd.cu)."""
from . import context


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


def scale_(array, factor):
    """array *= factor, in place."""
    context.get().launch("scale", array.dtype, array.size, array.ptr, int(array.size), float(factor))
