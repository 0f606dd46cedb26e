// loss.cu: softmax cross-entropy and top-k ranks, one warp per row of the logits.
//   softmax_xent: loss_rows[n] = logsumexp(z[n]) - z[n, label[n]]   (max-shifted)
//                 dz[n, c] = (softmax(z[n])[c] - [c == label[n]]) * inv_batch
//                 the host sums loss_rows in float64 and divides by N.
//   label_rank:   rank[n] = #{c : z[n,c] > z[n,label]}; correct@k iff rank < k (a tie with
//                 the true class counts in its favour, as in the reference).
// Checked against numpy_backend.softmax_cross_entropy / topk_correct in
// tests/test_cuda_ops.py; launch with blockDim.x a multiple of 32.
// Also checked compiled for the host with WARP_SIZE 1 (tests/test_cuda_compile.py).
#include "common.cuh"

template <typename T>
__device__ void softmax_xent(T* loss_rows, T* dz, const T* z, const long long* labels, int rows, int cols, T inv_batch) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (warp >= rows) return;  // whole warps exit together
    const T* zr = z + (long long)warp * cols;
    T* dr = dz + (long long)warp * cols;
    T m = neg_infinity<T>();
    for (int c = lane; c < cols; c += WARP_SIZE) m = fmax(m, zr[c]);
    m = warp_max(m);
    T s = 0;
    for (int c = lane; c < cols; c += WARP_SIZE) s += exp_t(zr[c] - m);
    s = warp_sum(s);
    long long label = labels[warp];
    for (int c = lane; c < cols; c += WARP_SIZE) {
        T p = exp_t(zr[c] - m) / s;
        dr[c] = (p - (c == label ? T(1) : T(0))) * inv_batch;
    }
    if (lane == 0) loss_rows[warp] = log_t(s) + m - zr[label];
}

template <typename T>
__device__ void label_rank(int* rank, const T* z, const long long* labels, int rows, int cols) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (warp >= rows) return;
    const T* zr = z + (long long)warp * cols;
    long long label = labels[warp];
    T target = zr[label];
    int count = 0;
    for (int c = lane; c < cols; c += WARP_SIZE) count += zr[c] > target;
    count = warp_sum(count);
    if (lane == 0) rank[warp] = count;
}

extern "C" __global__ void softmax_xent_f32(float* loss_rows, float* dz, const float* z, const long long* labels, int rows, int cols, float inv_batch) {
    softmax_xent(loss_rows, dz, z, labels, rows, cols, inv_batch);
}
extern "C" __global__ void softmax_xent_f64(double* loss_rows, double* dz, const double* z, const long long* labels, int rows, int cols, double inv_batch) {
    softmax_xent(loss_rows, dz, z, labels, rows, cols, inv_batch);
}
extern "C" __global__ void label_rank_f32(int* rank, const float* z, const long long* labels, int rows, int cols) { label_rank(rank, z, labels, rows, cols); }
extern "C" __global__ void label_rank_f64(int* rank, const double* z, const long long* labels, int rows, int cols) { label_rank(rank, z, labels, rows, cols); }
