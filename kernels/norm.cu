// Squared L2 norm of a bf16 gradient slice, for global-norm clipping:
//
//   global_norm_squared   out[0] = sum of grad[i]^2, i < n        (overwrites out)
//
// Deterministic without atomics, in two phases through planned fp32 scratch:
//   phase 1  a fixed grid of P blocks (2 per SM, chosen in plan(), never from n). Thread t of the
//            grid reads 16-byte vectors t, t + P * threads, ... (coalesced) with NORM_UNROLL loads
//            in flight; each vector's 8 squares are summed first, then added to one of
//            NORM_UNROLL running fp32 sums (round-robin, a fixed order). The n % 8 elements past the
//            last vector go to the grid's first threads. The block sums its threads with
//            block_sum and writes partials[blockIdx.x].
//   phase 2  one block sums partials[0..P) in a fixed order and writes out[0].
// The order of additions depends only on n and P, so reruns are bitwise equal. Accuracy: each
// running sum adds about n / (8 * NORM_UNROLL * P * threads) terms (~30 for 124M parameters on
// 132 SMs, ~360 at 1.5B), so fp32 rounding stays near 1e-6 relative even at GPT-2 XL's size.
#include "common.cuh"

// launch constants, defined once in backends/cuda/norm.py
#ifndef NORM_THREADS
#error "NORM_THREADS comes from backends/cuda/norm.py (compiled in as -DNORM_THREADS=...)"
#endif
#ifndef NORM_RED_THREADS
#error "NORM_RED_THREADS comes from backends/cuda/norm.py (compiled in as -DNORM_RED_THREADS=...)"
#endif
#define NORM_UNROLL 4       // 16-byte loads in flight per thread (the final sum below assumes 4)
static_assert(NORM_UNROLL == 4, "the block sum below adds acc[0..3]");

__device__ __forceinline__ float sum_squares8(const x128& a) {
    float s[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float x0 = __bfloat162float(a[2 * j]), x1 = __bfloat162float(a[2 * j + 1]);
        s[j] = x0 * x0 + x1 * x1;
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
global_norm_squared_kernel(float* partials, const floatX* grad, long long n) {
    __shared__ float red[32];
    const long long n8 = n / 8;
    const long long first = (long long)blockIdx.x * NORM_THREADS + threadIdx.x;
    const long long stride = (long long)gridDim.x * NORM_THREADS;
    float acc[NORM_UNROLL];
#pragma unroll
    for (int u = 0; u < NORM_UNROLL; u++) acc[u] = 0.0f;
    long long k = first;
    for (; k + (NORM_UNROLL - 1) * stride < n8; k += NORM_UNROLL * stride) {
        x128 buf[NORM_UNROLL];
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++) buf[u] = load128cs(grad + (k + u * stride) * 8);
#pragma unroll
        for (int u = 0; u < NORM_UNROLL; u++) acc[u] += sum_squares8(buf[u]);
    }
    // fewer than NORM_UNROLL vectors left for this thread (unrolled: acc stays in registers)
#pragma unroll
    for (int u = 0; u < NORM_UNROLL - 1; u++)
        if (k + u * stride < n8) acc[u] += sum_squares8(load128cs(grad + (k + u * stride) * 8));
    const long long tail = n8 * 8 + first;
    if (tail < n) {
        const float x = __bfloat162float(grad[tail]);
        acc[0] += x * x;
    }
    const float total = block_sum((acc[0] + acc[1]) + (acc[2] + acc[3]), red);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

extern "C" __global__ void __launch_bounds__(NORM_RED_THREADS)
global_norm_squared_reduce_kernel(float* out, const float* partials, int P) {
    __shared__ float red[32];
    float acc = 0.0f;
    for (int p = threadIdx.x; p < P; p += NORM_RED_THREADS) acc += partials[p];
    const float total = block_sum(acc, red);
    if (threadIdx.x == 0) out[0] = total;
}

// The clipping scale from the per-rank squared norms, on the device so the update needs no host
// round trip: norm[0] = sqrt(sum of parts[0..n) in order), summed and rooted in double exactly as
// the host did before (so training is bitwise unchanged), and
// scale[0] = clip / (norm + 1e-6) when 0 < clip < norm, else 1, rounded once to fp32.
extern "C" __global__ void clip_scale_kernel(float* scale, double* norm, const float* parts, int n_parts,
                                             double clip) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double total = 0.0;
    for (int r = 0; r < n_parts; r++) total += (double)parts[r];
    const double value = sqrt(total);
    norm[0] = value;
    scale[0] = (clip > 0.0 && value > clip) ? (float)(clip / (value + 1e-6)) : 1.0f;
}
