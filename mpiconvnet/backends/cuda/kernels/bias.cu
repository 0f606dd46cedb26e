// bias.cu: the bias terms of the dense layers.
//   bias_add_rows:   y[n, o] += b[o]             (linear_forward, after the cuBLAS GEMM)
//   sum_rows:        db[o] = sum_n dy[n, o]      (linear_backward_bias)
// Checked against numpy_backend.linear_forward / linear_backward_bias in
// tests/test_cuda_ops.py (float32 and float64) and on the host in tests/test_cuda_compile.py.
#include "common.cuh"

template <typename T>
__device__ void bias_add_rows(T* y, const T* b, long long rows, int cols) {
    GRID_STRIDE_LOOP(i, rows * cols) { y[i] += b[i % cols]; }
}

// one thread per column walks down the rows: neighbouring threads read neighbouring
// addresses (coalesced), and the sum order is fixed (deterministic).
template <typename T>
__device__ void sum_rows(T* out, const T* x, int rows, int cols) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    T acc = 0;
    for (int r = 0; r < rows; ++r) acc += x[(long long)r * cols + col];
    out[col] = acc;
}

extern "C" __global__ void bias_add_rows_f32(float* y, const float* b, long long rows, int cols) { bias_add_rows(y, b, rows, cols); }
extern "C" __global__ void bias_add_rows_f64(double* y, const double* b, long long rows, int cols) { bias_add_rows(y, b, rows, cols); }
extern "C" __global__ void sum_rows_f32(float* out, const float* x, int rows, int cols) { sum_rows(out, x, rows, cols); }
extern "C" __global__ void sum_rows_f64(double* out, const double* x, int rows, int cols) { sum_rows(out, x, rows, cols); }
