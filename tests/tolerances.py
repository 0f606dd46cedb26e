"""Tolerances for comparing a fast path with the NumPy reference, stated once.

float32: elementwise ops agree to rounding; reductions and GEMMs reorder sums, so they get
a looser relative tolerance. Each loosening elsewhere must carry a comment saying why.
"""

ELEMENTWISE_F32 = dict(rtol=1e-5, atol=1e-6)
REDUCTION_F32 = dict(rtol=1e-4, atol=1e-5)   # sums in a different order (GEMM, conv, softmax)
FLOAT64 = dict(rtol=1e-10, atol=1e-12)

# finite differences in float64: central differences with step EPS have truncation error
# ~EPS^2 * f''' and rounding error ~1e-16 / EPS, so 1e-6 balances the two.
FD_EPS = 1e-6
FD_RTOL = 1e-5
FD_ATOL = 1e-7
