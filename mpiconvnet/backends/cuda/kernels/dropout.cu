// dropout.cu: inverted dropout with the counter-based mask of numpy_backend.dropout_keep.
//   h(i) = mix32(base ^ index(i)), base = mix32(mix32(seed) ^ counter) (computed on the
//   host), keep iff h(i) >= threshold; y = x * keep * scale, scale = 1/(1-p) rounded to T as in
//   the reference; mask = keep as 0/1.
//   index(i) = offset + (i / cols) * row_stride + (i % cols) in uint32: element (r, c) of a
//   row-major (n / cols, cols) matrix gets offset + r * row_stride + c, so a rank holding a
//   column slice draws those columns of the whole matrix's mask. The plain case passes
//   cols = n and row_stride = 0, so index(i) = offset + i.
//   dropout_apply: dx = dy * mask * scale (the backward pass).
// Checked bit for bit against numpy_backend.dropout_keep, and y / dx against
// numpy_backend.dropout_forward / dropout_backward, on the GPU (tests/test_cuda_ops.py) and,
// compiled for the host, in tests/test_cuda_compile.py.
#include "common.cuh"

template <typename T>
__device__ void dropout_forward(T* y, T* mask, const T* x, long long n, long long cols, uint32_t row_stride,
                                uint32_t base, uint32_t offset, uint32_t threshold, T scale) {
    GRID_STRIDE_LOOP(i, n) {
        // index arithmetic wraps modulo 2**32 like the reference
        uint32_t index = offset + (uint32_t)(i / cols) * row_stride + (uint32_t)(i % cols);
        uint32_t h = mix32(base ^ index);
        T keep = h >= threshold ? T(1) : T(0);
        mask[i] = keep;
        y[i] = x[i] * keep * scale;
    }
}

template <typename T>
__device__ void dropout_apply(T* dx, const T* dy, const T* mask, long long n, T scale) {
    GRID_STRIDE_LOOP(i, n) { dx[i] = dy[i] * mask[i] * scale; }
}

extern "C" __global__ void dropout_forward_f32(float* y, float* mask, const float* x, long long n, long long cols,
                                               uint32_t row_stride, uint32_t base, uint32_t offset,
                                               uint32_t threshold, float scale) {
    dropout_forward(y, mask, x, n, cols, row_stride, base, offset, threshold, scale);
}
extern "C" __global__ void dropout_forward_f64(double* y, double* mask, const double* x, long long n, long long cols,
                                               uint32_t row_stride, uint32_t base, uint32_t offset,
                                               uint32_t threshold, double scale) {
    dropout_forward(y, mask, x, n, cols, row_stride, base, offset, threshold, scale);
}
extern "C" __global__ void dropout_apply_f32(float* dx, const float* dy, const float* mask, long long n, float scale) {
    dropout_apply(dx, dy, mask, n, scale);
}
extern "C" __global__ void dropout_apply_f64(double* dx, const double* dy, const double* mask, long long n, double scale) {
    dropout_apply(dx, dy, mask, n, scale);
}
