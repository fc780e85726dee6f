// AdamW over one contiguous slice of the flat buffers (any ZeRO-1 shard piece), in fp32:
//
//   g = grad * grad_scale          (grad_scale == 0: a skipped step, which leaves w, m, v as they were)
//   m = beta1 * m + (1 - beta1) * g                 v = beta2 * v + (1 - beta2) * g * g
//   w = w - lr * ((m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd * w)
//
//   adamw_kernel_bf16   w is the fp32 master, kept split (below); param (bf16) = stochastic_round(w)
//   adamw_kernel_fp32   param is fp32 and is itself w (no master copy)
//
// The split master. A bf16 parameter is the top 16 bits of its fp32 master w, plus the carry that
// stochastic rounding added: param = (bits(w) + r) >> 16 with r the 16 random bits of the step
// that wrote it. So the master needs only its low 16 bits stored beside the parameter: the next
// step redraws that r (the bits are a hash of step and position), finds the carry from
// low + r >= 2^16 and takes it back off param's bits. w comes back exactly, every bit, and the
// update is the one an fp32 master would get. It saves 2 of the 28 bytes AdamW moves per
// parameter and 2 bytes of state per parameter (1558M: 3.1 GB). master_split_kernel and
// master_join_kernel convert to and from plain fp32 (checkpoints, the first step).
//
// Each thread updates 8 consecutive elements per step of a grid-stride loop (launched with a
// thread for every vector, so one step), with 16-byte loads
// and stores (the slice starts at a multiple of 8 elements, 16-byte aligned in every buffer);
// the n % 8 elements past the last whole vector go one per thread to the first threads of the
// grid. Streaming hints: every byte is touched once per step and the state is far bigger than L2.
//
// Bitwise reproducibility across ZeRO layouts: one element's result must not depend on where
// the slices were cut. (1) Every operation is an explicitly rounded intrinsic (__fmaf_rn, ...)
// that the compiler cannot contract or reorder, so the vector path and the scalar tail path give
// the same bits. (2) The rounding noise is a hash of (step, seed + index in the slice): the
// caller passes seed = the slice's absolute offset in the flat buffer, so each element draws from
// its absolute position whatever slice it arrived in.
#include "common.cuh"

// launch constants, defined once in backends/cuda/adamw.py
#ifndef ADAMW_THREADS
#error "ADAMW_THREADS comes from backends/cuda/adamw.py (compiled in as -DADAMW_THREADS=...)"
#endif

typedef Packed128<unsigned short> u128;  // 8 low halves of split masters

struct Hyper {  // the scalars of one step, as the kernels receive them
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2, eps, wd, grad_scale;
};

// One element: updates m, v in place and returns the new weight. The bias corrections come as
// reciprocals (1 / (1 - beta^t), computed once in double on the host): a multiply, not a divide,
// within an ulp or so of the reference's division.
__device__ __forceinline__ float adamw_element(float grad, float& m, float& v, float w, const Hyper& h) {
    // grad_scale == 0 is a step the spike guard skipped: w, m and v stay as they were whatever grad
    // holds (NaN, Inf); distgpt/spikes.py says why this is not a zero-gradient step
    if (h.grad_scale == 0.0f) return w;
    const float g = __fmul_rn(grad, h.grad_scale);
    m = __fmaf_rn(h.beta1, m, __fmul_rn(h.one_minus_beta1, g));
    v = __fmaf_rn(h.beta2, v, __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(v, h.inv_bc2)), h.eps);
    const float update = __fmaf_rn(h.wd, w, __fdiv_rn(__fmul_rn(m, h.inv_bc1), denom));
    return __fmaf_rn(-h.lr, update, w);
}

// The step's share of the rounding hash (hash_u32(0) = 0, hence the constant added to the step)
__device__ __forceinline__ unsigned int step_mix(unsigned int step) { return hash_u32(step + 0x9e3779b9U); }

// The 16 random bits one element rounds with at one step: a hash of its absolute index, mixed
// with the step's, so that an element rounds independently from one step to the next
__device__ __forceinline__ unsigned int rounding_bits(unsigned int mix, unsigned int seed, long long i) {
    return hash_u32(hash_u32(seed + (unsigned int)i) ^ mix) & 0xffffU;
}

// bf16 bits of w rounded stochastically: add random bits below bf16's precision, then truncate;
// unbiased in expectation, so updates smaller than a bf16 step are not lost. Inf and NaN round
// to nearest (a carry would turn a NaN into another number).
__device__ __forceinline__ unsigned short rounded_high(float w, unsigned int random) {
    const unsigned int bits = __float_as_uint(w);
    if ((bits & 0x7f800000U) == 0x7f800000U) return __bfloat16_as_ushort(__float2bfloat16_rn(w));
    return (unsigned short)((bits + random) >> 16);
}

// The inverse: the fp32 master from its parameter's bits, its low half and the random bits that
// rounded it. Exact for every finite w (and inf); a NaN comes back a NaN.
__device__ __forceinline__ float joined_master(unsigned short high_rounded, unsigned short low, unsigned int random) {
    const unsigned int carry = ((unsigned int)low + random) >> 16;
    const unsigned int high = (unsigned short)(high_rounded - carry);
    return __uint_as_float((high << 16) | low);
}

// 8 elements at p (16-byte aligned) to/from fp32 registers, for either storage type
__device__ __forceinline__ void load8(const floatX* p, float (&out)[8]) {
    const x128 a = load128cs(p);
#pragma unroll
    for (int j = 0; j < 8; j++) out[j] = __bfloat162float(a[j]);
}
__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
    const f128 a = load128cs(p), b = load128cs(p + 4);
#pragma unroll
    for (int j = 0; j < 4; j++) { out[j] = a[j]; out[j + 4] = b[j]; }
}
__device__ __forceinline__ void store8(float* p, const float (&in)[8]) {
    f128 a, b;
#pragma unroll
    for (int j = 0; j < 4; j++) { a[j] = in[j]; b[j] = in[j + 4]; }
    store128cs(p, a);
    store128cs(p + 4, b);
}

#define ADAMW_ARGS                                                                                  \
    long long n, float lr, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, \
        float inv_bc1, float inv_bc2, float eps, float wd, float grad_scale,                        \
        const float* grad_scale_ptr, unsigned int seed, unsigned int step
// the clipping scale comes from the device when the optimizer computed it there (no host sync
// between the gradient norm and the update), else from the argument
#define ADAMW_HYPER {lr, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2, eps, wd, \
                     grad_scale_ptr ? *grad_scale_ptr : grad_scale}

// bf16 parameters with split masters (low: each master's low 16 bits). The parameters were last
// rounded at step - 1 (or hold their master exactly, low = 0, which no carry disturbs).
extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_kernel_bf16(floatX* param, const floatX* grad, float* m, float* v, unsigned short* low, ADAMW_ARGS) {
    const Hyper h = ADAMW_HYPER;
    const unsigned int then = step_mix(step - 1), now = step_mix(step);
    const long long n8 = n / 8;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = first; k < n8; k += stride) {
        const long long at = k * 8;
        float g[8], mm[8], vv[8];
        load8(grad + at, g);
        load8(m + at, mm);
        load8(v + at, vv);
        x128 p = load128cs(param + at);
        u128 lo = load128cs(low + at);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float w0 = joined_master(__bfloat16_as_ushort(p[j]), lo[j], rounding_bits(then, seed, at + j));
            const float w = adamw_element(g[j], mm[j], vv[j], w0, h);
            lo[j] = (unsigned short)(__float_as_uint(w) & 0xffffU);
            p[j] = __ushort_as_bfloat16(rounded_high(w, rounding_bits(now, seed, at + j)));
        }
        store8(m + at, mm);
        store8(v + at, vv);
        store128cs(param + at, p);
        store128cs(low + at, lo);
    }
    // the last n % 8 elements, one per thread (only the grid's first few threads have one)
    const long long i = n8 * 8 + first;
    if (i < n) {
        float mi = m[i], vi = v[i];
        const float w0 = joined_master(__bfloat16_as_ushort(param[i]), low[i], rounding_bits(then, seed, i));
        const float w = adamw_element(__bfloat162float(grad[i]), mi, vi, w0, h);
        m[i] = mi;
        v[i] = vi;
        low[i] = (unsigned short)(__float_as_uint(w) & 0xffffU);
        param[i] = __ushort_as_bfloat16(rounded_high(w, rounding_bits(now, seed, i)));
    }
}

// fp32 parameters are their own masters
extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_kernel_fp32(float* param, const float* grad, float* m, float* v, ADAMW_ARGS) {
    const Hyper h = ADAMW_HYPER;
    const long long n8 = n / 8;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = first; k < n8; k += stride) {
        const long long at = k * 8;
        float g[8], mm[8], vv[8], w[8];
        load8(grad + at, g);
        load8(m + at, mm);
        load8(v + at, vv);
        load8(param + at, w);
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = adamw_element(g[j], mm[j], vv[j], w[j], h);
        store8(m + at, mm);
        store8(v + at, vv);
        store8(param + at, w);
    }
    const long long i = n8 * 8 + first;
    if (i < n) {
        float mi = m[i], vi = v[i];
        param[i] = adamw_element(grad[i], mi, vi, param[i], h);
        m[i] = mi;
        v[i] = vi;
    }
}

// Split fp32 masters: low = their low halves, param = them rounded as adamw_kernel_bf16 rounds at
// `step` (so that its step + 1 finds them). One element per thread.
extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
master_split_kernel(floatX* param, unsigned short* low, const float* values, long long n, unsigned int seed,
                    unsigned int step) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float w = values[i];
    low[i] = (unsigned short)(__float_as_uint(w) & 0xffffU);
    param[i] = __ushort_as_bfloat16(rounded_high(w, rounding_bits(step_mix(step), seed, i)));
}

// Join split masters back into fp32, their parameters last rounded at `step`
extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
master_join_kernel(float* out, const floatX* param, const unsigned short* low, long long n, unsigned int seed,
                   unsigned int step) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = joined_master(__bfloat16_as_ushort(param[i]), low[i], rounding_bits(step_mix(step), seed, i));
}
