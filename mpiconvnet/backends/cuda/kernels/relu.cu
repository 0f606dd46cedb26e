// relu.cu: ReLU, forward and backward, elementwise over any shape.
//   relu_forward:  y = max(x, 0) as np.maximum(x, 0) gives it: NaN stays NaN, -0 becomes +0
//   relu_backward: dx = dy * (y > 0), the product NumPy computes, so a NaN or inf in dy
//                  where the unit was off still gives NaN, bit for bit like the reference
// Ours, not cudnnActivationForward/Backward: the work is one pass over memory either way,
// and each cuDNN call cost ~70 us of host time on an H100 node against ~12 us for a
// launch of ours, which bounded a small-batch step (docs/benchmarks.md).
// Checked against numpy_backend.relu_forward / relu_backward in tests/test_cuda_ops.py
// and, compiled for the host, in tests/test_cuda_compile.py.
#include "common.cuh"

template <typename T>
__device__ void relu_forward(T* y, const T* x, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = (x[i] > (T)0 || x[i] != x[i]) ? x[i] : (T)0; }
}

template <typename T>
__device__ void relu_backward(T* dx, const T* y, const T* dy, long long n) {
    GRID_STRIDE_LOOP(i, n) { dx[i] = dy[i] * (T)(y[i] > (T)0); }
}

extern "C" __global__ void relu_forward_f32(float* y, const float* x, long long n) { relu_forward(y, x, n); }
extern "C" __global__ void relu_forward_f64(double* y, const double* x, long long n) { relu_forward(y, x, n); }
extern "C" __global__ void relu_backward_f32(float* dx, const float* y, const float* dy, long long n) {
    relu_backward(dx, y, dy, n);
}
extern "C" __global__ void relu_backward_f64(double* dx, const double* y, const double* dy, long long n) {
    relu_backward(dx, y, dy, n);
}
