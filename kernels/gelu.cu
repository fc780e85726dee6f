// GELU, tanh form (GPT-2's): forward and backward side by side, 8 elements per thread through
// 16-byte loads and stores, fp32 arithmetic.
//
//   forward   out  = 0.5 x (1 + tanh(s (x + 0.044715 x^3))),  s = sqrt(2 / pi)      (overwrites)
//   backward  dinp = gelu'(x) * dout                                                 (overwrites)
//             (gelu_backward_amax: and amax = max(amax, max |dinp|), for the fp8 cast that follows)
//
// gelu_backward may run in place (dinp == dout, as the model does for the 4C buffer): each
// thread reads its 8 elements of inp and dout before it writes the same 8 of dinp, and no
// pointer is __restrict__, so the compiler cannot reorder across the alias.
#include "common.cuh"
#include "gelu.cuh"

// GELU_SCALE and GELU_CUBIC: defined once in backends/reference.py, via backends/cuda/gelu.py

// 0.5 x (1 + tanh(u)) = x sigmoid(2u) = x / (1 + e), e = exp(-2u): one exp and one division
// (the SFU's), as the backward below, instead of tanhf's longer sequence. With tanhf this
// kernel was bound by its arithmetic: 1558M B=16, (16384, 6400), 142.8 us a call on an H200 (2.9
// TB/s), 107.4 like this (3.9 TB/s; two H200s the same day, 2026-12-03, `distgpt bench --model
// gpt2_1558m --batch 16 --recompute 1 --profile`: it rebuilds the GELU output in each layer's
// backward under train.recompute >= 1, 6.9 -> 5.2 ms a step). u is
// clamped below at -40: e stays finite and x / (1 + e) is then 0 to bf16's range (__fdividef
// returns 0 only for a denominator past 2^126, and 1 + e^80 is under it).
extern "C" __global__ void gelu_forward_kernel(floatX* out, const floatX* inp, long long n8) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    const x128 x = load128(inp + i * 8);
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float v = __bfloat162float(x[j]);
        const float u = fmaxf(GELU_SCALE * (v + GELU_CUBIC * v * v * v), -40.0f);
        o[j] = __fdividef(v, 1.0f + exp_minus_2u(u));
    }
    store128(out + i * 8, to_bf16x8(o));
}

// gelu'(x) through sigmoid(2u): see gelu.cuh (shared with fp8.cu's fused cast)
// for the 8 elements at i8 * 8; returns the abs_bits maximum of what it wrote
__device__ __forceinline__ unsigned int gelu_backward8(floatX* dinp, const floatX* inp, const floatX* dout,
                                                       long long i8) {
    const x128 x = load128(inp + i8 * 8);
    const x128 g = load128(dout + i8 * 8);
    const x128 o = gelu_backward_x128(x, g);
    unsigned int local = 0u;
#pragma unroll
    for (int j = 0; j < 8; j++) local = max(local, abs_bits(__bfloat162float(o[j])));
    store128(dinp + i8 * 8, o);
    return local;
}

extern "C" __global__ void gelu_backward_kernel(floatX* dinp, const floatX* inp, const floatX* dout, long long n8) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n8) gelu_backward8(dinp, inp, dout, i);
}

// The same, also merging max |dinp| into amax (fp8=true: the gradient fc's backward casts next,
// so its cast needs no amax pass of its own): the plain kernel's grid, one merge per block.
// H100, (16384, 6400), separate buffers: 258.4 us against 254.3 for the plain kernel; a
// grid-stride loop over a few blocks per SM instead ran 245 us in the step against 221 (too few
// loads in flight).
extern "C" __global__ void gelu_backward_amax_kernel(floatX* dinp, const floatX* inp, const floatX* dout,
                                                     float* amax, long long n8) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    block_merge_amax(amax, i < n8 ? gelu_backward8(dinp, inp, dout, i) : 0u);
}
