// FP8 casts for the scaled fp8 matmuls (issue #13), the reference's fp8_* ops on the GPU:
//
//   fp8_quantize            out[i] = fp8(inp[i] * scale), saturated; amax = max |inp[i]|
//   fp8_quantize_transpose  the same for a (R, C) matrix, writing out (R, C) and out_t (C, R):
//                           Hopper's fp8 tensor cores take both operands K-major, so a weight
//                           feeds the backward's dinp = dout @ W as its transpose
//   fp8_scale               scale = the largest power of two with amax * scale <= limit, else 1
//   fp8_amax                amax = max(amax, max |inp[i]|)
//   fp8_cast(_transpose)    current scaling, what training uses: the scale is taken from the
//                           amax fp8_amax just recorded (each thread derives it, no launch in
//                           between), the tensor is quantized with it and block 0 writes the
//                           inverse the matmul multiplies by
//
// Delayed scaling (quantize with a past scale while recording this amax) needs one pass per
// tensor; current scaling two reads (amax, then cast), but no history to keep, checkpoint or
// warm up, and no clipping when a tensor's range jumps. Training takes current scaling (see
// model/fp8.py for the measured cost); the format is a template argument: E4M3 for weights and
// activations, E4M3 or E5M2 for gradients (fp8_gradients).
//
// amax is deterministic: the maximum does not depend on the order it is taken in. Each block
// takes its maximum over the bit patterns of |x| (for non-negative floats, and for NaN above
// them all, the unsigned order of the bits is the order of the values, so a NaN wins as in the
// reference) and merges it with atomicMax into amax, which the caller zeroes first.
#include "common.cuh"
#include "gelu.cuh"
#include <cuda_fp8.h>

#ifndef FP8_THREADS
#error "FP8_THREADS comes from backends/cuda/fp8.py (compiled in as -DFP8_THREADS=...)"
#endif
#ifndef FP8_TILE
#error "FP8_TILE comes from backends/cuda/fp8.py (compiled in as -DFP8_TILE=...)"
#endif
#ifndef FP8_UNROLL
#error "FP8_UNROLL comes from backends/cuda/fp8.py (compiled in as -DFP8_UNROLL=...)"
#endif
#ifndef FP8_VTILE
#error "FP8_VTILE comes from backends/cuda/fp8.py (compiled in as -DFP8_VTILE=...)"
#endif
#ifndef FP8_VROWS
#error "FP8_VROWS comes from backends/cuda/fp8.py (compiled in as -DFP8_VROWS=...)"
#endif

// the maximum of the block's v (abs_bits values, common.cuh), valid in its first thread
__device__ __forceinline__ unsigned int block_max(unsigned int v) {
    __shared__ unsigned int warp_max[32];
    v = warp_max_bits(v);
    const int id = threadIdx.y * blockDim.x + threadIdx.x;  // blocks are 1-D or 2-D
    const int warp = id / 32, lane = id % 32;
    const int warps = (blockDim.x * blockDim.y + 31) / 32;
    if (lane == 0) warp_max[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_max_bits(lane < warps ? warp_max[lane] : 0u);
    }
    return v;  // valid in the block's first thread
}

// the largest power of two s with amax * s <= limit, or 1 when amax is 0 or not finite.
// floor(log2(q)) is frexp's exponent less one (q = m 2^e, 0.5 <= m < 1): exact, where a rounded
// log2 could land on the wrong side of a power of two
__device__ __forceinline__ float pow2_scale(float amax, double limit) {
    const double a = (double)amax;
    if (!(a > 0.0 && a <= 1.7976931348623157e308)) return 1.0f;  // zero, inf or NaN (NaN fails both)
    int e;
    frexp(limit / a, &e);
    return (float)ldexp(1.0, e - 1);
}

template <__nv_fp8_interpretation_t FORMAT>
__device__ __forceinline__ __nv_fp8_storage_t to_fp8(float x) {
    // saturating: past the format's largest finite value (e4m3 has no infinity) x clips to it
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, FORMAT);
}

// out, inp: n elements, 16-byte aligned; 8 per 16-byte bf16 load and 8-byte fp8 store,
// grid-stride, FP8_UNROLL loads in flight per thread before the first is used (a weight of a
// few MB is otherwise a chain of dependent round trips: 25 us for 15 MB). CAST=false: quantize
// with *scale_ptr and record amax (out may be null: fp8_amax records only); CAST=true: the scale
// comes from *amax (current scaling) and inverse gets 1 / scale.
template <__nv_fp8_interpretation_t FORMAT, bool CAST>
__device__ void quantize(__nv_fp8_storage_t* out, float* amax, const floatX* inp, const float* scale_ptr,
                         float* inverse, double limit, long long n) {
    const float scale = CAST ? pow2_scale(*amax, limit) : (out != nullptr ? *scale_ptr : 1.0f);
    if (CAST && blockIdx.x == 0 && threadIdx.x == 0) *inverse = 1.0f / scale;
    unsigned int local = 0u;
    const long long n8 = n / 8;
    const long long stride = (long long)gridDim.x * FP8_THREADS;
    for (long long k0 = (long long)blockIdx.x * FP8_THREADS + threadIdx.x; k0 < n8; k0 += FP8_UNROLL * stride) {
        x128 x[FP8_UNROLL];
#pragma unroll
        for (int u = 0; u < FP8_UNROLL; u++)
            if (k0 + u * stride < n8) x[u] = load128cs(inp + (k0 + u * stride) * 8);
#pragma unroll
        for (int u = 0; u < FP8_UNROLL; u++) {
            const long long k = k0 + u * stride;
            if (k >= n8) break;
            float scaled[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float v = __bfloat162float(x[u][j]);
                local = max(local, abs_bits(v));
                scaled[j] = v * scale;
            }
            if (out != nullptr) *reinterpret_cast<uint2*>(out + k * 8) = to_fp8x8<FORMAT>(scaled);
        }
    }
    // the n % 8 elements past the last vector: the grid's first threads
    const long long tail = n8 * 8 + (long long)blockIdx.x * FP8_THREADS + threadIdx.x;
    if (tail < n) {
        const float v = __bfloat162float(inp[tail]);
        local = max(local, abs_bits(v));
        if (out != nullptr) out[tail] = to_fp8<FORMAT>(v * scale);
    }
    if (CAST) return;  // amax is this cast's input, not its output
    const unsigned int m = block_max(local);
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned int*>(amax), m);
}

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
fp8_quantize_e4m3_kernel(__nv_fp8_storage_t* out, float* amax, const floatX* inp, const float* scale, long long n) {
    quantize<__NV_E4M3, false>(out, amax, inp, scale, nullptr, 0.0, n);
}

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
fp8_quantize_e5m2_kernel(__nv_fp8_storage_t* out, float* amax, const floatX* inp, const float* scale, long long n) {
    quantize<__NV_E5M2, false>(out, amax, inp, scale, nullptr, 0.0, n);
}

// amax = max(amax, max |inp|): the first of current scaling's two reads (no output written)
extern "C" __global__ void __launch_bounds__(FP8_THREADS)
fp8_amax_kernel(float* amax, const floatX* inp, long long n) {
    quantize<__NV_E4M3, false>(nullptr, amax, inp, nullptr, nullptr, 0.0, n);
}

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
fp8_cast_e4m3_kernel(__nv_fp8_storage_t* out, float* inverse, const floatX* inp, float* amax, double limit,
                     long long n) {
    quantize<__NV_E4M3, true>(out, amax, inp, nullptr, inverse, limit, n);
}

extern "C" __global__ void __launch_bounds__(FP8_THREADS)
fp8_cast_e5m2_kernel(__nv_fp8_storage_t* out, float* inverse, const floatX* inp, float* amax, double limit,
                     long long n) {
    quantize<__NV_E5M2, true>(out, amax, inp, nullptr, inverse, limit, n);
}

// (R, C) row-major in, out (R, C) and out_t (C, R). One FP8_TILE x FP8_TILE tile per block of
// (FP8_TILE, FP8_THREADS / FP8_TILE) threads: read row-wise (coalesced), write out row-wise,
// stage the fp8 bytes in shared memory and write out_t row-wise too.
template <__nv_fp8_interpretation_t FORMAT, bool CAST>
__device__ void quantize_transpose(__nv_fp8_storage_t* out, __nv_fp8_storage_t* out_t, float* amax,
                                   const floatX* inp, const float* scale_ptr, float* inverse, double limit,
                                   int R, int C) {
    __shared__ __nv_fp8_storage_t tile[FP8_TILE][FP8_TILE + 4];  // +4: no bank conflicts on the column reads
    const float scale = CAST ? pow2_scale(*amax, limit) : *scale_ptr;
    if (CAST && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) *inverse = 1.0f / scale;
    const int r0 = blockIdx.y * FP8_TILE, c0 = blockIdx.x * FP8_TILE;
    const int tx = threadIdx.x, ty = threadIdx.y, rows_per_pass = blockDim.y;
    unsigned int local = 0u;
    for (int dr = ty; dr < FP8_TILE; dr += rows_per_pass) {
        const int r = r0 + dr, c = c0 + tx;
        if (r < R && c < C) {
            const float v = __bfloat162float(inp[(long long)r * C + c]);
            local = max(local, abs_bits(v));
            const __nv_fp8_storage_t q = to_fp8<FORMAT>(v * scale);
            out[(long long)r * C + c] = q;
            tile[dr][tx] = q;
        }
    }
    __syncthreads();
    for (int dc = ty; dc < FP8_TILE; dc += rows_per_pass) {
        const int c = c0 + dc, r = r0 + tx;
        if (r < R && c < C) out_t[(long long)c * R + r] = tile[tx][dc];
    }
    if (CAST) return;
    const unsigned int m = block_max(local);
    if (threadIdx.x == 0 && threadIdx.y == 0) atomicMax(reinterpret_cast<unsigned int*>(amax), m);
}

// The same for R and C multiples of 8 (every GPT-2 weight and activation), 16-byte vectors: one
// FP8_VROWS x FP8_VTILE tile (rows of inp x columns) per block of FP8_THREADS threads. Each
// thread first issues all of its 16-byte loads of 8 bf16 (row-wise, coalesced; several in
// flight per thread is what reaches the memory's bandwidth), then writes their 8 fp8 bytes to out
// and to a shared tile of 32-bit words. For out_t each thread reads a 4-column x 8-row block of
// the tile as 8 words, transposes its bytes in registers (byte_perm) and writes 4 out_t rows of
// 8 bytes. The tile's pitch of 17 words and a warp spanning 8 column blocks x 4 row blocks put
// those word reads on 32 different banks. Measured at 1558M B=16 (H200, 2026-12-03): the first
// version (a 64 x 64 tile, one load in flight, byte reads of the tile) moved 2.8 TB/s, this one
// about 3.5 (the fp8 step with current scaling 245.0 -> 238.1 ms). The scalar kernel above moves
// 2 bytes a load and 1 a store. Same quantization, so the same bytes.
__device__ __forceinline__ void transpose_4x4_bytes(unsigned int& a, unsigned int& b, unsigned int& c,
                                                    unsigned int& d) {
    // rows a..d of 4 bytes in, columns out: a = (a0 b0 c0 d0), b = (a1 b1 c1 d1), ...
    const unsigned int ab_lo = __byte_perm(a, b, 0x5140), ab_hi = __byte_perm(a, b, 0x7362);
    const unsigned int cd_lo = __byte_perm(c, d, 0x5140), cd_hi = __byte_perm(c, d, 0x7362);
    a = __byte_perm(ab_lo, cd_lo, 0x5410);
    b = __byte_perm(ab_lo, cd_lo, 0x7632);
    c = __byte_perm(ab_hi, cd_hi, 0x5410);
    d = __byte_perm(ab_hi, cd_hi, 0x7632);
}

// out_t (C, R) from a shared tile of FP8_VROWS rows x FP8_VTILE fp8 bytes (as 32-bit words, pitch
// FP8_VTILE / 4 + 1) holding x[r0.., c0..]. Each thread takes tile columns 4 w .. 4 w + 3 (out_t
// rows c0 + 4 w ..) of tile rows 8 g .. 8 g + 7 (8 bytes of each of those out_t rows), transposes
// the 4 x 8 bytes in registers and writes 4 out_t rows of 8 bytes; a warp takes 8 column blocks x
// 4 row blocks, whose word reads fall on 32 different banks. R and C multiples of 8 (and 4): a
// thread's block is all in range or all out.
__device__ __forceinline__ void store_tile_transposed(const unsigned int (*tile)[FP8_VTILE / 4 + 1],
                                                      __nv_fp8_storage_t* __restrict__ out_t, int r0, int c0,
                                                      int R, int C) {
    constexpr int WARPS_ACROSS = FP8_VTILE / 4 / 8;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int w = (warp % WARPS_ACROSS) * 8 + lane % 8, g = (warp / WARPS_ACROSS) * 4 + lane / 8;
    const int c = c0 + 4 * w, r = r0 + 8 * g;
    if (c < C && r < R) {
        unsigned int q[8];
#pragma unroll
        for (int j = 0; j < 8; j++) q[j] = tile[8 * g + j][w];
        transpose_4x4_bytes(q[0], q[1], q[2], q[3]);
        transpose_4x4_bytes(q[4], q[5], q[6], q[7]);
#pragma unroll
        for (int i = 0; i < 4; i++)
            *reinterpret_cast<uint2*>(out_t + (long long)(c + i) * R + r) = make_uint2(q[i], q[4 + i]);
    }
}

// GELU = true (fp8_gelu_quantize_transpose, delayed scaling only): the tile's values are the fc
// layer's output gradient gelu'(pre) * inp, rounded to bf16 as gelu_backward writes it (inp the
// fc projection's input-gradient product, pre the fc pre-activation), so the bytes are those of
// gelu_backward then the cast; and the tile's column sums of those bf16 values go to
// partials[blockIdx.y][columns] (fp32, the bias gradient's first phase: each thread adds its
// rows in order, then 64 threads add the 32 threads' sums of each column in order).
template <__nv_fp8_interpretation_t FORMAT, bool CAST, bool GELU = false>
__device__ void quantize_transpose_vec(__nv_fp8_storage_t* __restrict__ out, __nv_fp8_storage_t* __restrict__ out_t,
                                       float* amax, const floatX* __restrict__ inp, const float* scale_ptr,
                                       float* inverse, double limit, int R, int C,
                                       const floatX* __restrict__ pre = nullptr, float* __restrict__ partials = nullptr) {
    constexpr int VEC = 8, WORDS = FP8_VTILE / 4, PITCH = WORDS + 1;  // pitch: see above
    constexpr int VECS_PER_ROW = FP8_VTILE / VEC;
    constexpr int LOADS = FP8_VROWS * VECS_PER_ROW / FP8_THREADS;     // 16-byte loads per thread
    static_assert(LOADS * FP8_THREADS == FP8_VROWS * VECS_PER_ROW, "a tile is whole loads of every thread");
    static_assert((FP8_VTILE / 4) * (FP8_VROWS / 8) == FP8_THREADS, "one 4 x 8 block of out_t per thread");
    static_assert(FP8_VTILE / 4 % 8 == 0 && FP8_THREADS / 32 % (FP8_VTILE / 32) == 0, "warps of 8 x 4 blocks");
    __shared__ unsigned int tile[FP8_VROWS][PITCH];
    const float scale = CAST ? pow2_scale(*amax, limit) : *scale_ptr;
    if (CAST && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *inverse = 1.0f / scale;
    const int r0 = blockIdx.y * FP8_VROWS, c0 = blockIdx.x * FP8_VTILE;
    x128 x[LOADS], h[GELU ? LOADS : 1];
#pragma unroll
    for (int u = 0; u < LOADS; u++) {
        const int v = threadIdx.x + u * FP8_THREADS;
        const int r = r0 + v / VECS_PER_ROW, c = c0 + (v % VECS_PER_ROW) * VEC;
        if (r < R && c < C) {
            x[u] = load128cs(inp + (long long)r * C + c);
            if constexpr (GELU) h[u] = load128cs(pre + (long long)r * C + c);
        }
    }
    // GELU: this thread's column sums (its columns are the same in every load: VECS_PER_ROW
    // divides FP8_THREADS)
    float colsum[VEC];
#pragma unroll
    for (int j = 0; j < VEC; j++) colsum[j] = 0.0f;
    unsigned int local = 0u;
#pragma unroll
    for (int u = 0; u < LOADS; u++) {
        const int v = threadIdx.x + u * FP8_THREADS;
        const int dr = v / VECS_PER_ROW, dc = (v % VECS_PER_ROW) * VEC;
        const int r = r0 + dr, c = c0 + dc;
        if (r < R && c < C) {
            x128 v = x[u];
            if constexpr (GELU) v = gelu_backward_x128(h[u], x[u]);  // gelu'(pre) * inp, in bf16
            float f[VEC];
#pragma unroll
            for (int j = 0; j < VEC; j++) {
                f[j] = __bfloat162float(v[j]);
                if constexpr (GELU) colsum[j] += f[j];
                local = max(local, abs_bits(f[j]));
                f[j] *= scale;
            }
            const uint2 y = to_fp8x8<FORMAT>(f);
            *reinterpret_cast<uint2*>(out + (long long)r * C + c) = y;
            tile[dr][dc / 4] = y.x;
            tile[dr][dc / 4 + 1] = y.y;
        }
    }
    __syncthreads();
    store_tile_transposed(tile, out_t, r0, c0, R, C);
    if (CAST) return;
    const unsigned int m = block_max(local);  // its barriers also order the tile reads above
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned int*>(amax), m);
    if constexpr (GELU) {
        constexpr int GROUPS = FP8_THREADS / VECS_PER_ROW;  // threads sharing a thread's columns
        static_assert(FP8_THREADS >= FP8_VTILE, "one thread per column adds the groups' sums");
        float (*sums)[FP8_VTILE] = reinterpret_cast<float (*)[FP8_VTILE]>(&tile[0][0]);
        static_assert(sizeof(float) * GROUPS * FP8_VTILE <= sizeof(tile), "the column sums fit the tile");
        const int group = threadIdx.x / VECS_PER_ROW, first = (threadIdx.x % VECS_PER_ROW) * VEC;
#pragma unroll
        for (int j = 0; j < VEC; j++) sums[group][first + j] = colsum[j];
        __syncthreads();
        const int c = c0 + threadIdx.x;
        if (threadIdx.x < FP8_VTILE && c < C) {
            float total = 0.0f;
            for (int g = 0; g < GROUPS; g++) total += sums[g][threadIdx.x];
            partials[(long long)blockIdx.y * C + c] = total;
        }
    }
}

// The entry points of a transposing tile function FN: quantize with a given scale and current
// scaling's cast (weights in e4m3; gradients in either format, for fp8 weight gradients), named
// fp8_quantize_transpose<SUFFIX>_<fmt>_kernel and fp8_cast_transpose<SUFFIX>_<fmt>_kernel
// (backends/cuda/fp8.py picks a SUFFIX per shape)
#define TRANSPOSE_KERNELS(SUFFIX, FN)                                                                    \
    extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_quantize_transpose##SUFFIX##_e4m3_kernel( \
        __nv_fp8_storage_t* out, __nv_fp8_storage_t* out_t, float* amax, const floatX* inp,             \
        const float* scale, int R, int C) {                                                              \
        FN<__NV_E4M3, false>(out, out_t, amax, inp, scale, nullptr, 0.0, R, C);                          \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_quantize_transpose##SUFFIX##_e5m2_kernel( \
        __nv_fp8_storage_t* out, __nv_fp8_storage_t* out_t, float* amax, const floatX* inp,             \
        const float* scale, int R, int C) {                                                              \
        FN<__NV_E5M2, false>(out, out_t, amax, inp, scale, nullptr, 0.0, R, C);                          \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_cast_transpose##SUFFIX##_e4m3_kernel(    \
        __nv_fp8_storage_t* out, __nv_fp8_storage_t* out_t, float* inverse, const floatX* inp,          \
        float* amax, double limit, int R, int C) {                                                       \
        FN<__NV_E4M3, true>(out, out_t, amax, inp, nullptr, inverse, limit, R, C);                       \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_cast_transpose##SUFFIX##_e5m2_kernel(    \
        __nv_fp8_storage_t* out, __nv_fp8_storage_t* out_t, float* inverse, const floatX* inp,          \
        float* amax, double limit, int R, int C) {                                                       \
        FN<__NV_E5M2, true>(out, out_t, amax, inp, nullptr, inverse, limit, R, C);                       \
    }
TRANSPOSE_KERNELS(, quantize_transpose)
TRANSPOSE_KERNELS(_vec, quantize_transpose_vec)

// fp8_transpose: out_t (C, R) = x (R, C), fp8 bytes of either format (the GELU output the fc
// matmul's epilogue wrote in fp8, copied tokens last for the fc projection's weight gradient).
// One FP8_VROWS x FP8_VTILE tile per block, as the transposing casts: every 16-byte load of the
// tile issued first, then the shared tile written and store_tile_transposed. R a multiple of 8,
// C of 16, x 16-byte and out_t 8-byte aligned. One read and one write of a byte per element,
// where casting the bf16 output read 2 bytes and wrote 2.
extern "C" __global__ void __launch_bounds__(FP8_THREADS)
fp8_transpose_vec_kernel(__nv_fp8_storage_t* __restrict__ out_t, const __nv_fp8_storage_t* __restrict__ x, int R,
                         int C) {
    constexpr int VEC = 16, PITCH = FP8_VTILE / 4 + 1, VECS_PER_ROW = FP8_VTILE / VEC;
    constexpr int LOADS = FP8_VROWS * VECS_PER_ROW / FP8_THREADS;
    static_assert(LOADS * FP8_THREADS == FP8_VROWS * VECS_PER_ROW, "a tile is whole loads of every thread");
    __shared__ unsigned int tile[FP8_VROWS][PITCH];
    const int r0 = blockIdx.y * FP8_VROWS, c0 = blockIdx.x * FP8_VTILE;
    uint4 v[LOADS];
#pragma unroll
    for (int u = 0; u < LOADS; u++) {
        const int k = threadIdx.x + u * FP8_THREADS;
        const int r = r0 + k / VECS_PER_ROW, c = c0 + (k % VECS_PER_ROW) * VEC;
        if (r < R && c < C) v[u] = __ldcs(reinterpret_cast<const uint4*>(x + (long long)r * C + c));
    }
#pragma unroll
    for (int u = 0; u < LOADS; u++) {
        const int k = threadIdx.x + u * FP8_THREADS;
        const int dr = k / VECS_PER_ROW, dc = (k % VECS_PER_ROW) * VEC;
        if (r0 + dr < R && c0 + dc < C) {
            tile[dr][dc / 4] = v[u].x;
            tile[dr][dc / 4 + 1] = v[u].y;
            tile[dr][dc / 4 + 2] = v[u].z;
            tile[dr][dc / 4 + 3] = v[u].w;
        }
    }
    __syncthreads();
    store_tile_transposed(tile, out_t, r0, c0, R, C);
}

// fp8_gelu_quantize_transpose: the fc layer's output gradient, from the fc projection's input-
// gradient product inp and the pre-activation pre, cast with a delayed scale into both layouts,
// its amax merged, its bias gradient's column partials written (the bias kernels' phase 2 adds
// them up): one read of inp and pre, where gelu_backward, the cast and the bias gradient moved
// the gradient through memory three more times
#define GELU_TRANSPOSE_KERNEL(FMT, FORMAT)                                                                \
    extern "C" __global__ void __launch_bounds__(FP8_THREADS) fp8_gelu_quantize_transpose_vec_##FMT##_kernel( \
        __nv_fp8_storage_t* out, __nv_fp8_storage_t* out_t, float* amax, float* partials, const floatX* inp, \
        const floatX* pre, const float* scale, int R, int C) {                                             \
        quantize_transpose_vec<FORMAT, false, true>(out, out_t, amax, inp, scale, nullptr, 0.0, R, C, pre, partials); \
    }
GELU_TRANSPOSE_KERNEL(e4m3, __NV_E4M3)
GELU_TRANSPOSE_KERNEL(e5m2, __NV_E5M2)

// scale[0] = pow2_scale(amax[0], limit); inverse[0] = 1 / scale[0] (exact: a power of two;
// skipped when null), what cuBLASLt's A/B_SCALE_POINTER multiplies by. One thread.
extern "C" __global__ void fp8_scale_kernel(float* scale, float* inverse, const float* amax, double limit) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const float s = pow2_scale(amax[0], limit);
    scale[0] = s;
    if (inverse != nullptr) inverse[0] = 1.0f / s;
}

// Delayed scaling, one thread per site (mask[site] != 0; the others are left alone): the site's
// amax of the last forward and backward joins its history of H (the oldest drops out), and its
// scale and inverse become pow2_scale of the history's maximum, for the casts of the next
// forward and backward. A non-finite entry anywhere in the history gives scale 1, as a
// non-finite amax does. amax, scale and inverse are `stride` floats apart (cuBLASLt's aligned
// scale pointers), history is (sites, H).
extern "C" __global__ void fp8_delayed_scales_kernel(float* scale, float* inverse, float* history, const float* amax,
                                                     const double* limits, const unsigned char* mask, int sites,
                                                     int H, int stride) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= sites || !mask[s]) return;
    float* h = history + (long long)s * H;
    for (int i = H - 1; i > 0; i--) h[i] = h[i - 1];
    h[0] = amax[(long long)s * stride];
    float a = 0.0f;
    bool finite = true;
    for (int i = 0; i < H; i++) {
        finite = finite && isfinite(h[i]);
        a = fmaxf(a, h[i]);
    }
    const float sc = pow2_scale(finite ? a : __int_as_float(0x7fc00000), limits[s]);
    scale[(long long)s * stride] = sc;
    inverse[(long long)s * stride] = 1.0f / sc;
}
