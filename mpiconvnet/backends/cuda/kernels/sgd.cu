// sgd.cu: the in-place parameter update and the gradient scaling.
//   sgd_momentum: v = momentum * v + lr * (g + weight_decay * p);  p -= v
//                 (Krizhevsky 2012 / Caffe form, learning rate inside the velocity)
//   scale:        a *= factor   (turns an allreduced sum into a mean)
// Checked against numpy_backend.sgd_momentum_update / scale_ on the GPU
// (tests/test_cuda_ops.py) and exactly, compiled for the host (tests/test_cuda_compile.py).
#include "common.cuh"

template <typename T>
__device__ void sgd_momentum(T* p, const T* g, T* v, long long n, T lr, T momentum, T weight_decay) {
    GRID_STRIDE_LOOP(i, n) {
        T vi = momentum * v[i] + lr * (g[i] + weight_decay * p[i]);
        v[i] = vi;
        p[i] = p[i] - vi;
    }
}

template <typename T>
__device__ void scale(T* a, long long n, T factor) {
    GRID_STRIDE_LOOP(i, n) { a[i] *= factor; }
}

extern "C" __global__ void sgd_momentum_f32(float* p, const float* g, float* v, long long n, float lr, float momentum, float weight_decay) {
    sgd_momentum(p, g, v, n, lr, momentum, weight_decay);
}
extern "C" __global__ void sgd_momentum_f64(double* p, const double* g, double* v, long long n, double lr, double momentum, double weight_decay) {
    sgd_momentum(p, g, v, n, lr, momentum, weight_decay);
}
extern "C" __global__ void scale_f32(float* a, long long n, float factor) { scale(a, n, factor); }
extern "C" __global__ void scale_f64(double* a, long long n, double factor) { scale(a, n, factor); }
