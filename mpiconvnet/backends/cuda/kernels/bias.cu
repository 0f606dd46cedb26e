// bias.cu: the bias terms of the dense and convolution layers.
//   bias_add_rows:   y[n, o] += b[o]             (linear_forward, after the cuBLAS GEMM)
//   bias_add_channels: y[n, k, p, q] += b[k]     (conv_forward, after cuDNN's convolution)
//   sum_rows:        db[o] = sum_n dy[n, o]      (linear_backward_bias; conv_backward_bias's
//                                                 first pass, over the batch)
//   sum_cols:        out[r] = sum_c x[r, c]      (conv_backward_bias's second pass, over
//                                                 each channel's pixels)
// conv_backward_bias was cuDNN's cudnnConvolutionBackwardBias, which took 2.2 ms of an
// AlexNet step on an H100 (batch 128), more than any convolution; the two passes here read
// dy once.
// Checked against numpy_backend.linear_forward / linear_backward_bias / conv_forward /
// conv_backward_bias in tests/test_cuda_ops.py (float32 and float64) and on the host in
// tests/test_cuda_compile.py.
#include "common.cuh"

template <typename T>
__device__ void bias_add_rows(T* y, const T* b, long long rows, int cols) {
    GRID_STRIDE_LOOP(i, rows * cols) { y[i] += b[i % cols]; }
}

// a block per (n, k) plane, its threads along the plane's pixels: the channel comes from
// one division per plane, where a grid-stride loop over elements would divide (64-bit,
// emulated on the GPU) for every element
template <typename T>
__device__ void bias_add_channels(T* y, const T* b, long long planes, int channels, int pixels) {
    for (long long plane = blockIdx.x; plane < planes; plane += gridDim.x) {
        T bias = b[plane % channels];
        T* yp = y + plane * pixels;
        for (int p = threadIdx.x; p < pixels; p += blockDim.x) yp[p] += bias;
    }
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

// one warp per row: the lanes read neighbouring addresses, then a fixed shuffle tree
// (deterministic) adds up their partial sums
template <typename T>
__device__ void sum_cols(T* out, const T* x, int rows, int cols) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (warp >= rows) return;  // whole warps exit together
    const T* xr = x + (long long)warp * cols;
    T acc = 0;
    for (int c = lane; c < cols; c += WARP_SIZE) acc += xr[c];
    acc = warp_sum(acc);
    if (lane == 0) out[warp] = acc;
}

extern "C" __global__ void bias_add_rows_f32(float* y, const float* b, long long rows, int cols) { bias_add_rows(y, b, rows, cols); }
extern "C" __global__ void bias_add_rows_f64(double* y, const double* b, long long rows, int cols) { bias_add_rows(y, b, rows, cols); }
extern "C" __global__ void sum_rows_f32(float* out, const float* x, int rows, int cols) { sum_rows(out, x, rows, cols); }
extern "C" __global__ void sum_rows_f64(double* out, const double* x, int rows, int cols) { sum_rows(out, x, rows, cols); }
extern "C" __global__ void sum_cols_f32(float* out, const float* x, int rows, int cols) { sum_cols(out, x, rows, cols); }
extern "C" __global__ void sum_cols_f64(double* out, const double* x, int rows, int cols) { sum_cols(out, x, rows, cols); }
extern "C" __global__ void bias_add_channels_f32(float* y, const float* b, long long planes, int channels, int pixels) {
    bias_add_channels(y, b, planes, channels, pixels);
}
extern "C" __global__ void bias_add_channels_f64(double* y, const double* b, long long planes, int channels,
                                                 int pixels) {
    bias_add_channels(y, b, planes, channels, pixels);
}
