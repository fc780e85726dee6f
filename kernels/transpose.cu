// Transpose of a bf16 row-major matrix: out (C, R) = inp (R, C)^T.
//
// What it is for: the fc projection's fused dGELU product, dinp = (dout @ W) * gelu'(pre), runs
// through cuBLASLt's DGELU epilogue, and at 350M (N = 32768, C = 1024) cuBLASLt serves the "NN"
// layout the stored W gives with an Ampere kernel (cutlass_80 ... dgelu, 771 us on an H200),
// while the same product from W's transpose ("TN") takes a Hopper kernel, 485 us
// (benchmarks/dgelu_layout_probe.py, 2026-12-05). So the backward may transpose W (C, 4C) into
// planned scratch first, a few microseconds, where that measures faster (matmul.py).
//
// One block moves a TILE x TILE tile through shared memory: it reads the tile's rows in bf16
// pairs (coalesced along C) and writes out's rows in bf16 pairs (coalesced along R). The tile's
// rows are padded by one element, so the column reads of the write phase fall on distinct banks.
// R and C must be even (pairs); partial tiles at the edges are bounds-checked.
#include "common.cuh"

// TRANSPOSE_TILE, TRANSPOSE_THREADS: from backends/cuda/transpose.py
#define PAIRS (TRANSPOSE_TILE / 2)                    // bf16 pairs along one tile row
#define ROWS_PER_PASS (TRANSPOSE_THREADS / PAIRS)     // tile rows a pass of the block covers

extern "C" __global__ void __launch_bounds__(TRANSPOSE_THREADS)
transpose_kernel(floatX* out, const floatX* inp, int R, int C) {
    __shared__ floatX tile[TRANSPOSE_TILE][TRANSPOSE_TILE + 1];
    const int r0 = blockIdx.y * TRANSPOSE_TILE, c0 = blockIdx.x * TRANSPOSE_TILE;
    const int pair = threadIdx.x % PAIRS, row = threadIdx.x / PAIRS;
    // read: tile[r][2 pair + k] = inp[r0 + r][c0 + 2 pair + k]
    for (int r = row; r < TRANSPOSE_TILE; r += ROWS_PER_PASS) {
        const int gr = r0 + r, gc = c0 + 2 * pair;
        if (gr < R && gc < C) {
            const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(inp + (long long)gr * C + gc);
            tile[r][2 * pair] = v.x;
            tile[r][2 * pair + 1] = v.y;
        }
    }
    __syncthreads();
    // write: out[c0 + c][r0 + 2 pair + k] = tile[2 pair + k][c]
    for (int c = row; c < TRANSPOSE_TILE; c += ROWS_PER_PASS) {
        const int gc = c0 + c, gr = r0 + 2 * pair;
        if (gc < C && gr < R) {
            __nv_bfloat162 v;
            v.x = tile[2 * pair][c];
            v.y = tile[2 * pair + 1][c];
            *reinterpret_cast<__nv_bfloat162*>(out + (long long)gc * R + gr) = v;
        }
    }
}
