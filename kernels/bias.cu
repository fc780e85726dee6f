// Bias gradient of a linear layer: dbias (OC) += column sums of dout (N, OC)   (ACCUMULATES)
// dout's rows may be `ld` elements apart (a column slice of a wider gradient: the queries' part
// of dqkv), and phase 2 can hand the fp32 sums over as well (`sums`).
//
// Deterministic without atomics, in two phases through a planned fp32 scratch:
//   phase 1  block (x, y) owns 256 columns (x) and one contiguous range of rows (y). Lane l of
//            each warp holds 8 columns (one 16-byte load per row); warp w sums rows w, w+8, ...
//            of the range in order; then warp 0 adds the 8 warps' sums in order 0..7 and writes
//            them to partials[y, columns] (fp32).
//   phase 2  each column sums partials[0..RB) in a fixed order (see the kernel) and adds the
//            total into the bf16 dbias once.
// Python chooses RB (row ranges) so that phase 1 has a few blocks per SM whatever OC is; the
// order of additions depends only on (N, OC) and the SM count, so reruns are bitwise equal.
#include "common.cuh"

// launch constants, defined once in backends/cuda/bias.py
#ifndef BIAS_WARPS
#error "BIAS_WARPS comes from backends/cuda/bias.py (compiled in as -DBIAS_WARPS=...)"
#endif
#ifndef PROJ_ROWS
#error "PROJ_ROWS comes from backends/cuda/bias.py (compiled in as -DPROJ_ROWS=...)"
#endif
#ifndef RED_Y
#error "RED_Y comes from backends/cuda/bias.py (compiled in as -DRED_Y=...)"
#endif
#ifndef PROJ_WARPS
#error "PROJ_WARPS comes from backends/cuda/bias.py (compiled in as -DPROJ_WARPS=...)"
#endif

__device__ __forceinline__ void add_row(float (&acc)[8], const x128& d) {
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] += __bfloat162float(d[j]);
}

// columns 4h..4h+3 of a lane's 8
__device__ __forceinline__ f128 half_of(const float (&acc)[8], int h) {
    f128 t;
#pragma unroll
    for (int j = 0; j < 4; j++) t[j] = acc[4 * h + j];
    return t;
}

// A block's per-lane sums of 8 columns (acc, one set per warp) added up in warp order
// 0..WARPS-1 through shared memory (part: [warp][half of the 8 columns][lane]). Returns true in
// warp 0, whose lanes then hold the block's totals in acc; the other warps are done.
template <int WARPS>
__device__ __forceinline__ bool sum_over_warps(float (&acc)[8], f128 (&part)[WARPS][2][32], int lane, int warp) {
    part[warp][0][lane] = half_of(acc, 0);
    part[warp][1][lane] = half_of(acc, 1);
    __syncthreads();
    if (warp != 0) return false;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        f128 t = part[0][h][lane];
        for (int v = 1; v < WARPS; v++) {
#pragma unroll
            for (int j = 0; j < 4; j++) t[j] += part[v][h][lane][j];
        }
#pragma unroll
        for (int j = 0; j < 4; j++) acc[4 * h + j] = t[j];
    }
    return true;
}

extern "C" __global__ void __launch_bounds__(BIAS_WARPS * 32)
bias_backward_kernel(float* partials, const floatX* dout, int N, int OC, long long ld, int rows_per_block) {
    __shared__ f128 sums[BIAS_WARPS][2][32];  // [warp][half of the 8 columns][lane]
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int c = (blockIdx.x * 32 + lane) * 8;
    const bool active = c < OC;  // the last 256-column tile may be partial
    const int row_begin = blockIdx.y * rows_per_block;
    const int row_end = min(N, row_begin + rows_per_block);
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    if (active) {
        const floatX* col = dout + c;
        int r = row_begin + warp;
        // four rows' loads in flight before their adds, which stay in row order
        for (; r + 3 * BIAS_WARPS < row_end; r += 4 * BIAS_WARPS) {
            const x128 d0 = load128(col + r * ld);
            const x128 d1 = load128(col + (r + BIAS_WARPS) * ld);
            const x128 d2 = load128(col + (r + 2 * BIAS_WARPS) * ld);
            const x128 d3 = load128(col + (r + 3 * BIAS_WARPS) * ld);
            add_row(acc, d0); add_row(acc, d1); add_row(acc, d2); add_row(acc, d3);
        }
        for (; r < row_end; r += BIAS_WARPS) add_row(acc, load128(col + r * ld));
    }
    if (!sum_over_warps<BIAS_WARPS>(acc, sums, lane, warp) || !active) return;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        store128(partials + (long long)blockIdx.y * OC + c + 4 * h, half_of(acc, h));
    }
}

// Phase 2: 4 columns per thread; warp row y sums partial rows y, y+RED_Y, ... in order, then
// thread row 0 adds the RED_Y sums in order 0..RED_Y-1 and adds the total into dbias (and
// writes it to sums, when given).
extern "C" __global__ void __launch_bounds__(32 * RED_Y)
bias_backward_reduce_kernel(floatX* dbias, float* sums, const float* partials, int RB, int OC) {
    __shared__ f128 tile[RED_Y][32];
    const int col4 = blockIdx.x * 32 + threadIdx.x, OC4 = OC / 4;
    f128 acc = f128::zeros();
    if (col4 < OC4) {
        for (int p = threadIdx.y; p < RB; p += RED_Y) {
            const f128 v = load128(partials + (long long)p * OC + col4 * 4);
#pragma unroll
            for (int j = 0; j < 4; j++) acc[j] += v[j];
        }
    }
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y != 0 || col4 >= OC4) return;
    for (int y = 1; y < RED_Y; y++) {
#pragma unroll
        for (int j = 0; j < 4; j++) acc[j] += tile[y][threadIdx.x][j];
    }
    floatX* dst = dbias + col4 * 4;
#pragma unroll
    for (int j = 0; j < 4; j++) dst[j] = __float2bfloat16_rn(__bfloat162float(dst[j]) + acc[j]);
    if (sums != nullptr) store128(sums + col4 * 4, acc);
}

// The values' bias gradient through the attention projection (see qkv_bias_backward in
// backends/reference.py): dbias (C_in) += sums (C_out) @ weight (C_out, C_in), weight bf16
// row-major as the projection keeps it. Lane l of warp w holds 8 columns of a 256-column tile
// (blockIdx.x) and sums rows w, w + PROJ_WARPS, ... in order; warp 0 then adds the warps' sums
// in order 0..PROJ_WARPS-1, so the result does not depend on timing.
extern "C" __global__ void __launch_bounds__(PROJ_WARPS * 32)
projected_bias_kernel(floatX* dbias, const float* sums, const floatX* weight, int C_out, int C_in) {
    __shared__ f128 part[PROJ_WARPS][2][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int c = (blockIdx.x * 32 + lane) * 8;
    const bool active = c < C_in;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    if (active) {
        // PROJ_ROWS rows' loads issued before their products, so that many are in flight per
        // lane (one at a time, the grid's few blocks waited on memory: 25 us at C = 1600); the
        // products still add in row order, so the sums are the same bits
        int r = warp;
        for (; r + (PROJ_ROWS - 1) * PROJ_WARPS < C_out; r += PROJ_ROWS * PROJ_WARPS) {
            x128 w[PROJ_ROWS];
            float s[PROJ_ROWS];
#pragma unroll
            for (int k = 0; k < PROJ_ROWS; k++) {
                w[k] = load128(weight + (long long)(r + k * PROJ_WARPS) * C_in + c);
                s[k] = sums[r + k * PROJ_WARPS];
            }
#pragma unroll
            for (int k = 0; k < PROJ_ROWS; k++) {
#pragma unroll
                for (int j = 0; j < 8; j++) acc[j] = fmaf(s[k], __bfloat162float(w[k][j]), acc[j]);
            }
        }
        for (; r < C_out; r += PROJ_WARPS) {
            const x128 w = load128(weight + (long long)r * C_in + c);
            const float s = sums[r];
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] = fmaf(s, __bfloat162float(w[j]), acc[j]);
        }
    }
    if (!sum_over_warps<PROJ_WARPS>(acc, part, lane, warp) || !active) return;
    floatX* dst = dbias + c;
#pragma unroll
    for (int j = 0; j < 8; j++) dst[j] = __float2bfloat16_rn(__bfloat162float(dst[j]) + acc[j]);
}

// The bias gradient taken by the weight-gradient product itself (matmul.py's
// weight_grad_bias_column): that product ran over the layer's input with a column of ones at
// column C, so row o of `product` (OC rows, `ld` apart) holds dW[o, 0..C) and, at column C, the
// column sum of dout over the tokens, dbias[o]'s gradient. This pass moves dW into the gradient
// buffer (written, or added when accumulate: an fp32 add and one rounding, what the product's
// beta = 1 would have done with an fp32 product) and adds the sums into dbias, except in rows
// [skip_begin, skip_end), whose sums are exactly zero in exact arithmetic (qkv's keys: see
// qkv_bias_backward in backends/reference.py) and stay so. A thread per 8 columns of a row; the
// last thread of each row takes the bias column.
__device__ __forceinline__ void load8(float (&f)[8], const float* p) {
    const f128 lo = load128(p), hi = load128(p + 4);
#pragma unroll
    for (int j = 0; j < 4; j++) { f[j] = lo[j]; f[4 + j] = hi[j]; }
}
__device__ __forceinline__ void load8(float (&f)[8], const floatX* p) {
    const x128 v = load128(p);
#pragma unroll
    for (int j = 0; j < 8; j++) f[j] = __bfloat162float(v[j]);
}
__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(floatX x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ void split_bias_column(floatX* dweight, floatX* dbias, const T* product, int OC, int C,
                                                  long long ld, int accumulate, int skip_begin, int skip_end) {
    const int vecs = C / 8 + 1;  // C / 8 vectors of dW, then the bias column
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)OC * vecs) return;
    const int o = (int)(i / vecs), v = (int)(i % vecs);
    const T* row = product + o * ld;
    if (v == vecs - 1) {
        if (o < skip_begin || o >= skip_end)
            dbias[o] = __float2bfloat16_rn(__bfloat162float(dbias[o]) + as_float(row[C]));
        return;
    }
    float f[8];
    load8(f, row + 8 * v);
    floatX* dst = dweight + (long long)o * C + 8 * v;
    if (accumulate) {
        const x128 old = load128(dst);
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] += __bfloat162float(old[j]);
    }
    store128(dst, to_bf16x8(f));
}

extern "C" __global__ void split_bias_column_f32_kernel(floatX* dweight, floatX* dbias, const float* product,
                                                        int OC, int C, long long ld, int accumulate,
                                                        int skip_begin, int skip_end) {
    split_bias_column(dweight, dbias, product, OC, C, ld, accumulate, skip_begin, skip_end);
}

extern "C" __global__ void split_bias_column_bf16_kernel(floatX* dweight, floatX* dbias, const floatX* product,
                                                         int OC, int C, long long ld, int accumulate,
                                                        int skip_begin, int skip_end) {
    split_bias_column(dweight, dbias, product, OC, C, ld, accumulate, skip_begin, skip_end);
}
