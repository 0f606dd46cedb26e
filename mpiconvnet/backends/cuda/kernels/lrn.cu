// lrn.cu: cross-channel local response normalisation, any window size.
//   s[c] = k + alpha/size * sum_{c' = c - size/2 .. c + (size-1)/2, clipped} x[c']^2
//   y[c] = x[c] * s[c]^-beta
//   dx[c] = dy[c] * s[c]^-beta
//           - 2*alpha*beta/size * x[c] * sum_{j : c in window(j)} dy[j] * y[j] / s[j]
// The backend sends odd sizes (AlexNet's 5) to cuDNN, whose window is centred; for even
// sizes cuDNN looks behind (n-1)/2 and ahead n/2 channels (cudnn_ops.h), the opposite of
// the interface's (PyTorch's) split, so these kernels take over. Checked against numpy_backend.lrn_forward /
// lrn_backward on the host for sizes 1, 2, 4, 5 (tests/test_cuda_compile.py) and on the GPU
// for sizes 3, 4, 5 (tests/test_cuda_ops.py).
#include "common.cuh"

template <typename T>
__device__ T lrn_scale(const T* xp, long long hw_stride, int c, int C, int size, T alpha, T k) {
    int lo = max(c - size / 2, 0), hi = min(c + (size - 1) / 2, C - 1);
    T sum = 0;
    for (int j = lo; j <= hi; ++j) {
        T v = xp[j * hw_stride];
        sum += v * v;
    }
    return k + alpha / size * sum;
}

// x, y: (N, C, H, W); one thread per element; xp points at channel 0 of the pixel
template <typename T>
__device__ void lrn_forward(T* y, const T* x, long long N, int C, long long HW, int size, T alpha, T beta, T k) {
    GRID_STRIDE_LOOP(i, N * C * HW) {
        long long pix = i % HW;
        int c = (int)((i / HW) % C);
        long long n = i / (HW * C);
        const T* xp = x + n * C * HW + pix;
        y[i] = x[i] * pow_t(lrn_scale(xp, HW, c, C, size, alpha, k), -beta);
    }
}

template <typename T>
__device__ void lrn_backward(T* dx, const T* x, const T* y, const T* dy, long long N, int C, long long HW, int size,
                             T alpha, T beta, T k) {
    GRID_STRIDE_LOOP(i, N * C * HW) {
        long long pix = i % HW;
        int c = (int)((i / HW) % C);
        long long n = i / (HW * C);
        long long base = n * C * HW + pix;
        const T* xp = x + base;
        T acc = 0;
        // the windows that contain c: j - size/2 <= c <= j + (size-1)/2
        int lo = max(c - (size - 1) / 2, 0), hi = min(c + size / 2, C - 1);
        for (int j = lo; j <= hi; ++j) {
            long long at = base + j * HW;
            acc += dy[at] * y[at] / lrn_scale(xp, HW, j, C, size, alpha, k);
        }
        T s = lrn_scale(xp, HW, c, C, size, alpha, k);
        dx[i] = dy[i] * pow_t(s, -beta) - T(2) * alpha * beta / size * x[i] * acc;
    }
}

extern "C" __global__ void lrn_forward_f32(float* y, const float* x, long long N, int C, long long HW, int size, float alpha, float beta, float k) {
    lrn_forward(y, x, N, C, HW, size, alpha, beta, k);
}
extern "C" __global__ void lrn_forward_f64(double* y, const double* x, long long N, int C, long long HW, int size, double alpha, double beta, double k) {
    lrn_forward(y, x, N, C, HW, size, alpha, beta, k);
}
extern "C" __global__ void lrn_backward_f32(float* dx, const float* x, const float* y, const float* dy, long long N, int C, long long HW,
                                            int size, float alpha, float beta, float k) {
    lrn_backward(dx, x, y, dy, N, C, HW, size, alpha, beta, k);
}
extern "C" __global__ void lrn_backward_f64(double* dx, const double* x, const double* y, const double* dy, long long N, int C, long long HW,
                                            int size, double alpha, double beta, double k) {
    lrn_backward(dx, x, y, dy, N, C, HW, size, alpha, beta, k);
}
