// augment.cu: the loader's uint8 NHWC batch -> the model's normalised float NCHW crops.
//   out[m, c, i, j] = (img[sources[m], t+i, l+jj, c] - mean[t+i, l+jj, c] + shift[m, c]) * inv_std[c]
//   with t = tops[m], l = lefts[m], jj = flips[m] ? size-1-j : j
// (data/augment.py's crop_batch is the definition). mean is a full (S, S, 3) mean image (a
// per-channel mean is broadcast to one on the host), so theano_alexnet-style mean images
// and dataset.json's per-channel means both work; shift is the PCA lighting, zeros when
// off. One output crop per m: ten-crop evaluation reads each image ten times, from a
// batch copied once. Checked against crop_batch in tests/test_cuda_ops.py (GPU) and
// tests/test_cuda_compile.py (compiled for the host).
#include "common.cuh"

extern "C" __global__ void crop_flip_normalize_f32(float* out, const unsigned char* images, const int* sources,
                                                   const int* tops, const int* lefts, const unsigned char* flips,
                                                   const float* mean, const float* shift, const float* inv_std,
                                                   long long M, int S, int size) {
    GRID_STRIDE_LOOP(idx, M * 3 * size * size) {
        int j = (int)(idx % size);
        int i = (int)((idx / size) % size);
        int c = (int)((idx / ((long long)size * size)) % 3);
        long long m = idx / (3LL * size * size);
        long long n = sources[m];
        int row = tops[m] + i;
        int col = lefts[m] + (flips[m] ? size - 1 - j : j);
        long long pixel = ((long long)row * S + col) * 3 + c;
        float v = (float)images[n * S * S * 3 + pixel];
        out[idx] = (v - mean[pixel] + shift[m * 3 + c]) * inv_std[c];
    }
}
