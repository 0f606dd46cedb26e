"""SGD with momentum and weight decay, in place (Krizhevsky 2012 / Caffe form):

    velocity = momentum * velocity + lr * (grad + weight_decay * param)
    param    = param - velocity

fc6's weights alone are 37.7 M floats, so the update runs over slices of about CHUNK_BYTES
on the thread pool: each slice's temporaries stay in cache and memory is read once.
"""
from mpiconvnet.backends.numpy_ops.threads import parallel_map, split


def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay):
    # param, grad, velocity: same shape, updated in place (param and velocity)
    if not (param.shape == grad.shape == velocity.shape):
        raise ValueError(f"sgd_momentum_update: shapes differ: param {param.shape}, grad {grad.shape}, "
                         f"velocity {velocity.shape}")
    # plain Python floats: a NumPy float64 scalar would upcast float32 temporaries
    lr, momentum, weight_decay = float(lr), float(momentum), float(weight_decay)
    if not (param.flags.c_contiguous and velocity.flags.c_contiguous):
        raise ValueError("sgd_momentum_update: param and velocity must be contiguous arrays "
                         "(flat views would be copies and the update would be lost)")
    p, g, v = (a.reshape(-1) for a in (param, grad, velocity))   # views of param and velocity

    def update(elements):
        step = p[elements] * weight_decay
        step += g[elements]
        step *= lr
        v[elements] *= momentum
        v[elements] += step
        p[elements] -= v[elements]

    parallel_map(update, split(p.size, p.itemsize * 4))


def sgd_momentum_update_many(params, grads, velocities, lrs, momentum, weight_decays):
    # sgd_momentum_update on each tensor in turn (the CUDA backend does them in one launch)
    if not (len(params) == len(grads) == len(velocities) == len(lrs) == len(weight_decays)):
        raise ValueError(f"sgd_momentum_update_many: {len(params)} params, {len(grads)} grads, "
                         f"{len(velocities)} velocities, {len(lrs)} lrs and {len(weight_decays)} weight decays")
    for param, grad, velocity, lr, weight_decay in zip(params, grads, velocities, lrs, weight_decays):
        sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay)


def scale_(array, factor):
    # array *= factor, in place
    array *= float(factor)
