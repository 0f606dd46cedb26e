// common.cuh: helpers shared by every kernel family under kernels/.
//
// Kernels are declared `extern "C"` with an explicit _f32 / _f64 suffix so PyCUDA can
// fetch them by plain name (SourceModule is built with no_extern_c=True, which keeps the
// templates below legal C++). Every file compiles on its own with
// `nvcc -arch=sm_90 -cubin` (tests/test_cuda_compile.py).
#pragma once

#include <stdint.h>

// grid-stride loop over n elements: correct for any launch size, so the Python side
// can cap the grid without changing results.
#define GRID_STRIDE_LOOP(i, n)                                                        \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

// the dropout hash (numpy_backend.dropout_keep is the definition): a 32-bit integer
// finaliser, all arithmetic modulo 2**32.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

template <typename T> __device__ __forceinline__ T neg_infinity();
template <> __device__ __forceinline__ float neg_infinity<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double neg_infinity<double>() { return -(double)INFINITY; }

template <typename T> __device__ __forceinline__ T exp_t(T x);
template <> __device__ __forceinline__ float exp_t<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double exp_t<double>(double x) { return exp(x); }

template <typename T> __device__ __forceinline__ T log_t(T x);
template <> __device__ __forceinline__ float log_t<float>(float x) { return logf(x); }
template <> __device__ __forceinline__ double log_t<double>(double x) { return log(x); }

template <typename T> __device__ __forceinline__ T pow_t(T x, T y);
template <> __device__ __forceinline__ float pow_t<float>(float x, float y) { return powf(x, y); }
template <> __device__ __forceinline__ double pow_t<double>(double x, double y) { return pow(x, y); }

// lanes per warp. A macro so that tests/test_cuda_compile.py can compile the one-warp-per-row
// kernels for the host with WARP_SIZE 1 (one lane does the whole row, no shuffles).
#ifndef WARP_SIZE
#define WARP_SIZE 32
#endif

// warp-wide reductions (all lanes take part)
template <typename T> __device__ __forceinline__ T warp_max(T v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
