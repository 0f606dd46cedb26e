// augment.cu: a uint8 NHWC batch -> a normalised float NCHW batch, on the GPU.
//   out[n, c, i, j] = (img[n, t+i, l+jj, c] - mean[t+i, l+jj, c]) * inv_std[c]
//   with t = tops[n], l = lefts[n], jj = flips[n] ? size-1-j : j
// mean is a full (S, S, 3) mean image (a per-channel mean is broadcast to one on the
// host), so theano_alexnet-style mean images and dataset.json's per-channel means both
// work. Checked against a NumPy slice-and-flip reference in tests/test_cuda_ops.py
// (GPU) and tests/test_cuda_compile.py (compiled for the host).
#include "common.cuh"

extern "C" __global__ void crop_flip_normalize_f32(float* out, const unsigned char* images, const int* tops,
                                                   const int* lefts, const unsigned char* flips, const float* mean,
                                                   const float* inv_std, long long N, int S, int size) {
    GRID_STRIDE_LOOP(idx, N * 3 * size * size) {
        int j = (int)(idx % size);
        int i = (int)((idx / size) % size);
        int c = (int)((idx / ((long long)size * size)) % 3);
        long long n = idx / (3LL * size * size);
        int row = tops[n] + i;
        int col = lefts[n] + (flips[n] ? size - 1 - j : j);
        long long pixel = ((long long)row * S + col) * 3 + c;
        float v = (float)images[n * S * S * 3 + pixel];
        out[idx] = (v - mean[pixel]) * inv_std[c];
    }
}
