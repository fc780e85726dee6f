"""The projections' bias gradients taken inside layernorm_backward (dproj_bias) against the
separate pass they replace (layernorm_backward, then bias_backward over the same (N, C) residual
gradient), at the training shapes: 124M B=64, 350M B=32, 1558M B=16 (T=1024).

Each variant is timed with CUDA events, median of 50 calls after 5 warm-up calls; the results
are checked against each other (dinp bitwise, dproj_bias within bf16 rounding).

    python3 benchmarks/layernorm_bias_bench.py [--shapes 65536:768 32768:1024 16384:1600] [--forms]

--forms then times the two phase-1 kernels against each other, each replayed from a CUDA graph
(no host launch cost in the figure): LayerNormGradients form "rows" (a warp per row, column sums
in shared memory) and "cols" (a thread per 8 channels, sums in registers, rows staged ahead by
cp.async), plain and with dproj_bias, and how far their dinp lie apart (their row sums add in
different orders). --cols-stages S compiles the cols kernel with S staged groups (COLS_STAGES).

--sweep times the cols kernel with dproj_bias (what 774M and 1558M run) at every launch setting
of a grid: rows a group (COLS_ROWS), staged groups (COLS_STAGES) and warps an SM
(COLS_WARPS_PER_SM), each compiled and replayed from a CUDA graph, its dinp checked bitwise
against the default setting's (the settings change which block sums which rows, not dinp).
"""
import argparse

import torch

from distgpt.backends.cuda.bias import BiasGradients
from distgpt.backends.cuda.layernorm import LayerNormGradients
from distgpt.backends.cuda.runtime import median_ms

WARMUP, REPEATS = 5, 50


def timed(fn):
    return 1000 * median_ms(fn, WARMUP, REPEATS)  # us


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["65536:768", "32768:1024", "16384:1600"], help="N:C")
    p.add_argument("--forms", action="store_true", help="also time the rows and cols phase-1 kernels")
    p.add_argument("--cols-stages", type=int, default=None, help="staged groups of the cols kernel")
    p.add_argument("--sweep", action="store_true", help="the cols kernel at a grid of launch settings")
    p.add_argument("--sweep-rows", nargs="+", type=int, default=[1, 2, 4], help="rows a group to sweep")
    p.add_argument("--sweep-stages", nargs="+", type=int, default=[2, 3, 4, 5, 6], help="staged groups to sweep")
    p.add_argument("--sweep-warps", nargs="+", type=int, default=[16, 28], help="warps an SM to sweep")
    a = p.parse_args()
    if a.sweep:
        sweep([tuple(int(v) for v in s.split(":")) for s in a.shapes], a.sweep_rows, a.sweep_stages, a.sweep_warps)
        return
    if a.cols_stages is not None:
        from distgpt.backends.cuda import layernorm as ln_module
        ln_module.COLS_STAGES = a.cols_stages
        ln_module.KERNELS = ln_module.KernelModule(
            "layernorm", **{**ln_module.KERNELS.constants, "LN_COLS_STAGES": a.cols_stages})
    shapes = [tuple(int(v) for v in s.split(":")) for s in a.shapes]
    max_c = max(c for _, c in shapes)
    bias = BiasGradients(max_c, "cuda")
    layernorm = LayerNormGradients(max_c, "cuda", bias)
    print("| N | C | layernorm_backward us | + bias_backward us | fused (dproj_bias) us | saved us | check |")
    print("|---|---|---|---|---|---|---|")
    for N, C in shapes:
        bf = dict(device="cuda", dtype=torch.bfloat16)
        inp, dout = torch.randn(N, C, **bf), torch.randn(N, C, **bf)
        weight = (1 + 0.1 * torch.randn(C, device="cuda")).to(torch.bfloat16)
        mean, rstd = inp.float().mean(-1), torch.rsqrt(inp.float().var(-1, unbiased=False) + 1e-5)
        dinp = torch.randn(N, C, **bf)
        dw, db, dp = (torch.zeros(C, **bf) for _ in range(3))
        ln_us = timed(lambda: layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd))
        sep_us = timed(lambda: (layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd),
                                bias.backward(dp, dinp)))
        fused_us = timed(lambda: layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd,
                                                              dproj_bias=dp))
        start = torch.randn(N, C, **bf)
        runs = []
        for fused in (False, True):
            di, p_ = start.clone(), torch.zeros(C, **bf)
            if fused:
                layernorm.backward(di, dw, db, dout, inp, weight, mean, rstd, dproj_bias=p_)
            else:
                layernorm.backward(di, dw, db, dout, inp, weight, mean, rstd)
                bias.backward(p_, di)
            runs.append((di, p_))
        same_dinp = torch.equal(runs[0][0], runs[1][0])
        rel = ((runs[0][1].float() - runs[1][1].float()).norm() / runs[0][1].float().norm()).item()
        print(f"| {N} | {C} | {ln_us:.1f} | {sep_us:.1f} | {fused_us:.1f} | {sep_us - fused_us:.1f} | "
              f"dinp {'bitwise' if same_dinp else 'DIFFERS'}, dproj_bias rel {rel:.1e} |", flush=True)
    if a.forms:
        compare_forms(shapes, layernorm)


def graphed_us(fn, calls=20, repeats=5):
    """Per-call GPU time of fn with no host in the way: `calls` calls captured in a CUDA graph,
    the replay timed with events, median of `repeats`."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1000 * start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def backward_operands(N, C):
    """Random inputs of one layernorm backward: inp, dout, the dinp to start from, weight, mean,
    rstd, and zeroed dweight, dbias, dproj_bias."""
    bf = dict(device="cuda", dtype=torch.bfloat16)
    inp, dout, start = torch.randn(N, C, **bf), torch.randn(N, C, **bf), torch.randn(N, C, **bf)
    weight = (1 + 0.1 * torch.randn(C, device="cuda")).to(torch.bfloat16)
    mean, rstd = inp.float().mean(-1), torch.rsqrt(inp.float().var(-1, unbiased=False) + 1e-5)
    return (inp, dout, start, weight, mean, rstd, *(torch.zeros(C, **bf) for _ in range(3)))


def compare_forms(shapes, layernorm):
    print("\n| N | C | rows us | cols us | rows + dproj_bias us | cols + dproj_bias us | dinp rows vs cols |")
    print("|---|---|---|---|---|---|---|")
    for N, C in shapes:
        inp, dout, start, weight, mean, rstd, dw, db, dp = backward_operands(N, C)
        times, results = [], []
        for form in ("rows", "cols"):
            layernorm.form = form
            dinp = start.clone()
            times.append((graphed_us(lambda: layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd)),
                          graphed_us(lambda: layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd,
                                                                dproj_bias=dp))))
            dinp = start.clone()
            layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd)
            results.append(dinp.float())
        layernorm.form = "auto"
        rel = ((results[0] - results[1]).abs() / results[0].abs().clamp_min(1e-3)).max().item()
        print(f"| {N} | {C} | {times[0][0]:.1f} | {times[1][0]:.1f} | {times[0][1]:.1f} | {times[1][1]:.1f} | "
              f"max rel {rel:.1e} |", flush=True)


def sweep(shapes, rows_grid, stages_grid, warps_grid):
    from distgpt.backends.cuda import layernorm as ln_module
    default = (ln_module.COLS_ROWS, ln_module.COLS_STAGES, ln_module.COLS_WARPS_PER_SM)
    constants = dict(ln_module.KERNELS.constants)
    print("| N | C | rows a group | stages | warps an SM | blocks | smem KB | cols + dproj_bias us | TB/s | "
          "+ amax (fp8) us | dinp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for N, C in shapes:
        inp, dout, start, weight, mean, rstd, dw, db, dp = backward_operands(N, C)
        amax = torch.zeros(1, device="cuda")  # the _amax twin's (fp8 runs)
        reference_dinp = None
        # the default first (the dinp the others are checked against); one compile per rows x stages
        settings = [default] + [(r, s, w) for r in rows_grid for s in stages_grid for w in warps_grid
                                if (r, s, w) != default]
        for rows, stages, warps_per_sm in settings:
            if (rows, stages) != (ln_module.COLS_ROWS, ln_module.COLS_STAGES) or reference_dinp is None:
                ln_module.KERNELS = ln_module.KernelModule(
                    "layernorm", **{**constants, "LN_COLS_ROWS": rows, "LN_COLS_STAGES": stages})
            ln_module.COLS_ROWS, ln_module.COLS_STAGES, ln_module.COLS_WARPS_PER_SM = rows, stages, warps_per_sm
            layernorm = LayerNormGradients(C, "cuda", BiasGradients(C, "cuda"), form="cols")
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            blocks = ln_module.cols_blocks(C, sms, layernorm.smem_per_sm) // sms
            if ln_module.cols_smem(C) + ln_module.SMEM_RESERVED > layernorm.smem_per_sm:
                continue
            dinp = start.clone()
            try:
                us = graphed_us(lambda: layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd, dproj_bias=dp))
                amax_us = graphed_us(lambda: layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd,
                                                                dproj_bias=dp, amax=amax))
            except Exception as exc:  # a setting that does not launch (registers, shared memory)
                print(f"| {N} | {C} | {rows} | {stages} | {warps_per_sm} | {blocks} | | failed: {exc} | | | |")
                continue
            dinp = start.clone()
            layernorm.backward(dinp, dw, db, dout, inp, weight, mean, rstd, dproj_bias=dp)
            reference_dinp = dinp if reference_dinp is None else reference_dinp
            same = "bitwise" if torch.equal(dinp, reference_dinp) else "DIFFERS"
            tbs = 4 * N * C * 2 / (us * 1e-6) / 1e12  # inp, dout, dinp read, dinp written
            mark = " (default)" if (rows, stages, warps_per_sm) == default else ""
            print(f"| {N} | {C} | {rows} | {stages} | {warps_per_sm}{mark} | {blocks} | "
                  f"{ln_module.cols_smem(C) / 1024:.0f} | {us:.1f} | {tbs:.2f} | {amax_us:.1f} | {same} |", flush=True)
    ln_module.COLS_ROWS, ln_module.COLS_STAGES, ln_module.COLS_WARPS_PER_SM = default


if __name__ == "__main__":
    main()
