// LayerNorm forward and backward. (The residual adds before them happen in the projections'
// matmul epilogues: the forward reads the residual sum the matmul wrote.)
//
//   layernorm_forward           out = (x - mean) * rstd * w + b; mean, rstd (B*T) fp32  (overwrites)
//   layernorm_backward          dinp += dx (residual stream), dweight += , dbias +=   (ACCUMULATE)
//                               and, in the _sum variant, dproj_bias += column sums of the updated
//                               dinp: the bias gradient of the projection that added into this
//                               residual, taken while the row is in registers (no second read)
//   *_amax_kernel_CH twins: with fp8=true, max |output| merged
//   into the fp8 cast's amax of the matmul that reads the output next (common.cuh: merge_amax),
//   so that cast needs no pass of its own over the tensor to find it
//   layernorm_forward_fp8_kernel_CH: the output cast to e4m3 as it is written, fp8(out * scale)
//   saturated with a scale known before the values (delayed scaling), and amax as the _amax twin:
//   the bf16 output is never written, and no cast reads it back
//
// One warp per row of C channels; lane l holds the 16-byte chunks (k*32 + l)*8, k < CH, in
// registers. CH = ceil(C / 256) is a template parameter, so the arrays stay in registers (indexed
// only by unrolled constants) and narrow models use few registers: each kernel exists as
// <name>_<CH> for CH = 1..7 (C <= 1792 covers GPT-2 XL's 1600); Python picks one by C. The variance is the mean of
// (x - mean)^2 over the registers (two passes, no E[x^2] - E[x]^2 cancellation).
//
// The forward kernels and their _amax twins must give bitwise the same out/mean/rstd (backward
// with recompute=2 rebuilds layernorms with the plain kernel): all normalise through the one
// function normalize_row with explicitly rounded intrinsics (__fadd_rn, __fmaf_rn, ...) that the
// compiler never contracts or reorders, so inlining cannot change a bit.
//
// layernorm_backward is deterministic without atomics: phase 1 runs a fixed grid (from the SM
// count); each warp takes rows warp_id, warp_id + warps_in_grid, ... and keeps its own fp32
// dweight/dbias (and dproj_bias) sums in shared memory; the block adds its warps in order 0..7 and
// writes NSUM*C partials (NSUM = 2, or 3 with dproj_bias). Phase 2 sums the blocks' partials in a
// fixed order and adds into dweight/dbias/dproj_bias. The _sum_narrow kernels are the _sum ones
// with LN_BWD_NARROW_WARPS warps a block: where 8 warps' three sums leave room for one block per
// SM (C > 1200 on an H100), half as many warps fit two; with 128 threads a block they have the
// registers to prefetch dinp at CH = 7 too.
#include "common.cuh"
#include <cuda_fp8.h>

// launch constants, defined once in backends/cuda/layernorm.py
#ifndef LN_EPS
#error "LN_EPS comes from backends/cuda/layernorm.py (compiled in as -DLN_EPS=...)"
#endif
#ifndef LN_FWD_WARPS
#error "LN_FWD_WARPS comes from backends/cuda/layernorm.py (compiled in as -DLN_FWD_WARPS=...)"
#endif
#ifndef LN_FWD_MIN_BLOCKS
#error "LN_FWD_MIN_BLOCKS comes from backends/cuda/layernorm.py (compiled in as -DLN_FWD_MIN_BLOCKS=...)"
#endif
#ifndef LN_BWD_WARPS
#error "LN_BWD_WARPS comes from backends/cuda/layernorm.py (compiled in as -DLN_BWD_WARPS=...)"
#endif
#ifndef LN_BWD_NARROW_WARPS
#error "LN_BWD_NARROW_WARPS comes from backends/cuda/layernorm.py (compiled in as -DLN_BWD_NARROW_WARPS=...)"
#endif
#ifndef LN_COLS_ROWS
#error "LN_COLS_ROWS comes from backends/cuda/layernorm.py (compiled in as -DLN_COLS_ROWS=...)"
#endif
#ifndef LN_COLS_STAGES
#error "LN_COLS_STAGES comes from backends/cuda/layernorm.py (compiled in as -DLN_COLS_STAGES=...)"
#endif
#ifndef LN_COLS_MIN_BLOCKS
#error "LN_COLS_MIN_BLOCKS comes from backends/cuda/layernorm.py (compiled in as -DLN_COLS_MIN_BLOCKS=...)"
#endif
#ifndef RED_Y
#error "RED_Y comes from backends/cuda/layernorm.py (compiled in as -DRED_Y=...)"
#endif
#define LN_MAX_CHUNKS 7       // 16-byte chunks per lane: C <= 7 * 32 * 8

__device__ __forceinline__ bool chunk_on(int k, int lane, int C) { return (k * 32 + lane) * 8 < C; }

// An empty asm that claims to change v: the compiler must then redo the bf16 -> fp32 conversions of
// v after it rather than keep 8 converted floats per chunk alive from an earlier pass (which cost
// twice the registers and made the CH = 6, 7 backward spill). Emits no instruction.
__device__ __forceinline__ void opaque(x128& v) {
    unsigned int* u = reinterpret_cast<unsigned int*>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) asm volatile("" : "+r"(u[i]));
}

// Mean, rstd and the normalised output of one row whose bf16 values x are in registers.
// CH (chunks per lane, ceil(C / 256)) only bounds the unrolled loops: chunks past C are skipped,
// so every CH gives the same bits for the same row. amax (fp8=true, may be null): merged with the
// row's max |output| as stored in bf16, what the next matmul's fp8 cast would otherwise re-read.
// OUT8: the output goes to out8_row in e4m3 instead, each bf16-rounded value times scale and
// saturated: bitwise what fp8_quantize (fp8.cu) makes of the bf16 output with that scale.
template <int CH, bool AMAX, bool OUT8 = false>
__device__ __forceinline__ void normalize_row(x128 (&x)[CH], floatX* out_row,
                                              float* mean_out, float* rstd_out,
                                              const floatX* weight, const floatX* bias, float* amax,
                                              int C, int lane, __nv_fp8_storage_t* out8_row = nullptr,
                                              float scale = 1.0f) {
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < CH; k++) {
        if (!chunk_on(k, lane, C)) continue;
#pragma unroll
        for (int j = 0; j < 8; j++) sum = __fadd_rn(sum, __bfloat162float(x[k][j]));
    }
    const float mean = __fdiv_rn(warp_sum(sum), (float)C);
#pragma unroll
    for (int k = 0; k < CH; k++) opaque(x[k]);
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < CH; k++) {
        if (!chunk_on(k, lane, C)) continue;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float d = __fsub_rn(__bfloat162float(x[k][j]), mean);
            sq = __fmaf_rn(d, d, sq);
        }
    }
    const float rstd = rsqrtf(__fadd_rn(__fdiv_rn(warp_sum(sq), (float)C), LN_EPS));
#pragma unroll
    for (int k = 0; k < CH; k++) opaque(x[k]);
    unsigned int local = 0u;
#pragma unroll
    for (int k = 0; k < CH; k++) {
        if (!chunk_on(k, lane, C)) continue;
        const int c = (k * 32 + lane) * 8;
        const x128 w = load128(weight + c), b = load128(bias + c);
        float y[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float n = __fmul_rn(__fsub_rn(__bfloat162float(x[k][j]), mean), rstd);
            y[j] = __fmaf_rn(n, __bfloat162float(w[j]), __bfloat162float(b[j]));
        }
        const x128 o = to_bf16x8(y);  // the output as stored; amax and the fp8 twin read it back
        if (AMAX || OUT8) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                y[j] = __bfloat162float(o[j]);
                if (AMAX) local = max(local, abs_bits(y[j]));
                y[j] = __fmul_rn(y[j], scale);
            }
        }
        if (OUT8) *reinterpret_cast<uint2*>(out8_row + c) = to_fp8x8<__NV_E4M3>(y);
        else store128(out_row + c, o);
    }
    if (AMAX) merge_amax(amax, local);
    if (lane == 0) {
        *mean_out = mean;
        *rstd_out = rstd;
    }
}

// out8 (OUT8, the fp8 twin): out8 (N, C) e4m3 = fp8(layernorm(inp) * *scale) in place of out.
// out's rows are out_ld elements apart (C, or more where the activation plan keeps a column of
// ones beside the output: layout.py's ONES_PAD); inp's and out8's are C apart.
template <int CH, bool AMAX, bool OUT8 = false>
__device__ __forceinline__ void layernorm_forward_impl(floatX* out, float* mean, float* rstd,
                                                       const floatX* inp, const floatX* weight,
                                                       const floatX* bias, float* amax, int N, int C,
                                                       long long out_ld, __nv_fp8_storage_t* out8 = nullptr,
                                                       const float* scale = nullptr) {
    const int lane = threadIdx.x % 32, row = blockIdx.x * LN_FWD_WARPS + threadIdx.x / 32;
    if (row >= N) return;
    const long long base = (long long)row * C;
    x128 x[CH];
#pragma unroll
    for (int k = 0; k < CH; k++)
        if (chunk_on(k, lane, C)) x[k] = load128(inp + base + (k * 32 + lane) * 8);
    normalize_row<CH, AMAX, OUT8>(x, OUT8 ? nullptr : out + row * out_ld, mean + row, rstd + row, weight, bias,
                                  amax, C, lane, OUT8 ? out8 + base : nullptr, OUT8 ? *scale : 1.0f);
}

// Phase 1. Shared memory: per warp, C floats of dweight sums then C floats of dbias sums, stored
// as float4 slots s = h*C8 + c8 (channels c8*8 + h*4 .. +3), so the 32 lanes of a warp touch 32
// consecutive float4 (no bank conflicts). Each lane only ever touches its own slots, so the row
// loop needs no barrier. partials: (gridDim.x, 2C) fp32, dweight then dbias. The weight is
// re-read per row from L1 rather than held in registers (holding it spilled at CH = 7).
// PREFETCH loads the row's dinp together with inp and dout, so a row costs one memory round trip
// instead of two: 73 vs 79 us at B*T = 32768, C = 768 on an H100. At CH = 7 it would spill (128
// registers, the cap for 2 blocks of 256 threads per SM) and gained nothing (91 vs 93 us), so the
// CH = 7 kernel loads dinp in pass 2.
// amax (fp8=true, may be null): merged with max |dinp| after the update, as stored in bf16: the
// gradient the projection below casts next.
template <int CH, bool PREFETCH, int NSUM, bool AMAX, int WARPS>
__device__ __forceinline__ void layernorm_backward_impl(floatX* dinp, float* partials, const floatX* dout,
                                                        const floatX* inp, const floatX* weight,
                                                        const float* mean, const float* rstd, float* amax,
                                                        int N, int C) {
    extern __shared__ float smem[];  // WARPS * NSUM * C floats
    f128* slots = reinterpret_cast<f128*>(smem);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, C4 = C / 4, C8 = C / 8;
    for (int i = threadIdx.x; i < WARPS * NSUM * C4; i += blockDim.x) slots[i] = f128::zeros();
    __syncthreads();
    f128* dw_acc = slots + warp * NSUM * C4;
    f128* db_acc = dw_acc + C4;
    f128* ds_acc = db_acc + C4;  // NSUM == 3: the column sums of the updated dinp
    const float inv_C = 1.0f / (float)C;
    unsigned int local = 0u;  // max |dinp| bits over this lane's elements
    for (int row = blockIdx.x * WARPS + warp; row < N; row += gridDim.x * WARPS) {
        const long long base = (long long)row * C;
        x128 x[CH], g[CH], di[CH];
#pragma unroll
        for (int k = 0; k < CH; k++) {
            if (!chunk_on(k, lane, C)) continue;
            x[k] = load128(inp + base + (k * 32 + lane) * 8);
            g[k] = load128(dout + base + (k * 32 + lane) * 8);
            if (PREFETCH) di[k] = load128(dinp + base + (k * 32 + lane) * 8);
        }
        const float m = mean[row], r = rstd[row];
        // pass 1: the two row sums dx needs, and this row's share of dweight and dbias
        float sum_dn = 0.0f, sum_dn_n = 0.0f;
#pragma unroll
        for (int k = 0; k < CH; k++) {
            if (!chunk_on(k, lane, C)) continue;
            const int c8 = k * 32 + lane;
            const x128 w = load128(weight + c8 * 8);
            f128 dw0 = dw_acc[c8], dw1 = dw_acc[C8 + c8], db0 = db_acc[c8], db1 = db_acc[C8 + c8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float n = (__bfloat162float(x[k][j]) - m) * r;
                const float d = __bfloat162float(g[k][j]);
                const float dn = d * __bfloat162float(w[j]);
                sum_dn += dn;
                sum_dn_n += dn * n;
                if (j < 4) { dw0[j] += d * n; db0[j] += d; }
                else { dw1[j - 4] += d * n; db1[j - 4] += d; }
            }
            dw_acc[c8] = dw0; dw_acc[C8 + c8] = dw1; db_acc[c8] = db0; db_acc[C8 + c8] = db1;
        }
        const float mean_dn = warp_sum(sum_dn) * inv_C, mean_dn_n = warp_sum(sum_dn_n) * inv_C;
        // pass 2: dx = (dn - mean(dn) - n * mean(dn * n)) * rstd, expanded with n = (x - m) * r to
        // dx = d * (w * r) - x * a + b, a = r^2 * mean(dn * n), b = m * a - mean(dn) * r: fewer
        // operations, and none the compiler could share with pass 1 and keep alive in registers
        const float a = r * r * mean_dn_n, b = m * a - mean_dn * r;
#pragma unroll
        for (int k = 0; k < CH; k++) { opaque(x[k]); opaque(g[k]); if (PREFETCH) opaque(di[k]); }
#pragma unroll
        for (int k = 0; k < CH; k++) {
            if (!chunk_on(k, lane, C)) continue;
            const int c8 = k * 32 + lane;
            const x128 w = load128(weight + c8 * 8);
            floatX* dst = dinp + base + c8 * 8;
            x128 acc = PREFETCH ? di[k] : load128(dst);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float dx = fmaf(__bfloat162float(g[k][j]), __bfloat162float(w[j]) * r,
                                      fmaf(__bfloat162float(x[k][j]), -a, b));
                acc[j] = __float2bfloat16_rn(__bfloat162float(acc[j]) + dx);
                if (AMAX) local = max(local, abs_bits(__bfloat162float(acc[j])));
            }
            store128(dst, acc);
            if (NSUM == 3) {  // the rounded bf16 values, as a separate column sum of dinp would read them
                f128 s0 = ds_acc[c8], s1 = ds_acc[C8 + c8];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    s0[j] += __bfloat162float(acc[j]);
                    s1[j] += __bfloat162float(acc[4 + j]);
                }
                ds_acc[c8] = s0; ds_acc[C8 + c8] = s1;
            }
        }
    }
    if (AMAX) merge_amax(amax, local);
    __syncthreads();
    // the block's partials: warps added in order 0, 1, ..., WARPS-1
    for (int s = threadIdx.x; s < NSUM * C4; s += blockDim.x) {
        f128 t = slots[s];
        for (int v = 1; v < WARPS; v++) {
            const f128 u = slots[v * NSUM * C4 + s];
#pragma unroll
            for (int j = 0; j < 4; j++) t[j] += u[j];
        }
        const int array = s / C4, rest = s % C4, h = rest / C8, c8 = rest % C8;  // s -> channel
        store128(partials + (long long)blockIdx.x * NSUM * C + array * C + c8 * 8 + h * 4, t);
    }
}

// The extern "C" entry points, one set per CH (NVRTC looks kernels up by these names), each with
// an _amax twin that also merges max |output| into amax (fp8 runs). Twins, not a null check, so
// the plain kernels compile as they did: the amax code cost them registers and 4-5% of their time.
// one layernorm_backward entry point: NSUM sums, WARPS warps a block, PREFETCH dinp with the row
#define LN_BACKWARD_ENTRY(NAME, CH, NSUM, WARPS, PREFETCH, AMAX)                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2) NAME(                                    \
        floatX* dinp, float* partials, const floatX* dout, const floatX* inp, const floatX* weight,   \
        const float* mean, const float* rstd, float* amax, int N, int C) {                             \
        layernorm_backward_impl<CH, PREFETCH, NSUM, AMAX, WARPS>(dinp, partials, dout, inp, weight, mean, rstd, \
                                                                 amax, N, C);                          \
    }
#define LAYERNORM_KERNEL_SET(CH, SUFFIX, AMAX)                                                         \
    extern "C" __global__ void __launch_bounds__(LN_FWD_WARPS * 32, LN_FWD_MIN_BLOCKS) layernorm_forward##SUFFIX##_##CH( \
        floatX* out, float* mean, float* rstd, const floatX* inp, const floatX* weight,               \
        const floatX* bias, float* amax, int N, int C, long long out_ld) {                             \
        layernorm_forward_impl<CH, AMAX>(out, mean, rstd, inp, weight, bias, amax, N, C, out_ld);      \
    }                                                                                                  \
    LN_BACKWARD_ENTRY(layernorm_backward##SUFFIX##_##CH, CH, 2, LN_BWD_WARPS, (CH < 7), AMAX)            \
    LN_BACKWARD_ENTRY(layernorm_backward_sum##SUFFIX##_##CH, CH, 3, LN_BWD_WARPS, (CH < 7), AMAX)        \
    LN_BACKWARD_ENTRY(layernorm_backward_sum_narrow##SUFFIX##_##CH, CH, 3, LN_BWD_NARROW_WARPS, true, AMAX)
#define LAYERNORM_KERNELS(CH)                                                                          \
    LAYERNORM_KERNEL_SET(CH, _kernel, false)                                                           \
    LAYERNORM_KERNEL_SET(CH, _amax_kernel, true)                                                       \
    extern "C" __global__ void __launch_bounds__(LN_FWD_WARPS * 32, LN_FWD_MIN_BLOCKS) layernorm_forward_fp8_kernel_##CH( \
        __nv_fp8_storage_t* out8, float* mean, float* rstd, const floatX* inp, const floatX* weight,  \
        const floatX* bias, float* amax, const float* scale, int N, int C) {                           \
        layernorm_forward_impl<CH, true, true>(nullptr, mean, rstd, inp, weight, bias, amax, N, C, C, out8, scale); \
    }
LAYERNORM_KERNELS(1)
LAYERNORM_KERNELS(2)
LAYERNORM_KERNELS(3)
LAYERNORM_KERNELS(4)
LAYERNORM_KERNELS(5)
LAYERNORM_KERNELS(6)
LAYERNORM_KERNELS(7)

// Phase 1, column-owned and staged (the _cols kernels, at widths where the row kernels run out of
// memory parallelism: at C = 1600 a warp per row keeps 8 rows of loads in flight per SM, and the
// kernel takes 115 us where the bytes need 75). Thread t of a block owns channels t*8 .. t*8+7 of
// every row (a block has ceil(C / 256) warps) and keeps their dweight, dbias (and dproj_bias)
// sums in registers. The block walks groups of LN_COLS_ROWS rows (blockIdx.x, + gridDim.x, ...);
// each thread copies its own 16-byte chunks of a group's inp, dout and dinp into shared memory
// with cp.async LN_COLS_STAGES - 1 groups ahead of the one it computes, so those loads are in
// flight while it works (it reads back only what it copied: no barrier for the staging). A row's
// two sums for dx are added over the block through shared memory, one barrier a group
// (double-buffered: the next group's writes cannot meet this group's reads). Fixed grid, fixed
// order: deterministic; same partials layout as the row kernels. Everything dinp depends on is
// rounded explicitly (__fmul_rn, ...), so the compiler cannot contract it differently in the
// _sum and _amax twins: all four give the same dinp bits. The row sums add in another order
// than the row kernels', so dinp can differ from theirs in the last bit.
template <int NSUM, bool AMAX>
__device__ __forceinline__ void layernorm_backward_cols_impl(floatX* dinp, float* partials, const floatX* dout,
                                                             const floatX* inp, const floatX* weight,
                                                             const float* mean, const float* rstd, float* amax,
                                                             int N, int C) {
    constexpr int R = LN_COLS_ROWS, S = LN_COLS_STAGES;
    extern __shared__ x128 staged[];  // [S][R][3][C / 8]: inp, dout, dinp of each staged row
    __shared__ float row_sums[2][LN_MAX_CHUNKS][2 * R];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int c8 = threadIdx.x, C8 = C / 8;
    const bool on = c8 < C8;
    const long long step = (long long)gridDim.x * R;
    const float inv_C = 1.0f / (float)C;
    // this thread's copies of group `first` into stage s (rows past N: none); always one commit,
    // so the count of groups in flight is the same for every thread
    auto stage = [&](long long first, int s) {
        if (on) {
#pragma unroll
            for (int i = 0; i < R; i++) {
                const long long row = first + i;
                if (row >= N) break;
                x128* slot = staged + (s * R + i) * 3 * C8 + c8;
                cp_async16(slot, inp + row * C + c8 * 8);
                cp_async16(slot + C8, dout + row * C + c8 * 8);
                cp_async16(slot + 2 * C8, dinp + row * C + c8 * 8);
            }
        }
        cp_async_commit();
    };
    float dw[8], db[8], ds[8];
    const x128 w = on ? load128(weight + c8 * 8) : x128::zeros();  // packed: 4 registers, not 8
#pragma unroll
    for (int j = 0; j < 8; j++) dw[j] = db[j] = ds[j] = 0.0f;
    unsigned int local = 0u;  // max |dinp| bits over this thread's elements
    long long first = (long long)blockIdx.x * R;
#pragma unroll
    for (int s = 0; s < S - 1; s++) stage(first + s * step, s);
    int s_now = 0, buf = 0;
    for (; first < N; first += step, buf ^= 1) {
        stage(first + (S - 1) * step, (s_now + S - 1) % S);  // the stage this thread read last group
        float m[R], r[R];
#pragma unroll
        for (int i = 0; i < R; i++) {
            const bool valid = first + i < N;
            m[i] = valid ? mean[first + i] : 0.0f;
            r[i] = valid ? rstd[first + i] : 0.0f;
        }
        cp_async_wait<S - 1>();  // this group's copies (all but the newest S - 1) have landed
        x128 x[R], g[R];
        float part[2 * R];
        // pass 1: this thread's share of each row's two sums, and of dweight and dbias; a row
        // past N reads as zeros and adds exactly 0 to every sum
#pragma unroll
        for (int i = 0; i < R; i++) {
            const bool valid = on && first + i < N;
            const x128* slot = staged + (s_now * R + i) * 3 * C8 + c8;
            x[i] = valid ? slot[0] : x128::zeros();
            g[i] = valid ? slot[C8] : x128::zeros();
            float sum_dn = 0.0f, sum_dn_n = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) {  // explicitly rounded: every twin gets the same dinp bits
                const float n = __fmul_rn(__fsub_rn(__bfloat162float(x[i][j]), m[i]), r[i]);
                const float d = __bfloat162float(g[i][j]);
                const float dn = __fmul_rn(d, __bfloat162float(w[j]));
                sum_dn = __fadd_rn(sum_dn, dn);
                sum_dn_n = __fmaf_rn(dn, n, sum_dn_n);
                dw[j] += d * n;
                db[j] += d;
            }
            part[2 * i] = warp_sum(sum_dn);
            part[2 * i + 1] = warp_sum(sum_dn_n);
        }
        if (lane == 0) {
#pragma unroll
            for (int k = 0; k < 2 * R; k++) row_sums[buf][warp][k] = part[k];
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 2 * R; k++) part[k] = row_sums[buf][0][k];
        for (int v = 1; v < warps; v++) {
#pragma unroll
            for (int k = 0; k < 2 * R; k++) part[k] += row_sums[buf][v][k];
        }
        // pass 2 converts the rows again rather than keeping 8 floats per chunk alive (opaque);
        // dx = d * (w * r) - x * a + b, as the row kernels, added into dinp
#pragma unroll
        for (int i = 0; i < R; i++) { opaque(x[i]); opaque(g[i]); }
#pragma unroll
        for (int i = 0; i < R; i++) {
            if (!on || first + i >= N) continue;
            const float a = __fmul_rn(__fmul_rn(r[i], r[i]), __fmul_rn(part[2 * i + 1], inv_C));
            const float b = __fsub_rn(__fmul_rn(m[i], a), __fmul_rn(__fmul_rn(part[2 * i], inv_C), r[i]));
            x128 acc = staged[(s_now * R + i) * 3 * C8 + 2 * C8 + c8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float dx = __fmaf_rn(__bfloat162float(g[i][j]), __fmul_rn(__bfloat162float(w[j]), r[i]),
                                           __fmaf_rn(__bfloat162float(x[i][j]), -a, b));
                acc[j] = __float2bfloat16_rn(__fadd_rn(__bfloat162float(acc[j]), dx));
                if (AMAX) local = max(local, abs_bits(__bfloat162float(acc[j])));
                if (NSUM == 3) ds[j] += __bfloat162float(acc[j]);  // the rounded values, as stored
            }
            store128(dinp + (first + i) * C + c8 * 8, acc);
        }
        s_now = (s_now + 1) % S;
    }
    cp_async_wait<0>();
    if (AMAX) merge_amax(amax, local);
    if (!on) return;
    float* out = partials + (long long)blockIdx.x * NSUM * C + c8 * 8;
    store128(out, f128{{dw[0], dw[1], dw[2], dw[3]}});
    store128(out + 4, f128{{dw[4], dw[5], dw[6], dw[7]}});
    store128(out + C, f128{{db[0], db[1], db[2], db[3]}});
    store128(out + C + 4, f128{{db[4], db[5], db[6], db[7]}});
    if (NSUM == 3) {
        store128(out + 2 * C, f128{{ds[0], ds[1], ds[2], ds[3]}});
        store128(out + 2 * C + 4, f128{{ds[4], ds[5], ds[6], ds[7]}});
    }
}

#define LN_BACKWARD_COLS_ENTRY(NAME, NSUM, AMAX)                                                        \
    extern "C" __global__ void __launch_bounds__(LN_MAX_CHUNKS * 32, LN_COLS_MIN_BLOCKS) NAME(           \
        floatX* dinp, float* partials, const floatX* dout, const floatX* inp, const floatX* weight,   \
        const float* mean, const float* rstd, float* amax, int N, int C) {                             \
        layernorm_backward_cols_impl<NSUM, AMAX>(dinp, partials, dout, inp, weight, mean, rstd, amax, N, C); \
    }
LN_BACKWARD_COLS_ENTRY(layernorm_backward_cols_kernel, 2, false)
LN_BACKWARD_COLS_ENTRY(layernorm_backward_sum_cols_kernel, 3, false)
LN_BACKWARD_COLS_ENTRY(layernorm_backward_cols_amax_kernel, 2, true)
LN_BACKWARD_COLS_ENTRY(layernorm_backward_sum_cols_amax_kernel, 3, true)

// Phase 2: column j of the (P, nsum*C) partials, 4 columns per thread: warp row y sums blocks
// y, y+RED_Y, ... in order, then thread row 0 adds the RED_Y sums in order 0..RED_Y-1 and adds
// the total into dweight (j < C), dbias (j < 2C) or dproj_bias (nsum = 3, j >= 2C), the last
// also written to proj_sum in fp32 when given (the attention's value-bias gradient reads it).
extern "C" __global__ void __launch_bounds__(32 * RED_Y)
layernorm_backward_reduce_kernel(floatX* dweight, floatX* dbias, floatX* dproj_bias, float* proj_sum,
                                 const float* partials, int P, int C, int nsum) {
    __shared__ f128 tile[RED_Y][32];
    const int col4 = blockIdx.x * 32 + threadIdx.x, M4 = nsum * C / 4;
    f128 acc = f128::zeros();
    if (col4 < M4) {
        for (int p = threadIdx.y; p < P; p += RED_Y) {
            const f128 v = load128(partials + (long long)p * nsum * C + col4 * 4);
#pragma unroll
            for (int j = 0; j < 4; j++) acc[j] += v[j];
        }
    }
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y != 0 || col4 >= M4) return;
    for (int y = 1; y < RED_Y; y++) {
#pragma unroll
        for (int j = 0; j < 4; j++) acc[j] += tile[y][threadIdx.x][j];
    }
    const int col = col4 * 4;
    floatX* dst = col < C ? dweight + col : col < 2 * C ? dbias + (col - C) : dproj_bias + (col - 2 * C);
#pragma unroll
    for (int j = 0; j < 4; j++) dst[j] = __float2bfloat16_rn(__bfloat162float(dst[j]) + acc[j]);
    if (proj_sum != nullptr && col >= 2 * C) store128(proj_sum + (col - 2 * C), acc);
}
