// sgd.cu: the in-place parameter update and the gradient scaling.
//   sgd_momentum: v = momentum * v + lr * (g + weight_decay * p);  p -= v
//                 (Krizhevsky 2012 / Caffe form, learning rate inside the velocity)
//   sgd_momentum_many: the same on up to SGD_MAX_SEGMENTS tensors in one launch, each with
//                 its own lr and weight decay (a table passed by value: no upload, and a
//                 learning rate that changes every step costs nothing); blockIdx.y picks
//                 the tensor. One launch instead of one per tensor (16 for AlexNet).
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

// the table's layout is packed on the host by backends/cuda/update.py (SEGMENT_FORMAT);
// every field is 8 bytes, so it has no padding. 64 x 48 + 16 = 3088 bytes of the 4 KB a
// kernel's parameters may take.
#define SGD_MAX_SEGMENTS 64
struct SgdSegment {
    void* p;
    const void* g;
    void* v;
    long long n;
    double lr;            // cast to T here, as the one-tensor kernel's T argument is
    double weight_decay;
};
struct SgdTable {
    SgdSegment seg[SGD_MAX_SEGMENTS];
    double momentum;
    long long count;
};

template <typename T>
__device__ void sgd_momentum_many(const SgdTable& table) {
    if (blockIdx.y >= table.count) return;
    const SgdSegment& s = table.seg[blockIdx.y];
    T* p = (T*)s.p;
    const T* g = (const T*)s.g;
    T* v = (T*)s.v;
    const T lr = (T)s.lr, momentum = (T)table.momentum, weight_decay = (T)s.weight_decay;
    GRID_STRIDE_LOOP(i, s.n) {
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
extern "C" __global__ void sgd_momentum_many_f32(const SgdTable table) { sgd_momentum_many<float>(table); }
extern "C" __global__ void sgd_momentum_many_f64(const SgdTable table) { sgd_momentum_many<double>(table); }
extern "C" __global__ void scale_f32(float* a, long long n, float factor) { scale(a, n, factor); }
extern "C" __global__ void scale_f64(double* a, long long n, double factor) { scale(a, n, factor); }
