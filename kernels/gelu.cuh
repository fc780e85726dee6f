// GELU's derivative (tanh form), shared by gelu.cu's backward and fp8.cu's fused fp8 cast of
// the fc layer's output gradient, so both compute the same bits. Needs GELU_SCALE and
// GELU_CUBIC (-D defines from backends/reference.py).
//
// gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 * 0.044715 x^2),  t = tanh(u),
// u = s (x + 0.044715 x^3), written through sg = sigmoid(2u) = 1 / (1 + e), e = exp(-2u):
// 0.5 (1 + t) = sg and 1 - t^2 = 4 sg (1 - sg) = 4 e sg^2, so gelu'(x) = sg (1 + 2 x e sg s (..)).
// One exp and one reciprocal (the SFU's) instead of tanhf's longer sequence, and no cancellation
// in 1 + t or 1 - t^2 where t is near -1 or 1 (tanh.approx would lose them there). gelu.cu's
// backward was bound by its arithmetic as much as by its bytes: 1558M B=16, (16384, 6400) in
// place, 206 us a call on an H200 with tanhf, 175 like this (2026-12-03). u is clamped below at
// -40, where e stays finite (e sg is then 1 to fp32 precision, not inf * 0) and gelu' is 0 to
// bf16's range anyway.
#pragma once
#ifndef GELU_SCALE
#error "GELU_SCALE comes from backends/reference.py (compiled in as -DGELU_SCALE=...)"
#endif
#ifndef GELU_CUBIC
#error "GELU_CUBIC comes from backends/reference.py (compiled in as -DGELU_CUBIC=...)"
#endif

// exp(-2u) as __expf(-2.0f * u) computes it, (-2u) log2(e) through the SFU's 2^x, without the
// range fix-up __expf adds for results under 2^-126 (a compare and two multiplies an element):
// ex2.approx.ftz returns 0 there, and neither GELU form can tell 0 from such an e (1 + e and
// 1 + 2 x e sg s (..) are 1 in fp32 either way). u (-2 log2 e) is bitwise (-2u) log2 e: -2 is a
// power of two, so folding it into the constant changes no rounding.
__device__ __forceinline__ float exp_minus_2u(float u) {
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(u * (-2.0f * 1.4426950408889634f)));
    return e;
}

// gelu'(v) * g in fp32, before its rounding to bf16
__device__ __forceinline__ float gelu_backward_product(float v, float g) {
    const float u = fmaxf(GELU_SCALE * (v + GELU_CUBIC * v * v * v), -40.0f);
    const float e = exp_minus_2u(u);
    const float sg = __fdividef(1.0f, 1.0f + e);  // 1 + e < 2^126, where __fdividef is exact enough
    const float dinner = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * v * v);
    const float grad = sg * (1.0f + 2.0f * v * (e * sg) * dinner);
    return grad * g;
}

// gelu'(pre) * g for 8 elements, each rounded once to bf16: the values gelu_backward writes
// (to_bf16x8 rounds them in pairs)
__device__ __forceinline__ x128 gelu_backward_x128(const x128& pre, const x128& g) {
    float d[8];
#pragma unroll
    for (int j = 0; j < 8; j++) d[j] = gelu_backward_product(__bfloat162float(pre[j]), __bfloat162float(g[j]));
    return to_bf16x8(d);
}
