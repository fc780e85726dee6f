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

// The spike guard (reference: backends/reference.py spike_guard), on the device so the decision
// to skip a step costs no host round trip before the update. One thread: the window is a few
// hundred doubles. The statistics are summed oldest first with explicitly rounded double
// operations (no FMA contraction), exactly as the reference's Python floats, so both backends
// see the same mean and std to the bit and decide alike on every rank.
//   window   (2, W) doubles: accepted losses (row 0) and grad norms (row 1), a ring
//   count    pushes into the ring so far
//   verdict  0, or why the step is skipped (SKIP_* codes, defined in reference.SKIP_CODES)
//   scale    the clipping factor; set to 0 on a skip, which AdamW reads as "the gradient is zero"
#ifndef SKIP_LOSS_NOT_FINITE
#error "SKIP_* codes come from backends/cuda/norm.py (compiled in as -DSKIP_LOSS_NOT_FINITE=...)"
#endif

// x - mean > zscore * std over the last n of `count` values pushed into `row` (W long)
__device__ bool is_spike(const double* row, int W, long long count, int n, double x, double zscore) {
    if (!(zscore > 0.0)) return false;
    double total = 0.0;
    for (int i = 0; i < n; i++) total = __dadd_rn(total, row[(count - n + i) % W]);
    const double mean = __ddiv_rn(total, (double)n);
    double squares = 0.0;
    for (int i = 0; i < n; i++) {
        const double d = __dsub_rn(row[(count - n + i) % W], mean);
        squares = __dadd_rn(squares, __dmul_rn(d, d));
    }
    const double std = __dsqrt_rn(__ddiv_rn(squares, (double)n));
    return __dsub_rn(x, mean) > __dmul_rn(zscore, std);
}

extern "C" __global__ void spike_guard_kernel(int* verdict, float* scale, double* window, long long* count,
                                              const double* loss, const double* norm, int W,
                                              double loss_zscore, double norm_zscore, int min_samples) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const long long pushed = count[0];
    const int n = pushed < W ? (int)pushed : W;
    const double x_loss = loss[0], x_norm = norm[0];
    int code = 0;
    if (!isfinite(x_loss)) code = SKIP_LOSS_NOT_FINITE;
    else if (!isfinite(x_norm)) code = SKIP_NORM_NOT_FINITE;
    else if (n >= min_samples) {
        if (is_spike(window, W, pushed, n, x_loss, loss_zscore)) code = SKIP_LOSS_SPIKE;
        else if (is_spike(window + W, W, pushed, n, x_norm, norm_zscore)) code = SKIP_NORM_SPIKE;
    }
    verdict[0] = code;
    if (code != 0) {
        scale[0] = 0.0f;
        return;
    }
    window[pushed % W] = x_loss;
    window[W + pushed % W] = x_norm;
    count[0] = pushed + 1;
}
