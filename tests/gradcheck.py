"""Central finite differences in float64, for checking the backward of every op.

    check_gradient(lambda x: np.sum(op(x) * dy), x, analytic_dx)

projects the op's output on a fixed random `dy`, so the scalar's gradient is exactly what the
op's backward returns for that dy.
"""
import numpy as np

from tests.tolerances import FD_ATOL, FD_EPS, FD_RTOL


def numerical_gradient(f, x, eps=FD_EPS):
    """d f / d x for a scalar function f of the float64 array x, one element at a time."""
    assert x.dtype == np.float64 and x.flags.c_contiguous, "finite differences need contiguous float64"
    grad = np.full_like(x, np.nan)                       # poisoned: every element must be written
    x_flat, grad_flat = x.reshape(-1), grad.reshape(-1)
    for i in range(x_flat.size):
        original = x_flat[i]
        x_flat[i] = original + eps
        plus = f(x)
        x_flat[i] = original - eps
        minus = f(x)
        x_flat[i] = original
        grad_flat[i] = (plus - minus) / (2 * eps)
    return grad


def check_gradient(f, x, analytic):
    """Assert that `analytic` is the gradient of the scalar f at x (x is restored afterwards)."""
    numeric = numerical_gradient(f, x)
    np.testing.assert_allclose(analytic, numeric, rtol=FD_RTOL, atol=FD_ATOL)
