// Helpers shared by every distgpt kernel. Compiled at run time by NVRTC (through CuPy), once per
// process and cached on disk by CuPy, with -arch for the device at hand.
//
// floatX is the storage type of parameters, activations and gradients (bf16); statistics and
// optimizer state are fp32. Packed128 moves 16 bytes (8 bf16 or 4 fp32) per load/store, the
// widest access a thread can issue: memory-bound kernels should read and write through it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

// NVRTC compiles without the host math headers: define what kernels use from them
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef FLT_MAX
#define FLT_MAX 3.402823466e+38f
#endif

typedef __nv_bfloat16 floatX;

template <class T>
struct alignas(16) Packed128 {
    static constexpr int size = 16 / sizeof(T);
    T v[size];
    __device__ static Packed128 zeros() {
        Packed128 p;
        for (int i = 0; i < size; i++) p.v[i] = (T)0.0f;
        return p;
    }
    __device__ T& operator[](int i) { return v[i]; }
    __device__ const T& operator[](int i) const { return v[i]; }
};
typedef Packed128<floatX> x128;
typedef Packed128<float> f128;

// 8 floats to 8 fp8 bytes (element j in byte j), saturating (past the format's largest finite
// value x clips to it), the bytes __nv_cvt_float_to_fp8 gives each: converted in pairs, one F2FP
// instruction for two elements where the one-element form takes one each (conversions issue at
// a quarter of the FP32 rate: fp8.cu's fused GELU cast ran 32 of them a thread beside 64 SFU ops)
template <__nv_fp8_interpretation_t FORMAT>
__device__ __forceinline__ uint2 to_fp8x8(const float (&f)[8]) {
    union { __nv_fp8x2_storage_t pair[4]; uint2 packed; } y;
#pragma unroll
    for (int k = 0; k < 4; k++)  // the pair's first element lands in its low byte
        y.pair[k] = __nv_cvt_float2_to_fp8x2(make_float2(f[2 * k], f[2 * k + 1]), __NV_SATFINITE, FORMAT);
    return y.packed;
}

// 8 floats rounded to bf16, the bits of __float2bfloat16_rn on each, in pairs: one F2FP
// instruction converts two where __float2bfloat16_rn's F2F converts one (conversions issue at a
// quarter of the FP32 rate, a limit for the elementwise kernels that also run an exp)
__device__ __forceinline__ x128 to_bf16x8(const float (&f)[8]) {
    x128 out;
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int k = 0; k < 4; k++) pairs[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
    return out;
}

// 16-byte load through the read-only cache path / plain store; p must be 16-byte aligned
template <class T>
__device__ __forceinline__ Packed128<T> load128(const T* p) {
    return *reinterpret_cast<const Packed128<T>*>(p);
}
template <class T>
__device__ __forceinline__ Packed128<T> load128cs(const T* p) {  // streaming: read once
    Packed128<T> out;
    *reinterpret_cast<int4*>(&out) = __ldcs(reinterpret_cast<const int4*>(p));
    return out;
}
template <class T>
__device__ __forceinline__ void store128(T* p, Packed128<T> v) {
    *reinterpret_cast<Packed128<T>*>(p) = v;
}
template <class T>
__device__ __forceinline__ void store128cs(T* p, Packed128<T> v) {  // streaming: not re-read soon
    __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<int4*>(&v));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// amax (the largest |x|, what an fp8 cast scales by), deterministic: for non-negative floats,
// and for NaN above them all, the unsigned order of the bits is the order of the values, so a
// maximum over the bits of |x| is max |x| whatever order it is taken in (a NaN wins, as in the
// reference). merge_amax folds one warp's maximum into *amax (zeroed by the caller first): every
// lane passes its own, lane 0 merges, and skips the atomic where amax already holds as much.
__device__ __forceinline__ unsigned int abs_bits(float x) {
    return __float_as_uint(x) & 0x7fffffffu;
}
__device__ __forceinline__ unsigned int warp_max_bits(unsigned int v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
__device__ __forceinline__ void merge_amax(float* amax, unsigned int local) {
    const unsigned int m = warp_max_bits(local);
    unsigned int* bits = reinterpret_cast<unsigned int*>(amax);
    if (threadIdx.x % 32 == 0 && m > *reinterpret_cast<volatile unsigned int*>(bits)) atomicMax(bits, m);
}

// merge_amax for a whole 1-D block (every thread calls it): one load of amax, and at most one
// atomic, per block rather than per warp, for kernels of many short blocks (gelu_backward's
// 51,200 at 1558M B=16), so that they do not all read the one amax address.
__device__ __forceinline__ void block_merge_amax(float* amax, unsigned int local) {
    __shared__ unsigned int warp_maxima[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    local = warp_max_bits(local);
    if (lane == 0) warp_maxima[warp] = local;
    __syncthreads();
    if (warp == 0) merge_amax(amax, lane < (int)(blockDim.x / 32) ? warp_maxima[lane] : 0u);
}

// Sum over the whole block, same result in every thread; the order of additions is fixed by
// the thread layout, so the result is deterministic. `shared` holds at least 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    v = warp_sum(v);
    __syncthreads();  // `shared` may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* shared) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : -INFINITY;
    return warp_max(v);
}

// A 32-bit integer hash (a xorshift-multiply mix): random bits from a position and a step, for
// AdamW's stochastic rounding
__device__ __forceinline__ unsigned int hash_u32(unsigned int x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

// cp.async (sm_80+), for the kernels that stage rows in shared memory (classifier, layernorm).
// 16 bytes global -> shared without passing through registers; .cg caches in L2 only. Before
// sm_80 a plain streaming copy through registers, and the commit/wait are no-ops.
__device__ __forceinline__ void cp_async16(x128* dst, const floatX* src) {
#if __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(__cvta_generic_to_global(src))
                 : "memory");
#else
    *dst = load128cs(src);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>  // wait until at most N of this thread's committed groups are still in flight
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

