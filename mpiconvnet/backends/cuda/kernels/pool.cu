// pool.cu: the backward pass of max pooling (no padding, floor division of sizes).
//   dx[n,c,h,w] = sum over the windows (ph,pw) whose FIRST maximum in row-major window
//                 order is (h,w) of dy[n,c,ph,pw]
// The forward pass is cuDNN's; the backward is ours because the interface fixes the tie
// rule (first maximum), which cuDNN does not document, and because gathering (one thread
// per input element, a fixed summation order) is deterministic where scattering with
// atomics is not. Two passes: maxpool_first_max finds each window's first maximum once,
// then maxpool_backward gathers. (One pass that rescanned every window from each of its
// inputs read x ~size^2 times per input and ran 2.6x slower than PyTorch's on an H100.)
// Checked against numpy_backend.maxpool_backward in tests/test_cuda_ops.py and, compiled
// for the host, tests/test_cuda_compile.py, both with inputs full of ties.
#include "common.cuh"

// first_max[plane, ph, pw] = h * W + w of the window's first maximum (row-major order)
template <typename T>
__device__ void maxpool_first_max(int* first_max, const T* x, long long planes, int H, int W,
                                  int P, int Q, int size, int stride) {
    GRID_STRIDE_LOOP(i, planes * P * Q) {
        int pw = (int)(i % Q);
        int ph = (int)((i / Q) % P);
        long long plane = i / ((long long)P * Q);
        const T* xp = x + plane * H * W;
        int h0 = ph * stride, w0 = pw * stride;
        int best_at = h0 * W + w0;
        T best = xp[best_at];
        for (int a = 0; a < size; ++a)
            for (int b = 0; b < size; ++b) {
                int at = (h0 + a) * W + (w0 + b);
                T v = xp[at];
                if (v > best) { best = v; best_at = at; }
            }
        first_max[i] = best_at;
    }
}

template <typename T>
__device__ void maxpool_backward(T* dx, const int* first_max, const T* dy, long long planes, int H, int W,
                                 int P, int Q, int size, int stride) {
    GRID_STRIDE_LOOP(i, planes * H * W) {
        int w = (int)(i % W);
        int h = (int)((i / W) % H);
        long long plane = i / ((long long)H * W);
        const int* fp = first_max + plane * P * Q;
        const T* dyp = dy + plane * P * Q;
        // windows ph cover rows ph*stride .. ph*stride+size-1
        int ph_lo = h - size + 1 > 0 ? (h - size + 1 + stride - 1) / stride : 0;
        int ph_hi = min(h / stride, P - 1);
        int pw_lo = w - size + 1 > 0 ? (w - size + 1 + stride - 1) / stride : 0;
        int pw_hi = min(w / stride, Q - 1);
        int here = h * W + w;
        T acc = 0;
        for (int ph = ph_lo; ph <= ph_hi; ++ph)
            for (int pw = pw_lo; pw <= pw_hi; ++pw)
                if (fp[ph * Q + pw] == here) acc += dyp[ph * Q + pw];
        dx[i] = acc;
    }
}

extern "C" __global__ void maxpool_first_max_f32(int* first_max, const float* x, long long planes, int H, int W,
                                                 int P, int Q, int size, int stride) {
    maxpool_first_max(first_max, x, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_first_max_f64(int* first_max, const double* x, long long planes, int H, int W,
                                                 int P, int Q, int size, int stride) {
    maxpool_first_max(first_max, x, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_backward_f32(float* dx, const int* first_max, const float* dy, long long planes,
                                                int H, int W, int P, int Q, int size, int stride) {
    maxpool_backward(dx, first_max, dy, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_backward_f64(double* dx, const int* first_max, const double* dy, long long planes,
                                                int H, int W, int P, int Q, int size, int stride) {
    maxpool_backward(dx, first_max, dy, planes, H, W, P, Q, size, stride);
}
