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

// launch constants, defined once in backends/reference.py via backends/cuda/gelu.py
#ifndef GELU_SCALE
#error "GELU_SCALE comes from backends/reference.py via backends/cuda/gelu.py (compiled in as -DGELU_SCALE=...)"
#endif
#ifndef GELU_CUBIC
#error "GELU_CUBIC comes from backends/reference.py via backends/cuda/gelu.py (compiled in as -DGELU_CUBIC=...)"
#endif

extern "C" __global__ void gelu_forward_kernel(floatX* out, const floatX* inp, long long n8) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    const x128 x = load128(inp + i * 8);
    x128 o;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float v = __bfloat162float(x[j]);
        const float t = tanhf(GELU_SCALE * (v + GELU_CUBIC * v * v * v));
        o[j] = __float2bfloat16_rn(0.5f * v * (1.0f + t));
    }
    store128(out + i * 8, o);
}

// gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 * 0.044715 x^2),  t = tanh(u),
// u = s (x + 0.044715 x^3), written through sg = sigmoid(2u) = 1 / (1 + e), e = exp(-2u):
// 0.5 (1 + t) = sg and 1 - t^2 = 4 sg (1 - sg) = 4 e sg^2, so gelu'(x) = sg (1 + 2 x e sg s (..)).
// One exp and one reciprocal (the SFU's) instead of tanhf's longer sequence, and no cancellation
// in 1 + t or 1 - t^2 where t is near -1 or 1 (tanh.approx would lose them there). This kernel
// was bound by its arithmetic as much as by its bytes: 1558M B=16, (16384, 6400) in place,
// 206 us a call on an H200 with tanhf, 175 like this (2026-12-03). u is clamped below at -40, where e stays finite
// (e sg is then 1 to fp32 precision, not inf * 0) and gelu' is 0 to bf16's range anyway.
// for the 8 elements at i8 * 8; returns the abs_bits maximum of what it wrote
__device__ __forceinline__ unsigned int gelu_backward8(floatX* dinp, const floatX* inp, const floatX* dout,
                                                       long long i8) {
    const x128 x = load128(inp + i8 * 8);
    const x128 g = load128(dout + i8 * 8);
    x128 o;
    unsigned int local = 0u;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float v = __bfloat162float(x[j]);
        const float u = fmaxf(GELU_SCALE * (v + GELU_CUBIC * v * v * v), -40.0f);
        const float e = __expf(-2.0f * u);
        const float sg = __fdividef(1.0f, 1.0f + e);  // 1 + e < 2^126, where __fdividef is exact enough
        const float dinner = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * v * v);
        const float grad = sg * (1.0f + 2.0f * v * (e * sg) * dinner);
        o[j] = __float2bfloat16_rn(grad * __bfloat162float(g[j]));
        local = max(local, abs_bits(__bfloat162float(o[j])));
    }
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
