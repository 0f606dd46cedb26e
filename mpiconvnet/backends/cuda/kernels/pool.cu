// pool.cu: the backward pass of max pooling (no padding, floor division of sizes).
//   dx[n,c,h,w] = sum over the windows (ph,pw) whose FIRST maximum in row-major window
//                 order is (h,w) of dy[n,c,ph,pw]
// The forward pass is cuDNN's; the backward is ours because the interface fixes the tie
// rule (first maximum), which cuDNN does not document, and because gathering (one thread
// per input element, a fixed summation order) is deterministic where scattering with
// atomics is not. Checked against numpy_backend.maxpool_backward in
// tests/test_cuda_ops.py and, compiled for the host, tests/test_cuda_compile.py, both
// with inputs full of ties.
#include "common.cuh"

template <typename T>
__device__ void maxpool_backward(T* dx, const T* x, const T* dy, long long planes, int H, int W,
                                 int P, int Q, int size, int stride) {
    GRID_STRIDE_LOOP(i, planes * H * W) {
        int w = (int)(i % W);
        int h = (int)((i / W) % H);
        long long plane = i / ((long long)H * W);
        const T* xp = x + plane * H * W;
        const T* dyp = dy + plane * P * Q;
        // windows ph cover rows ph*stride .. ph*stride+size-1
        int ph_lo = h - size + 1 > 0 ? (h - size + 1 + stride - 1) / stride : 0;
        int ph_hi = min(h / stride, P - 1);
        int pw_lo = w - size + 1 > 0 ? (w - size + 1 + stride - 1) / stride : 0;
        int pw_hi = min(w / stride, Q - 1);
        T acc = 0;
        for (int ph = ph_lo; ph <= ph_hi; ++ph) {
            for (int pw = pw_lo; pw <= pw_hi; ++pw) {
                int h0 = ph * stride, w0 = pw * stride;
                int best_h = h0, best_w = w0;
                T best = xp[h0 * W + w0];
                for (int a = 0; a < size; ++a)
                    for (int b = 0; b < size; ++b) {
                        T v = xp[(h0 + a) * W + (w0 + b)];
                        if (v > best) { best = v; best_h = h0 + a; best_w = w0 + b; }
                    }
                if (best_h == h && best_w == w) acc += dyp[ph * Q + pw];
            }
        }
        dx[i] = acc;
    }
}

extern "C" __global__ void maxpool_backward_f32(float* dx, const float* x, const float* dy, long long planes, int H, int W,
                                                int P, int Q, int size, int stride) {
    maxpool_backward(dx, x, dy, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_backward_f64(double* dx, const double* x, const double* dy, long long planes, int H, int W,
                                                int P, int Q, int size, int stride) {
    maxpool_backward(dx, x, dy, planes, H, W, P, Q, size, stride);
}
