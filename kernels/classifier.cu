// Softmax + cross-entropy over the vocabulary, fused with its backward:
//
//   fused_classifier   losses[row] = logsumexp(logits[row, :V]) - logits[row, target]   (overwrites)
//                      logits[row, c] = dloss * (softmax[c] - (c == target))  for c < V  (in place)
//                      logits[row, c] = 0                                     for V <= c < Vp
//
// One block per row of Vp bf16 logits (Vp a multiple of 8, so every row starts 16-byte aligned).
// Probabilities are never stored: the logits buffer becomes its own gradient.
//   pass 1  each thread walks vectors tid, tid + blockDim, ... of the first ceil(V/8) vectors
//           with an online max and sum of exp in fp32 (the sum is rescaled only when the running
//           max grows); the last real vector is masked at V, so the padding columns, whatever they
//           hold, never enter the sums. Block max, then the block sum of each thread's sum
//           rescaled to the block max: both through common.cuh's fixed-order reductions, so the
//           loss is bitwise reproducible.
//   pass 2  re-reads the row (most of it still in L2: a 100 KB row, a few blocks per SM) and
//           overwrites it with the gradient; padding vectors are written as zeros without a read.
// The target's logit is read by thread 0 before the first block reduction, whose barriers order
// it before any thread of the block overwrites the row in pass 2.
//
// dloss == 0 (validation) still runs pass 2 and leaves exact zeros (0 * finite), not logits: the
// buffer never holds stale values a later backward could mistake for a gradient.
// A target outside [0, V) (a bad batch) writes a NaN loss instead of reading out of bounds, so it
// shows in the logged loss; its row's gradient then carries no -1 term.
#include "common.cuh"

#define CLS_THREADS 512  // threads per row-block; 2 blocks per SM (ptxas: 64 registers, no spills)
#define CLS_UNROLL 4     // 16-byte loads each thread has in flight before it uses the first

__device__ __forceinline__ float bf(floatX x) { return __bfloat162float(x); }

extern "C" __global__ void __launch_bounds__(CLS_THREADS, 2)
fused_classifier_kernel(floatX* logits, float* losses, const long long* targets, int V, int Vp,
                        float dloss) {
    __shared__ float red[32];
    const long long row = blockIdx.x;
    floatX* x = logits + row * Vp;
    const long long t = targets[row];
    const bool valid_target = t >= 0 && t < V;
    const int target = valid_target ? (int)t : -1;
    float target_logit = 0.0f;
    if (threadIdx.x == 0 && valid_target) target_logit = bf(x[target]);

    // ---------------------------------------------------------------- pass 1: max and sum of exp
    const int nv = (V + 7) / 8;  // vectors holding at least one real column
    float m = -INFINITY, s = 0.0f;
    for (int base = threadIdx.x; base < nv; base += CLS_UNROLL * CLS_THREADS) {
        x128 buf[CLS_UNROLL];
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i < nv) buf[u] = load128(x + i * 8);
        }
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i >= nv) break;
            const int real = min(8, V - i * 8);  // 8 except in the last real vector
            float vmax = -INFINITY;
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (j < real) vmax = fmaxf(vmax, bf(buf[u][j]));
            if (vmax > m) {  // rescale the running sum to the new max (expf(-inf) = 0 at first)
                s *= expf(m - vmax);
                m = vmax;
            }
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (j < real) s += expf(bf(buf[u][j]) - m);
        }
    }
    const float row_max = block_max(m, red);
    // threads that saw no column have m = -inf, s = 0: they add exactly 0
    const float row_sum = block_sum(m == -INFINITY ? 0.0f : s * expf(m - row_max), red);
    if (threadIdx.x == 0)
        losses[row] = valid_target ? row_max + logf(row_sum) - target_logit : __int_as_float(0x7fc00000);

    // ---------------------------------------------------------------- pass 2: the gradient
    const float inv_sum = 1.0f / row_sum;
    const int nall = Vp / 8;
    for (int base = threadIdx.x; base < nall; base += CLS_UNROLL * CLS_THREADS) {
        x128 buf[CLS_UNROLL];
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i < nv) buf[u] = load128(x + i * 8);
        }
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i >= nall) break;
            x128 g = x128::zeros();
            if (i < nv) {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const int c = i * 8 + j;
                    if (c < V) {
                        const float p = expf(bf(buf[u][j]) - row_max) * inv_sum;
                        g[j] = __float2bfloat16_rn(dloss * (c == target ? p - 1.0f : p));
                    }
                }
            }
            store128(x + i * 8, g);
        }
    }
}
