"""Tolerances for comparing a fast path with the NumPy reference, stated once.

float32: elementwise ops agree to rounding; reductions and GEMMs reorder sums, so they get
a looser relative tolerance. Each loosening elsewhere must carry a comment saying why.
"""
import numpy as np

ELEMENTWISE_F32 = dict(rtol=1e-5, atol=1e-6)
REDUCTION_F32 = dict(rtol=1e-4, atol=1e-5)   # sums in a different order (GEMM, conv, softmax)
FLOAT64 = dict(rtol=1e-10, atol=1e-12)


def reduction_f32(reference):
    """REDUCTION_F32 for long sums (GEMMs, convolutions), whose rounding error scales with the
    size of the terms, not of the result: an output that cancels to near zero keeps the
    absolute error of its neighbours. So the absolute tolerance also scales with the
    reference's RMS. On an H100 (2026-11-24) cuBLAS/cuDNN in FMA math were off by at most
    1e-6 x RMS (4.5e-5 on 2048-term sums of RMS 45); TF32 inputs are off by up to 3e-3 x RMS
    there, so the check still tells the two apart."""
    rms = float(np.sqrt(np.mean(np.square(reference, dtype=np.float64)))) if np.size(reference) else 0.0
    return dict(rtol=REDUCTION_F32["rtol"], atol=max(REDUCTION_F32["atol"], 1e-5 * rms))


# finite differences in float64: central differences with step EPS have truncation error
# ~EPS^2 * f''' and rounding error ~1e-16 / EPS, so 1e-6 balances the two.
FD_EPS = 1e-6
FD_RTOL = 1e-5
FD_ATOL = 1e-7
