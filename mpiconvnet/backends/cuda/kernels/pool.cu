// pool.cu: max pooling (no padding, floor division of sizes), forward and backward.
//   y[n,c,ph,pw]  = max over the size x size window at (ph*stride, pw*stride); NaN if the
//                   window holds one (np.maximum's rule, which the reference uses)
//   dx[n,c,h,w]   = sum over the windows (ph,pw) whose FIRST maximum in row-major window
//                   order is (h,w) of dy[n,c,ph,pw]; a window holding a NaN passes its
//                   gradient to no input (the reference matches x == y, and NaN == NaN is false)
// Ours rather than cuDNN's: the interface fixes the tie rule (first maximum), which cuDNN
// does not document; gathering (one thread per input element, a fixed summation order) is
// deterministic where scattering with atomics is not; and a cuDNN call cost the host ~73 us
// on an H100 node against ~12 us for a launch of ours. The forward pass records each
// window's first maximum (maxpool_forward), and the backward gathers through it; a
// backward without the forward's record finds the maxima again (maxpool_first_max). (One
// pass that rescanned every window from each of its inputs read x ~size^2 times per input
// and ran 2.6x slower than PyTorch's on an H100.)
// Checked against numpy_backend.maxpool_forward / _backward in tests/test_cuda_ops.py and,
// compiled for the host, tests/test_cuda_compile.py, both with inputs full of ties.
#include "common.cuh"

// the window of output i: the offset of its first maximum in the plane (h * W + w, strict
// > in row-major order, so NaNs never win), and whether it holds a NaN (then *nan is one)
template <typename T>
__device__ __forceinline__ int window_first_max(const T* xp, int W, int h0, int w0, int size, bool* has_nan,
                                                T* nan) {
    int best_at = h0 * W + w0;
    T best = xp[best_at];
    *has_nan = false;
    for (int a = 0; a < size; ++a)
        for (int b = 0; b < size; ++b) {
            int at = (h0 + a) * W + (w0 + b);
            T v = xp[at];
            if (v > best) { best = v; best_at = at; }
            if (v != v) { *has_nan = true; *nan = v; }
        }
    return best_at;
}

// y[plane, ph, pw] = the window's maximum (unless y is null: maxpool_first_max, for a
// backward pass whose y did not come from here); first_max[plane, ph, pw] = where it is
template <typename T>
__device__ void maxpool_forward(T* y, int* first_max, const T* x, long long planes, int H, int W,
                                int P, int Q, int size, int stride) {
    GRID_STRIDE_LOOP(i, planes * P * Q) {
        int pw = (int)(i % Q);
        int ph = (int)((i / Q) % P);
        const T* xp = x + (i / ((long long)P * Q)) * H * W;
        bool has_nan;
        T nan = 0;
        int at = window_first_max(xp, W, ph * stride, pw * stride, size, &has_nan, &nan);
        first_max[i] = has_nan ? -1 : at;   // -1: no input of the plane is this window's maximum
        if (y) y[i] = has_nan ? nan : xp[at];
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

extern "C" __global__ void maxpool_forward_f32(float* y, int* first_max, const float* x, long long planes, int H,
                                               int W, int P, int Q, int size, int stride) {
    maxpool_forward(y, first_max, x, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_forward_f64(double* y, int* first_max, const double* x, long long planes, int H,
                                               int W, int P, int Q, int size, int stride) {
    maxpool_forward(y, first_max, x, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_first_max_f32(int* first_max, const float* x, long long planes, int H, int W,
                                                 int P, int Q, int size, int stride) {
    maxpool_forward<float>(nullptr, first_max, x, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_first_max_f64(int* first_max, const double* x, long long planes, int H, int W,
                                                 int P, int Q, int size, int stride) {
    maxpool_forward<double>(nullptr, first_max, x, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_backward_f32(float* dx, const int* first_max, const float* dy, long long planes,
                                                int H, int W, int P, int Q, int size, int stride) {
    maxpool_backward(dx, first_max, dy, planes, H, W, P, Q, size, stride);
}
extern "C" __global__ void maxpool_backward_f64(double* dx, const int* first_max, const double* dy, long long planes,
                                                int H, int W, int P, int Q, int size, int stride) {
    maxpool_backward(dx, first_max, dy, planes, H, W, P, Q, size, stride);
}
