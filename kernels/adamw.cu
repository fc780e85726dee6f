// AdamW over one contiguous slice of the flat buffers (any ZeRO-1 shard piece), in fp32:
//
//   g = grad * grad_scale          (0 when grad_scale == 0: a skipped step, whatever grad holds)
//   m = beta1 * m + (1 - beta1) * g                 v = beta2 * v + (1 - beta2) * g * g
//   w = w - lr * ((m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd * w)
//
//   adamw_kernel_bf16   w is the fp32 master; param (bf16) = stochastic_round(w)
//   adamw_kernel_fp32   param is fp32 and is itself w (no master copy)
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

struct Hyper {  // the scalars of one step, as the kernels receive them
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2, eps, wd, grad_scale;
};

// One element: updates m, v in place and returns the new weight. The bias corrections come as
// reciprocals (1 / (1 - beta^t), computed once in double on the host): a multiply, not a divide,
// within an ulp or so of the reference's division.
__device__ __forceinline__ float adamw_element(float grad, float& m, float& v, float w, const Hyper& h) {
    // grad_scale == 0 is a step the spike guard skipped: the gradient counts as zero even where it
    // holds NaN or Inf (0 * NaN is NaN), so m, v decay and weight decay applies as for a zero gradient
    const float g = h.grad_scale == 0.0f ? 0.0f : __fmul_rn(grad, h.grad_scale);
    m = __fmaf_rn(h.beta1, m, __fmul_rn(h.one_minus_beta1, g));
    v = __fmaf_rn(h.beta2, v, __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(v, h.inv_bc2)), h.eps);
    const float update = __fmaf_rn(h.wd, w, __fdiv_rn(__fmul_rn(m, h.inv_bc1), denom));
    return __fmaf_rn(-h.lr, update, w);
}

// The 32 random bits for one element: a hash of its absolute index, mixed with a hash of the step
// so that an element rounds independently from one step to the next. (hash_u32(0) = 0, hence the
// constant added to the step.)
__device__ __forceinline__ unsigned int rounding_bits(unsigned int step_mix, unsigned int seed, long long i) {
    return hash_u32(hash_u32(seed + (unsigned int)i) ^ step_mix);
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

// T = floatX: param is bf16 and `master` holds w. T = float: param holds w, master is unused.
template <class T>
__device__ __forceinline__ void adamw_impl(T* param, const T* grad, float* m, float* v, float* master,
                                           long long n, const Hyper& h, unsigned int seed, unsigned int step) {
    constexpr bool has_master = sizeof(T) == 2;
    float* w_ptr = has_master ? master : reinterpret_cast<float*>(param);
    const unsigned int step_mix = hash_u32(step + 0x9e3779b9U);
    const long long n8 = n / 8;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = first; k < n8; k += stride) {
        const long long at = k * 8;
        float g[8], mm[8], vv[8], w[8];
        load8(grad + at, g);
        load8(m + at, mm);
        load8(v + at, vv);
        load8(w_ptr + at, w);
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = adamw_element(g[j], mm[j], vv[j], w[j], h);
        store8(m + at, mm);
        store8(v + at, vv);
        store8(w_ptr + at, w);
        if constexpr (has_master) {
            x128 p;
#pragma unroll
            for (int j = 0; j < 8; j++) p[j] = stochastic_round_bf16(w[j], rounding_bits(step_mix, seed, at + j));
            store128cs(reinterpret_cast<floatX*>(param) + at, p);
        }
    }
    // the last n % 8 elements, one per thread (only the grid's first few threads have one)
    const long long i = n8 * 8 + first;
    if (i < n) {
        float mi = m[i], vi = v[i];
        float grad_i;
        if constexpr (has_master) grad_i = __bfloat162float(grad[i]);
        else grad_i = grad[i];
        const float wi = adamw_element(grad_i, mi, vi, w_ptr[i], h);
        m[i] = mi;
        v[i] = vi;
        w_ptr[i] = wi;
        if constexpr (has_master)
            reinterpret_cast<floatX*>(param)[i] = stochastic_round_bf16(wi, rounding_bits(step_mix, seed, i));
    }
}

#define ADAMW_ARGS                                                                                  \
    long long n, float lr, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, \
        float inv_bc1, float inv_bc2, float eps, float wd, float grad_scale,                        \
        const float* grad_scale_ptr, unsigned int seed, unsigned int step
// the clipping scale comes from the device when the optimizer computed it there (no host sync
// between the gradient norm and the update), else from the argument
#define ADAMW_HYPER {lr, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2, eps, wd, \
                     grad_scale_ptr ? *grad_scale_ptr : grad_scale}

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_kernel_bf16(floatX* param, const floatX* grad, float* m, float* v, float* master, ADAMW_ARGS) {
    const Hyper h = ADAMW_HYPER;
    adamw_impl<floatX>(param, grad, m, v, master, n, h, seed, step);
}

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
adamw_kernel_fp32(float* param, const float* grad, float* m, float* v, ADAMW_ARGS) {
    const Hyper h = ADAMW_HYPER;
    adamw_impl<float>(param, grad, m, v, nullptr, n, h, seed, step);
}
