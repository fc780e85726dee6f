// Softmax + cross-entropy over the vocabulary, fused with its backward:
//
//   fused_classifier   losses[row] = logsumexp(logits[row, :V]) - logits[row, target]   (overwrites)
//                      logits[row, c] = dloss * (softmax[c] - (c == target))  for c < V  (in place)
//                      logits[row, c] = 0                                     for V <= c < Vp
//
// One block per row of Vp bf16 logits (Vp a multiple of 8, so every row starts 16-byte aligned).
// Probabilities are never stored: the logits buffer becomes its own gradient. Two kernels with
// the same arithmetic; classifier.py picks one per call:
//
//   fused_classifier_smem_kernel   copies the row's real vectors (ceil(V/8) x 16 bytes: 100,528
//       bytes for GPT-2's V = 50257) once into dynamic shared memory and computes the gradient
//       from there: 1 read + 1 write of the row. Used whenever the row fits the device's opt-in
//       shared memory per block (H100 227 KB, A100 163 KB). Two blocks fit on an H100 SM
//       (2 x ~101.7 KB of 228 KB), so one block's reductions and arithmetic overlap the other's
//       memory traffic. The copy is cp.async (global -> shared without registers, L2 only) with
//       CLS_STAGES vectors in flight per thread; each thread waits only for its next vector, so
//       pass 1 starts on the first bytes while the rest of the row is still arriving.
//   fused_classifier_kernel   the fallback for rows that do not fit: reads the row twice (pass 2
//       re-reads it, partly from L2) and writes it once.
//
// Both kernels, per row:
//   pass 1  each thread walks vectors tid, tid + CLS_THREADS, ... of the first ceil(V/8) vectors
//           with an online max and sum of exp in fp32 (the sum is rescaled only when the running
//           max grows). Block max, then the block sum of each thread's sum rescaled to the block
//           max: both through common.cuh's fixed-order reductions, so the loss is bitwise
//           reproducible.
//   pass 2  overwrites the row with dloss * softmax, vector i by the thread that read it in
//           pass 1; padding vectors are written as zeros without a read. After a barrier, thread 0
//           rewrites the target's column as dloss * (p - 1).
// The hot loops see only whole real vectors and no target: the last real vector when V % 8 != 0
// (its padding columns masked: -inf into the sums, exact zeros out) is done by its thread after
// the loop, as that thread's last vector, and the target's -1 by thread 0 at the end. With the
// masks and the target test inside the loops (as before 2026-11-22) the sm_90 SASS ran ~190 + ~200
// instructions per vector in passes 1 + 2, 2 x 64 of them the exps: at 1.65 GB per launch that
// is as long to issue as to move. Out of the loops: ~118 + ~107. Same arithmetic on the same
// values either way: the same bits.
// The exps of the hot loops are __expf (ex2.approx of x * log2(e): 3 instructions where expf
// takes ~9 for its range reduction; its relative error of a few fp32 ulps is far under the bf16
// rounding of the gradient, and moves the loss by ~1e-7). With expf the one-pass kernel was
// still issue-bound: 645 us a launch at 124M B=64 on an H200 (2.6 TB/s), 430 us with __expf
// (3.8 TB/s, near the card's copy bandwidth); 124M B=64 step 106.5 -> 104.9 ms (2026-12-03,
// `distgpt bench --model gpt2_124m --batch 64 --profile`, alternated twice in one call). The
// rare rescales (a thread's running max grows, the block's merge) keep expf.
// Same thread count, same vectors per thread in the same order, and the arithmetic in shared
// __forceinline__ functions: the two kernels give the same losses and gradients to the bit
// (tests/test_cuda_optim.py checks it).
//
// The target's logit is read by thread 0 before the first block reduction, whose barriers order
// it before any thread of the block overwrites the row in pass 2.
// dloss == 0 (validation) still runs pass 2 and leaves exact zeros (0 * finite), not logits: the
// buffer never holds stale values a later backward could mistake for a gradient.
// A target outside [0, V) (a bad batch) writes a NaN loss instead of reading out of bounds, so it
// shows in the logged loss; its row's gradient then carries no -1 term.
//
// Traffic at 124M, B = 64 (8 launches of 8192 rows x Vp = 50304): the two-pass kernel moves
// 3 x 824 MB per launch, measured 932 us on an H100 (2.65 TB/s, 2026-11-22); the shared-memory
// kernel moves 824 MB read + 824 MB written: ~620 us predicted at the same bandwidth.
#include "common.cuh"

// launch constants, defined once in backends/cuda/classifier.py
#ifndef CLS_THREADS
#error "CLS_THREADS comes from backends/cuda/classifier.py (compiled in as -DCLS_THREADS=...)"
#endif
#define CLS_UNROLL 4     // 16-byte reads a thread has in flight before it uses the first
#define CLS_STAGES 8     // smem kernel: cp.async vectors in flight per thread (64 KB per block)

__device__ __forceinline__ float bf(floatX x) { return __bfloat162float(x); }

// ---------------------------------------------------------------- the arithmetic both kernels share
// A whole vector of 8 logits into a thread's online max m and sum s of exp(x - m).
__device__ __forceinline__ void online_add(float& m, float& s, const x128& v) {
    float vmax = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; j++) vmax = fmaxf(vmax, bf(v[j]));
    if (vmax > m) {  // rescale the running sum to the new max (expf(-inf) = 0 at first)
        s *= expf(m - vmax);
        m = vmax;
    }
#pragma unroll
    for (int j = 0; j < 8; j++) s += __expf(bf(v[j]) - m);
}

// The last real vector, `real` < 8 of its columns inside the vocabulary: the padding columns,
// whatever they hold, become -inf, which leaves the max alone and adds exp(-inf) = +0 exactly.
__device__ __forceinline__ x128 mask_padding(x128 v, int real) {
#pragma unroll
    for (int j = 0; j < 8; j++)
        if (j >= real) v[j] = __float2bfloat16_rn(-INFINITY);
    return v;
}

// Block max and sum of exp from every thread's (m, s); thread 0 writes the row's loss. Returns
// (row max, 1 / row sum) in every thread.
__device__ __forceinline__ float2 finish_row(float m, float s, float target_logit, bool valid_target,
                                             float* loss, float* red) {
    const float row_max = block_max(m, red);
    // threads that saw no column have m = -inf, s = 0: they add exactly 0
    const float row_sum = block_sum(m == -INFINITY ? 0.0f : s * expf(m - row_max), red);
    if (threadIdx.x == 0)
        *loss = valid_target ? row_max + logf(row_sum) - target_logit : __int_as_float(0x7fc00000);
    return make_float2(row_max, 1.0f / row_sum);
}

// softmax of one logit; __fmul_rn so that p - 1 at the target cannot be contracted into an fma
__device__ __forceinline__ float softmax(float logit, float2 stats) {
    return __fmul_rn(__expf(logit - stats.x), stats.y);
}

// dloss * softmax for a vector of logits (the target's -1 comes later, see fix_target)
__device__ __forceinline__ x128 grad_vector(const x128& v, float2 stats, float dloss) {
    x128 g;
#pragma unroll
    for (int j = 0; j < 8; j++) g[j] = __float2bfloat16_rn(dloss * softmax(bf(v[j]), stats));
    return g;
}

// The last real vector: its gradient with the padding columns exactly 0.
__device__ __forceinline__ x128 grad_partial(const x128& v, int real, float2 stats, float dloss) {
    x128 g = grad_vector(v, stats, dloss);
#pragma unroll
    for (int j = 0; j < 8; j++)
        if (j >= real) g[j] = __float2bfloat16_rn(0.0f);
    return g;
}

// After every thread's pass 2 (a barrier): thread 0 rewrites the target's column with the -1
// term, from the target's logit it read before the row was overwritten.
__device__ __forceinline__ void fix_target(floatX* x, int target, float target_logit, float2 stats,
                                           float dloss) {
    __syncthreads();
    if (threadIdx.x == 0 && target >= 0)
        x[target] = __float2bfloat16_rn(dloss * (softmax(target_logit, stats) - 1.0f));
}

// What both kernels know of their row (block) before pass 1: where it is, its target (-1 when
// outside [0, V)) and, in thread 0, the target's logit, read before any thread overwrites the
// row; the counts of whole real, real and all vectors; whether this thread owns the partial last
// vector (V % 8 != 0), as its last.
struct Row {
    floatX* x;
    int target, nfull, nv, nall;
    bool valid_target, owns_partial;
    float target_logit;
};
__device__ __forceinline__ Row row_setup(floatX* logits, const long long* targets, int V, int Vp) {
    Row r;
    r.x = logits + (long long)blockIdx.x * Vp;
    const long long t = targets[blockIdx.x];
    r.valid_target = t >= 0 && t < V;
    r.target = r.valid_target ? (int)t : -1;
    r.target_logit = threadIdx.x == 0 && r.valid_target ? bf(r.x[r.target]) : 0.0f;
    r.nfull = V / 8, r.nv = (V + 7) / 8, r.nall = Vp / 8;
    r.owns_partial = r.nfull < r.nv && threadIdx.x == r.nfull % CLS_THREADS;
    return r;
}

// ---------------------------------------------------------------- one pass: the row in shared memory
// Dynamic shared memory: ceil(V/8) x128 (classifier.py passes the size). Thread tid copies, reads
// in pass 1 and reads again in pass 2 only its own vectors tid + k * CLS_THREADS, so its own
// cp.async wait is all the ordering it needs: no barrier besides the reductions'.
extern "C" __global__ void __launch_bounds__(CLS_THREADS, 2)
fused_classifier_smem_kernel(floatX* logits, float* losses, const long long* targets, int V, int Vp,
                             float dloss) {
    extern __shared__ x128 row_smem[];
    __shared__ float red[32];
    const Row r = row_setup(logits, targets, V, Vp);
    floatX* x = r.x;
    const int target = r.target, nfull = r.nfull, nv = r.nv, nall = r.nall;

    // ---------------------------------------------------------------- pass 1: copy, max and sum of exp
    // A group is committed for every stage, empty past the row's end, so that "at most
    // CLS_STAGES - 1 in flight" always means "the vector k stages back has landed".
#pragma unroll
    for (int k = 0; k < CLS_STAGES; k++) {
        const int i = threadIdx.x + k * CLS_THREADS;
        if (i < nv) cp_async16(row_smem + i, x + i * 8);
        cp_async_commit();
    }
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x; i < nfull; i += CLS_THREADS) {
        cp_async_wait<CLS_STAGES - 1>();
        const x128 v = row_smem[i];
        const int next = i + CLS_STAGES * CLS_THREADS;
        if (next < nv) cp_async16(row_smem + next, x + next * 8);
        cp_async_commit();
        online_add(m, s, v);
    }
    if (r.owns_partial) {  // the partial vector nfull is this thread's last
        cp_async_wait<0>();
        online_add(m, s, mask_padding(row_smem[nfull], V - nfull * 8));
    }
    const float2 stats = finish_row(m, s, r.target_logit, r.valid_target, losses + blockIdx.x, red);

    // ---------------------------------------------------------------- pass 2: the gradient
    for (int base = threadIdx.x; base < nall; base += CLS_UNROLL * CLS_THREADS) {
        x128 buf[CLS_UNROLL];
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i < nfull) buf[u] = row_smem[i];
        }
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i >= nall) break;
            if (i < nfull) store128(x + i * 8, grad_vector(buf[u], stats, dloss));
            else if (i >= nv) store128(x + i * 8, x128::zeros());
        }
    }
    if (r.owns_partial)
        store128(x + nfull * 8, grad_partial(row_smem[nfull], V - nfull * 8, stats, dloss));
    fix_target(x, target, r.target_logit, stats, dloss);
}

// ---------------------------------------------------------------- two passes over global memory
extern "C" __global__ void __launch_bounds__(CLS_THREADS, 2)
fused_classifier_kernel(floatX* logits, float* losses, const long long* targets, int V, int Vp,
                        float dloss) {
    __shared__ float red[32];
    const Row r = row_setup(logits, targets, V, Vp);
    floatX* x = r.x;
    const int target = r.target, nfull = r.nfull, nv = r.nv, nall = r.nall;

    // ---------------------------------------------------------------- pass 1: max and sum of exp
    float m = -INFINITY, s = 0.0f;
    for (int base = threadIdx.x; base < nfull; base += CLS_UNROLL * CLS_THREADS) {
        x128 buf[CLS_UNROLL];
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i < nfull) buf[u] = load128(x + i * 8);
        }
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            if (base + u * CLS_THREADS >= nfull) break;
            online_add(m, s, buf[u]);
        }
    }
    x128 partial;
    if (r.owns_partial) {  // the partial vector nfull is this thread's last
        partial = load128(x + nfull * 8);
        online_add(m, s, mask_padding(partial, V - nfull * 8));
    }
    const float2 stats = finish_row(m, s, r.target_logit, r.valid_target, losses + blockIdx.x, red);

    // ---------------------------------------------------------------- pass 2: the gradient
    // re-reads the row (part of it still in L2: a 100 KB row, 2 blocks per SM)
    for (int base = threadIdx.x; base < nall; base += CLS_UNROLL * CLS_THREADS) {
        x128 buf[CLS_UNROLL];
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i < nfull) buf[u] = load128(x + i * 8);
        }
#pragma unroll
        for (int u = 0; u < CLS_UNROLL; u++) {
            const int i = base + u * CLS_THREADS;
            if (i >= nall) break;
            if (i < nfull) store128(x + i * 8, grad_vector(buf[u], stats, dloss));
            else if (i >= nv) store128(x + i * 8, x128::zeros());
        }
    }
    if (r.owns_partial) store128(x + nfull * 8, grad_partial(partial, V - nfull * 8, stats, dloss));
    fix_target(x, target, r.target_logit, stats, dloss);
}
