"""Matmuls through cuBLASLt with fused epilogues, called through nvmath-python's cuBLASLt bindings
into buffers we own.

Why cuBLASLt directly: it reaches 680-707 TFLOP/s on the H100's GPT-2 shapes, and its epilogues
do in the matmul what would otherwise be separate passes over the (B, T, 4C) activations:
- fc forward (GELU_AUX_BIAS): out = inp @ W^T + b written as the pre-activation (the backward
  needs it) and gelu(out) in the same kernel;
- fc projection backward (DGELU): dinp = (dout @ W) * gelu'(pre-activation);
- the attention and fc projections (BIAS with beta = 1 and C = the residual stream, another
  buffer than D): out = inp @ W^T + b + residual, so the next layernorm reads the sum alone
  (1558M B=16: layernorm forwards 22.1 -> 18.9 ms a step, about 1 ms of it back in the two
  products' reads of C; H100, 2026-11-23).
The bias gradients come from our column-sum kernel (bias.cu), from inside layernorm_backward, or,
at the narrower widths (124M, 350M), from the weight-gradient product itself: over the
layernorm output with a column of ones beside it, the product's row C is the column sums
(weight_grad_bias_column; layout.ONES_PAD says why the column is there, and the backend's
takes_bias_column where it pays). cuBLASLt's BGRADB epilogue runs as a separate
reduction kernel that took 5.6 ms a step at 124M B=64 against our 4.0 (H100, 2026-11-22), and it
cannot write fp32 beside bf16 operands; its DGELU_BGRAD (the fc bias gradient with the dGELU
product) took 1776 us against 633 + 160 for
DGELU and our kernel at N = 65536, C = 768, and 1580 against 742 + 123 at N = 32768, C = 1024
(benchmarks/matmul_epilogue_probe.py, H100, 2026-11-22). Timing every one of the heuristic's
answers does not change that (H100, 2026-11-23): DGELU_BGRAD 1796 us against 613 + 178, and the
weight-gradient product with BGRADB at best 613 us against 430 + 163 for the plain product and
our kernel (fc at N = 65536, C = 768; 647 against 454 + 110 at N = 16384, C = 1600).

The DGELU epilogue's kernel is the heuristic's, and at some shapes that is an Ampere kernel: at
350M (N = 32768, 4C = 4096) cuBLASLt picks cutlass_80_..._dgelu at 855 us a call, while the
plain product (a Hopper kernel) and our gelu_backward take about 680 together. The same product
from W's transpose (the "TN" layout, the fc forward's) gets a Hopper kernel there: 485 us against
771 for the stored layout on an H200, plus a transpose of W (C, 4C) into planned scratch
(kernels/transpose.cu); at 124M and 1558M the stored layout is as fast or faster
(benchmarks/dgelu_layout_probe.py, 2026-12-05; timed by `auto` on an H100 that evening: 612
against 643 us at 124M B=64, 574-609 against 649-707 at 1558M B=16). So unless the run is deterministic, the first
call at each shape times the three forms in turns, the epilogue on the stored W ("fused"), on its
transpose ("transposed") and the plain product + gelu_backward ("split"), and keeps the fastest
(`dgelu`: "auto"; another form replaces "fused" only under SPLIT_MARGIN of its time; `distgpt
bench` prints the timings and the choice, `--dgelu FORM` or the config's matmul_dgelu pins one); a
deterministic run always takes "fused", so that every run computes the same bits (the split form
rounds the product to bf16 before the GELU derivative; the transposed one may sum in another order).
torch.mm/addmm reach neither from Python, and nvmath's high-level Matmul allocates its
auxiliary outputs on every call, hence the bindings.

Row-major to column-major: cuBLASLt is column-major, and a row-major (R, K) matrix is the same
memory as a column-major (K, R) one. So every product below is written transposed:
    out (N, OC) = inp (N, C) @ W (OC, C)^T   is   out^T (OC, N) = W^T @ inp^T
with M = OC, so a bias along OC is cuBLASLt's bias along M.

A plan (descriptor, layouts, the heuristic's first CANDIDATES answers) is made once per shape,
epilogue and pointer alignment, and reused for every layer; the per-call work is setting the
epilogue's pointers and one cublasLtMatmul on torch's current stream, with one workspace planned
up front. Nothing is allocated on the GPU in the step, so a step can be captured in a CUDA graph.

Which answer runs: the heuristic's first is not the fastest at many of GPT-2's shapes. Timed one
by one on an H100 (benchmarks/matmul_algo_probe.py, 2026-11-23), the best of its first eight
answers took 24% less for 124M's qkv input gradient (430 -> 325 us), 9% less for 1558M's fused
dGELU product (613 -> 560 us); over a step's products, 78.3 -> 73.1 ms at 124M B=64 and 241.0 ->
234.6 ms at 1558M B=16. So unless the run is deterministic (`tune`), the first call of each plan
times its candidates on the call's own operands and keeps the fastest (when it beats the first
answer by TUNE_MARGIN). A product that accumulates (beta = 1, the weight gradients) has its
output saved to host memory before the timing and put back after it. The answers are timed
alone, each call after an idle GPU: timed instead in 20 ms bursts at the card's power cap
(`matmul_algo_probe.py --sustained 20`), 1558M's answers rank otherwise (the probe's sum: 8.9 ms
a step), but a tuner choosing by those times gave no faster step (H100, 2026-12-06, alternated:
320.8 and 318.2 ms timed alone, 320.4 and 321.3 in bursts), so the isolated timing stays.

Deterministic: a fixed algorithm per plan (the first answer when deterministic: a timed choice
could differ between two runs) and no atomics in cuBLASLt's reductions."""
import numpy as np
import torch

from distgpt.backends.cuda.bias import split_bias_column
from distgpt.backends.cuda.gelu import gelu_backward
from distgpt.backends.cuda.runtime import check_tensor, interleaved_median_ms, median_ms, row_stride
from distgpt.backends.cuda.transpose import transpose
from distgpt.config import DGELU_FORMS

# cuBLASLt enum values (cublasLt.h / library_types.h): stable parts of the C ABI
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUDA_R_8F_E4M3, CUDA_R_8F_E5M2 = 28, 29
FP8_TYPES = {torch.float8_e4m3fn: CUDA_R_8F_E4M3, torch.float8_e5m2: CUDA_R_8F_E5M2}
COMPUTE_32F = 68
OP_N, OP_T = 0, 1
WORKSPACE_BYTES = 32 * 2**20  # what NVIDIA recommends for Hopper's cuBLASLt kernels
MAX_ALIGN = 256
SPLIT_MARGIN = 0.85  # another dGELU form must time under 85% of the epilogue's on the stored W to be
#                    chosen. At 0.95 an H100 took the split form at 1558M in both runs of one call
#                    (2026-12-05; its 1558M step 320.5 ms); with the forms pinned on another H100 the
#                    split form's step took 326.8 and 324.9 ms against the epilogue's 317.5 and 321.0,
#                    where timed alone split ran 1.15x the epilogue's time. The forms that pay lead by
#                    far: at 350M transposed times 0.65x the epilogue (step 154.1 against 161.4 ms)
TIMING_REPEATS = 5
TIMING_ROUNDS = 3  # the dGELU forms are timed in turns, this many rounds (runtime.interleaved_median_ms)
CANDIDATES = 8  # the heuristic's answers a plan keeps, to time when tuning; asked for 32, it gave
#                at most 8 at every product of 124M, 350M and 1558M (H100, 2026-12-05,
#                benchmarks/matmul_algo_probe.py --candidates 32), so more would time nothing new
TUNE_MARGIN = 0.98  # another answer replaces the first only when it times under 98% of it
TUNE_REPEATS = 10
VALIDATE_ELEMENTS = 1 << 22  # the elements of a candidate's result compared with the first answer's



def _bindings():
    try:
        from nvmath.bindings import cublasLt
    except ImportError as exc:
        raise RuntimeError(f"backend=cuda needs nvmath-python for cuBLASLt ({exc}); pip install the "
                           f"cuda12 or cuda13 extra") from None
    return cublasLt


def _agrees(got, want, ulp=2.0 ** -7):
    """Two bf16 results of the same product by different algorithms: each element within one bf16
    ulp (2^-7 relative) of the other's, or within 2^-10 of the result's rms where it cancels.
    An fp8 result (the fc matmul's GELU output in e4m3) passes ulp=2^-3, one e4m3 ulp: a sum a
    little different can round to the neighbouring fp8 value.
    That is all a different summation order (fp32 sums, one bf16 rounding) moves a result, and it
    sits inside the tests' budget against the fp32 reference (rtol 1e-2, atol 2e-3 at O(1)
    results); two ulps and 2^-6 of the rms let a less exact dGELU kernel through, which then
    failed that budget (N = 512, C = 768, OC = 2304 on an H100, 2026-11-23)."""
    finite = torch.isfinite(want)
    if not torch.isfinite(got).equal(finite):
        return False
    # the same infinities and NaN where NaN (nan_to_num: NaN -> 0, +-inf -> +-the largest float)
    if not torch.equal(got[~finite].nan_to_num(0.0), want[~finite].nan_to_num(0.0)):
        return False
    got, want = got[finite], want[finite]
    if want.numel() == 0:
        return True
    rms = want.square().mean().sqrt()
    return bool(((got - want).abs() <= ulp * want.abs() + 2.0 ** -10 * rms).all())


def _alignment(t):
    p = t.data_ptr()
    return MAX_ALIGN if p % MAX_ALIGN == 0 else p & -p


class _Plan:
    """One cuBLASLt problem: descriptor, the four layouts and the chosen algorithm."""

    def __init__(self, lt, handle, workspace_bytes, key, pointers, attributes=(), types=(CUDA_R_16BF, CUDA_R_16BF),
                 candidates=None):
        """attributes: further (MatmulDescAttribute, numpy scalar) pairs set before the heuristic;
        types: the data types of A and B (bf16, or fp8 with their scale pointers set), and of D
        when a third is given (bf16 otherwise; C has D's type, but stays bf16 under an fp8 D,
        which takes a bf16 C in cuBLASLt's table of fp8 products; an fp32 D over bf16 operands
        is the bias-column product's); candidates: how many of the heuristic's answers to keep (the first
        is the default algorithm)."""
        (epilogue, transa, transb, m, n, k, lda, ldb, ldd, aux_ld, aligns) = key
        candidates = CANDIDATES if candidates is None else candidates  # read at plan time (probes change it)
        self.lt = lt
        self._pointer = np.zeros(1, dtype=np.uint64)
        A = lt.MatmulDescAttribute
        self.desc = lt.matmul_desc_create(COMPUTE_32F, CUDA_R_32F)
        self._set(A.TRANSA, np.int32(transa))
        self._set(A.TRANSB, np.int32(transb))
        self._set(A.EPILOGUE, np.uint32(epilogue))
        if aux_ld:
            self._set(A.EPILOGUE_AUX_LD, np.int64(aux_ld))
        for attr, value in attributes:
            self._set(attr, value)
        # cuBLASLt checks the epilogue's inputs when it picks an algorithm: point them at real
        # buffers (each call re-points them at its own)
        for attr, tensor in pointers.items():
            self.set_pointer(attr, tensor)
        rows_a, cols_a = (m, k) if transa == OP_N else (k, m)
        rows_b, cols_b = (k, n) if transb == OP_N else (n, k)
        self.a = lt.matrix_layout_create(types[0], rows_a, cols_a, lda)
        self.b = lt.matrix_layout_create(types[1], rows_b, cols_b, ldb)
        # C is D's type, except under an fp8 D, which takes a bf16 C in cuBLASLt's table
        d_type = CUDA_R_16BF if len(types) < 3 else types[2]
        c_type = CUDA_R_16BF if d_type in FP8_TYPES.values() else d_type
        self.c = lt.matrix_layout_create(c_type, m, n, ldd)
        self.d = self.c if c_type == d_type else lt.matrix_layout_create(d_type, m, n, ldd)
        pref = lt.matmul_preference_create()
        P = lt.MatmulPreferenceAttribute
        self._set_pref(pref, P.MAX_WORKSPACE_BYTES, np.uint64(workspace_bytes))
        for attr, value in zip((P.MIN_ALIGNMENT_A_BYTES, P.MIN_ALIGNMENT_B_BYTES,
                                P.MIN_ALIGNMENT_C_BYTES, P.MIN_ALIGNMENT_D_BYTES), aligns):
            self._set_pref(pref, attr, np.uint32(value))
        self.heuristic = lt.MatmulHeuristicResult(candidates)
        found = np.zeros(1, dtype=np.int32)
        lt.matmul_algo_get_heuristic(handle, self.desc, self.a, self.b, self.c, self.d, pref, candidates,
                                     self.heuristic.ptr, found.ctypes.data)
        lt.matmul_preference_destroy(pref)
        if found[0] == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for epilogue {epilogue}, m={m} n={n} k={k}, "
                               f"alignments {aligns}")
        self.candidates = int(found[0])
        self.choice = None  # the timed answer's index, once tuned

    def algorithm(self, index):
        """A pointer to the index-th answer's algorithm (the struct's first member)."""
        return self.heuristic.ptr + index * self.lt.matmul_heuristic_result_dtype.itemsize

    def _set(self, attr, value):
        value = np.array(value)  # a 0-d array: its buffer is what the C call reads
        self.lt.matmul_desc_set_attribute(self.desc, attr, value.ctypes.data, value.nbytes)

    def _set_pref(self, pref, attr, value):
        value = np.array(value)
        self.lt.matmul_preference_set_attribute(pref, attr, value.ctypes.data, value.nbytes)

    def set_pointer(self, attr, tensor):
        self._pointer[0] = tensor.data_ptr()
        self.lt.matmul_desc_set_attribute(self.desc, attr, self._pointer.ctypes.data, 8)


def dgelu_line(choice):
    """One line on a dGELU choice of Matmuls.dgelu_report(), as bench and the trainer print it."""
    timed = ", ".join(f"{form} {us:.0f} us" for form, us in choice["us"].items())
    return (f"dGELU product ({choice['rows']} x {choice['cols']} from {choice['inner']}): {choice['form']} "
            f"(timed: {timed})")


class Matmuls:
    """The cuBLASLt handle, the workspace and the plan cache; bias gradients go to the
    BiasGradients (column-sum kernels) it is given."""

    def __init__(self, bias_gradients=None, dgelu="auto", tune=True):
        self.bias_gradients = bias_gradients
        self.dgelu = dgelu  # "auto": time the forms once per shape; "fused" | "transposed" | "split": always that
        self.tune = tune  # time each plan's candidate algorithms on its first call (False: the first answer)
        self.dgelu_choice = {}  # plan key -> "fused" | "transposed" | "split", what "auto" measured
        self.dgelu_times = {}  # plan key -> {form: ms}, the timings that choice was made from
        self.lt = None
        self.plans = {}
        self.workspace = None
        self.weight_t = None  # planned scratch for a weight's transpose (the "transposed" dGELU form)
        self.bias_column = None  # planned fp32 scratch for the bias-column product (weight_grad_bias_column)
        self._one = np.ones(1, dtype=np.float32)
        self._zero = np.zeros(1, dtype=np.float32)

    @property
    def nbytes(self):
        return 0 if self.workspace is None else self.workspace.nbytes

    def plan(self, device, transpose_elements=0, bias_column_elements=0):
        """The handle and the workspace (32 MiB), shared by every matmul; with transpose_elements,
        also the scratch a weight of up to that many elements is transposed into for the
        "transposed" dGELU form (the model's largest: the fc projection's 4C * C). Without it
        that form is not a choice."""
        self.lt = _bindings()
        self.handle = self.lt.create()
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.weight_t = (torch.empty(transpose_elements, dtype=torch.bfloat16, device=device)
                         if transpose_elements else None)
        self.bias_column = (torch.empty(bias_column_elements, dtype=torch.float32, device=device)
                            if bias_column_elements else None)

    def _require_plan(self, op):
        if self.lt is None:
            raise RuntimeError(f"{op}: call plan(device) (the backend's plan()) before the first step")

    def _get(self, key, pointers, attributes=(), types=(CUDA_R_16BF, CUDA_R_16BF)):
        """The plan for `key` (and operand types), with the epilogue's pointers (attribute ->
        tensor) set."""
        cache_key = key
        if attributes or types != (CUDA_R_16BF, CUDA_R_16BF):
            cache_key = key + (types, tuple((int(attr), value.item()) for attr, value in attributes))
        plan = self.plans.get(cache_key)
        if plan is None:
            plan = self.plans[cache_key] = _Plan(self.lt, self.handle, WORKSPACE_BYTES, key, pointers,
                                                 attributes, types)
        else:
            for attr, tensor in pointers.items():
                plan.set_pointer(attr, tensor)
        return plan

    def _run(self, plan, a, b, d, beta, c=None):
        """d = a-op @ b-op (+ c when beta: d itself, or the separate c given, laid out as d), with
        the plan's timed algorithm when tuning."""
        if self.tune and plan.choice is None:
            plan.choice = self._tune(plan, a, b, d, beta, c)
        self._launch(plan, plan.algorithm((plan.choice or 0) if self.tune else 0), a, b, d, beta, c)

    def _launch(self, plan, algo, a, b, d, beta, c=None):
        alpha_ptr = self._one.ctypes.data
        beta_ptr = (self._one if beta else self._zero).ctypes.data
        c_ptr = (d if c is None else c).data_ptr()
        self.lt.matmul(self.handle, plan.desc, alpha_ptr, a.data_ptr(), plan.a, b.data_ptr(), plan.b,
                       beta_ptr, c_ptr, plan.c, d.data_ptr(), plan.d, algo,
                       self.workspace.data_ptr(), WORKSPACE_BYTES, torch.cuda.current_stream().cuda_stream)

    def _tune(self, plan, a, b, d, beta, c=None):
        """The index of the plan's fastest candidate on these operands, 0 (the heuristic's first)
        unless another beats it by TUNE_MARGIN and computes what the first computes (within one
        bf16 ulp, _agrees: some answers evaluate an epilogue less exactly, e.g. two of the dGELU kernels
        at N = 256, C = 1600); None inside a CUDA graph capture, which must not synchronise (the
        first answer runs there, and a later call outside tunes). The timed runs overwrite d,
        which the caller's own run then writes again; an accumulating product's d is saved to
        host memory first and put back (no GPU memory is taken), also when its c is d itself
        (the fp8 weight gradient passes dweight as both); one that adds a separate c leaves c
        alone and needs no saving."""
        if plan.candidates == 1:
            return 0
        if torch.cuda.is_current_stream_capturing():
            return None
        accumulates = beta and (c is None or c.data_ptr() == d.data_ptr())
        saved = d.to("cpu") if accumulates else None
        times = []
        for index in range(plan.candidates):
            algo = plan.algorithm(index)
            try:
                times.append(median_ms(lambda: self._launch(plan, algo, a, b, d, beta, c), 2, TUNE_REPEATS))
            except Exception:  # an answer that does not run on these operands is no candidate
                times.append(float("inf"))
        choice, first = 0, None
        for index in sorted(range(len(times)), key=times.__getitem__):
            if index == 0 or not times[index] < TUNE_MARGIN * times[0]:
                break
            first = self._sample(plan, 0, a, b, d, beta, saved, c) if first is None else first
            if _agrees(self._sample(plan, index, a, b, d, beta, saved, c), first,
                       2.0 ** -3 if d.dtype in FP8_TYPES else 2.0 ** -7):
                choice = index
                break
        if saved is not None:
            d.copy_(saved)
        return choice

    def _sample(self, plan, index, a, b, d, beta, saved, c=None):
        """The first VALIDATE_ELEMENTS elements of d (contiguous, so they copy to the host with no
        GPU staging) after one run of the index-th candidate (from the saved d when accumulating)."""
        if saved is not None:
            d.copy_(saved)
        self._launch(plan, plan.algorithm(index), a, b, d, beta, c)
        return d.view(-1)[:VALIDATE_ELEMENTS].to("cpu").float()

    # ---------------------------------------------------------------- forward
    def forward(self, out, inp, weight, bias, gelu_out=None, residual=None):
        """out (..., OC) = inp (..., C) @ weight (OC, C)^T + bias (+ residual (..., OC), added in
        the epilogue as cuBLASLt's C with beta = 1: the projections write the residual sum);
        with gelu_out also gelu(out). inp may be a column slice (rows evenly spaced: the
        layernorm outputs beside their ones column)."""
        OC, C = weight.shape
        N = inp.numel() // C
        for name, t in (("out", out), ("weight", weight)):
            check_tensor("matmul_forward", name, t)
        ld_inp = row_stride("matmul_forward", "inp", inp)  # a layernorm output beside its ones column
        self._check_residual("matmul_forward", residual, out, gelu_out)
        if N == 0:
            return
        self._require_plan("matmul_forward")
        Lt = self.lt.Epilogue
        result = out if gelu_out is None else gelu_out
        if gelu_out is not None:
            if bias is None:
                raise ValueError("matmul_forward: the fused GELU form needs a bias (GPT-2's fc has one)")
            check_tensor("matmul_forward", "gelu_out", gelu_out)
            epilogue = Lt.GELU_AUX_BIAS
        else:
            epilogue = Lt.DEFAULT if bias is None else Lt.BIAS
        key = (int(epilogue), OP_T, OP_N, OC, N, C, C, ld_inp, OC, OC if gelu_out is not None else 0,
               tuple(_alignment(t) for t in (weight, inp, result if residual is None else residual, result)))
        A = self.lt.MatmulDescAttribute
        pointers = {}
        if bias is not None:
            check_tensor("matmul_forward", "bias", bias)
            pointers[A.BIAS_POINTER] = bias
        if gelu_out is not None:
            pointers[A.EPILOGUE_AUX_POINTER] = out  # the pre-activation is the aux output
        plan = self._get(key, pointers)
        self._run(plan, weight, inp, result, beta=residual is not None, c=residual)

    @staticmethod
    def _check_residual(op, residual, out, gelu_out):
        if residual is None:
            return
        check_tensor(op, "residual", residual)
        if gelu_out is not None:
            raise ValueError(f"{op}: a residual is added to a projection's output, not to the GELU form's")
        if residual.shape != out.shape:
            raise ValueError(f"{op}: residual {tuple(residual.shape)} must have out's shape {tuple(out.shape)}")
        if residual.data_ptr() == out.data_ptr():
            raise ValueError(f"{op}: residual must be another buffer than out (out is written as the sum)")

    def forward_fp8(self, out, inp8, inp_inverse, weight8, weight_inverse, bias=None, gelu_out=None,
                    fast_accum=True, residual=None, gelu_scale=None, gelu_amax=None):
        """out (..., OC) bf16 = (inp8 (..., C) @ weight8 (OC, C)^T) * inp_inverse * weight_inverse
        + bias (+ residual, as forward; with gelu_out: also gelu_out = gelu(out)): the reference's
        fp8_matmul_forward.
        inp8 and weight8 are float8 tensors (e4m3 or e5m2, not both e5m2), their inverses
        one-element fp32 device tensors (1 / the scale each was quantized with). Both operands
        are K-major, as Hopper's fp8 tensor cores require: out^T = weight8 @ inp8^T is
        cuBLASLt's "TN" product. fast_accum: the tensor cores' faster, less often promoted
        accumulation (forward passes use it).
        gelu_out float8_e4m3fn (with gelu_scale and gelu_amax): the GELU output written in fp8 by
        the epilogue, gelu_out = fp8(gelu(out) * gelu_scale) saturated, gelu_amax = max |gelu(out)|
        (cuBLASLt's D_SCALE and AMAX_D), out still the bf16 pre-activation (the aux output): the
        fc projection's input cast, with a delayed scale, in the product that makes it."""
        op = "matmul_forward_fp8"
        self._check_fp8(op, out, inp8, inp_inverse, weight8, weight_inverse)
        self._check_residual(op, residual, out, gelu_out)
        OC, C = weight8.shape
        if inp8.numel() == 0:
            return
        Lt, A = self.lt.Epilogue, self.lt.MatmulDescAttribute
        pointers = {}
        if bias is not None:
            check_tensor(op, "bias", bias)
            pointers[A.BIAS_POINTER] = bias
        if gelu_out is None:
            self._fp8_product(Lt.DEFAULT if bias is None else Lt.BIAS, out, inp8, inp_inverse, weight8,
                              weight_inverse, pointers, 0, fast_accum, residual)
            return
        if bias is None:
            raise ValueError(f"{op}: the fused GELU form needs a bias (GPT-2's fc has one)")
        pointers[A.EPILOGUE_AUX_POINTER] = out  # the pre-activation is the aux output
        if gelu_out.dtype not in FP8_TYPES:
            check_tensor(op, "gelu_out", gelu_out)
            self._fp8_product(Lt.GELU_AUX_BIAS, gelu_out, inp8, inp_inverse, weight8, weight_inverse, pointers, OC,
                              fast_accum)
            return
        # the GELU output in fp8: D is e4m3, scaled by gelu_scale, its amax taken by the epilogue;
        # the aux (the pre-activation) stays bf16, as the backward's GELU derivative reads it
        if gelu_out.dtype != torch.float8_e4m3fn or gelu_out.shape != out.shape or not gelu_out.is_contiguous():
            raise ValueError(f"{op}: an fp8 gelu_out must be a contiguous float8_e4m3fn tensor of out's shape")
        for name, t in (("gelu_scale", gelu_scale), ("gelu_amax", gelu_amax)):
            if t is None or t.dtype != torch.float32 or t.numel() != 1 or not t.is_cuda or t.data_ptr() % 16:
                raise ValueError(f"{op}: an fp8 gelu_out needs {name}, one fp32 CUDA element 16-byte aligned")
        pointers[A.D_SCALE_POINTER] = gelu_scale
        pointers[A.AMAX_D_POINTER] = gelu_amax
        gelu_amax.zero_()  # the epilogue's amax is written as max |GELU|; zeroed so it is that alone
        self._fp8_product(Lt.GELU_AUX_BIAS, gelu_out, inp8, inp_inverse, weight8, weight_inverse, pointers, OC,
                          fast_accum, aux_type=CUDA_R_16BF, c=out)

    def backward_input_fp8(self, dinp, dout8, dout_inverse, weight8_t, weight_inverse, gelu_inp=None, amax=None):
        """dinp (..., C) = dout8 (..., OC) @ weight8_t (C, OC)^T, scaled back by both inverses,
        times gelu'(gelu_inp) when given: the reference's fp8_matmul_backward_input. weight8_t
        is the weight's transposed fp8 copy, so both operands are K-major (TN). amax (with
        gelu_inp): also amax = max(amax, max |dinp|), taken by gelu_backward as it writes dinp
        (the gradient the next fp8 cast reads).
        The GELU derivative is our gelu_backward after the product, not cuBLASLt's DGELU
        epilogue: with fp8 operands cuBLASLt runs that epilogue as a separate pass of its own
        (cublasLt::epilogue::impl::globalKernel), 1102 us a call at 1558M B=16 against about
        150 for gelu_backward (H100, 2026-11-23)."""
        op = "matmul_backward_input_fp8"
        self._check_fp8(op, dinp, dout8, dout_inverse, weight8_t, weight_inverse)
        if amax is not None and gelu_inp is None:
            raise ValueError(f"{op}: amax is taken by the GELU derivative's pass; without gelu_inp there is none")
        if dout8.numel() == 0:
            return
        self._fp8_product(self.lt.Epilogue.DEFAULT, dinp, dout8, dout_inverse, weight8_t, weight_inverse, {},
                          0, fast_accum=False)
        if gelu_inp is not None:
            check_tensor(op, "gelu_inp", gelu_inp)
            gelu_backward(dinp, gelu_inp, dinp, amax)

    def weight_grad_fp8(self, dweight, dout8_t, dout_inverse, inp8_t, inp_inverse, accumulate=True):
        """dweight (OC, C) bf16 += (dout8_t (OC, N) @ inp8_t (C, N)^T) * both inverses: the
        reference's fp8_matmul_weight_grad. The operands are the transposed fp8 copies of the
        output gradient and the input (tokens last: K-major, as Hopper's fp8 tensor cores want),
        so this is the forward's TN product with the tokens as K, and dweight is its C and D
        (beta 1: an fp32 sum in cuBLASLt, one rounding to bf16, as the bf16 weight gradient;
        accumulate False: beta 0, dweight overwritten and never read).
        Full-precision accumulation: K is every token of the micro-batch."""
        op = "matmul_weight_grad_fp8"
        self._check_fp8(op, dweight, dout8_t, dout_inverse, inp8_t, inp_inverse)
        if dweight.shape != (dout8_t.shape[0], inp8_t.shape[0]) or dout8_t.shape[1] != inp8_t.shape[1]:
            raise ValueError(f"{op}: dweight {tuple(dweight.shape)}, dout8_t {tuple(dout8_t.shape)} and inp8_t "
                             f"{tuple(inp8_t.shape)} must be (OC, C), (OC, N) and (C, N)")
        if dout8_t.numel() == 0:
            return
        self._fp8_product(self.lt.Epilogue.DEFAULT, dweight, dout8_t, dout_inverse, inp8_t, inp_inverse, {}, 0,
                          fast_accum=False, residual=dweight if accumulate else None)

    def _check_fp8(self, op, out, inp8, inp_inverse, weight8, weight_inverse):
        for name, t in (("inp8", inp8), ("weight8", weight8)):
            if t.dtype not in FP8_TYPES or not t.is_cuda or not t.is_contiguous():
                raise ValueError(f"{op}: {name} must be a contiguous float8 CUDA tensor, got {t.dtype}")
        if inp8.dtype == weight8.dtype == torch.float8_e5m2:
            raise ValueError(f"{op}: e5m2 x e5m2 has no fp8 matmul; quantize one operand to e4m3")
        OC, C = weight8.shape
        if C % 16 or OC % 16:
            raise ValueError(f"{op}: fp8 matmuls need C and OC multiples of 16, got C={C}, OC={OC}")
        for name, t in (("inp_inverse", inp_inverse), ("weight_inverse", weight_inverse)):
            if t.dtype != torch.float32 or t.numel() != 1 or not t.is_cuda or t.data_ptr() % 16:
                raise ValueError(f"{op}: {name} must be one fp32 CUDA element at a 16-byte aligned address "
                                 f"(cuBLASLt's scale pointers)")
        check_tensor(op, "out", out)
        self._require_plan(op)

    def _fp8_product(self, epilogue, out, inp8, inp_inverse, weight8, weight_inverse, pointers, aux_ld,
                     fast_accum, residual=None, aux_type=None, c=None):
        """out^T = weight8 @ inp8^T (TN) (+ residual^T) with this epilogue, the operands' inverse
        scales and the epilogue's pointers; out bf16 or fp8 (D's type; aux_type: the epilogue's
        aux output's, which otherwise defaults to D's). c: a bf16 buffer of out's shape to name
        as C when out is fp8 and nothing is added (beta 0: C is not read): cuBLASLt refuses a C
        that is D's memory under another layout (CUBLAS_STATUS_INVALID_VALUE at the launch)."""
        OC, C = weight8.shape
        N = inp8.numel() // C
        A = self.lt.MatmulDescAttribute
        key = (int(epilogue), OP_T, OP_N, OC, N, C, C, C, OC, aux_ld,
               tuple(_alignment(t) for t in (weight8, inp8, residual if residual is not None else
                                             c if c is not None else out, out)))
        attributes = ((A.FAST_ACCUM, np.int8(bool(fast_accum))),)
        if aux_type is not None:
            attributes += ((A.EPILOGUE_AUX_DATA_TYPE, np.int32(aux_type)),)
        types = (FP8_TYPES[weight8.dtype], FP8_TYPES[inp8.dtype])
        if out.dtype in FP8_TYPES:
            types += (FP8_TYPES[out.dtype],)
        pointers = {**pointers, A.A_SCALE_POINTER: weight_inverse, A.B_SCALE_POINTER: inp_inverse}
        self._run(self._get(key, pointers, attributes, types), weight8, inp8, out, beta=residual is not None,
                  c=residual if residual is not None else c)

    # ---------------------------------------------------------------- backward
    def backward(self, dinp, dweight, dbias, dout, inp, weight, gelu_inp=None, accumulate=True, inp_ones=None,
                 exact_zero=None):
        """dinp = dout @ weight (overwrites; times gelu'(gelu_inp) when given); dweight += dout^T @
        inp; dbias += the column sums of dout (bias.cu). dinp None: dweight and dbias only (fp8
        runs take dinp from backward_input_fp8). dinp is written last, so it may be inp.
        accumulate False: dweight = dout^T @ inp (beta 0: overwritten, never read).
        inp_ones (..., ld), inp's memory with its column of ones at C: dweight and dbias then come
        from one fp32 product over it (weight_grad_bias_column), and dbias's rows exact_zero =
        (begin, end) are left as they are (qkv's keys, whose sums are exactly zero)."""
        OC, C = weight.shape
        N = dout.numel() // OC
        for name, t in (("dinp", dinp), ("dweight", dweight), ("dout", dout), ("weight", weight)):
            if t is not None or name != "dinp":
                check_tensor("matmul_backward", name, t)
        row_stride("matmul_backward", "inp", inp)
        if N == 0:
            return
        self._require_plan("matmul_backward")
        if inp_ones is not None and dbias is not None:
            if inp_ones.data_ptr() != inp.data_ptr() or inp_ones.shape[:-1] != inp.shape[:-1]:
                raise ValueError("matmul_backward: inp_ones must be inp's own rows with their ones column "
                                 "(layout.with_ones_column(inp))")
            self.weight_grad_bias_column(dweight, dbias, dout, inp_ones, accumulate, exact_zero=exact_zero)
            if dinp is not None:
                self._input_gradient(dinp, dout, weight, gelu_inp)
            return
        check_tensor("matmul_backward", "inp", inp)
        E = self.lt.Epilogue
        # dW^T (C, OC) += inp^T (C, N) @ dout (N, OC): beta = 1 accumulates (an fp32 sum inside
        # cuBLASLt, one rounding to bf16); beta = 0 writes, the same plan and algorithm. First:
        # dinp may be inp's own memory (the model's d_4C is the rebuilt GELU output this product reads)
        key = (int(E.DEFAULT), OP_N, OP_T, C, OC, N, C, OC, C, 0,
               tuple(_alignment(t) for t in (inp, dout, dweight, dweight)))
        self._run(self._get(key, {}), inp, dout, dweight, beta=accumulate)
        if dbias is not None:
            if self.bias_gradients is None:
                raise RuntimeError("matmul_backward: a dbias needs the BiasGradients this Matmuls was made with")
            self.bias_gradients.backward(dbias, dout)
        if dinp is not None:
            self._input_gradient(dinp, dout, weight, gelu_inp)

    def weight_grad_bias_column(self, dweight, dbias, dout, inp_ones, accumulate=True, product=None,
                                exact_zero=None):
        """dweight (OC, C) += dout^T @ inp and dbias (OC,) += the column sums of dout, both from one
        product: inp_ones (..., ld) holds inp in its first C columns and ones in column C (the
        activation plan keeps such a column beside the layernorm outputs the fc and qkv
        products read), so row C of the product inp_ones^T @ dout sums dout over the tokens.
        The product goes to planned fp32 scratch (OC, ld) (or `product`, fp32 or bf16: probes),
        and one pass (bias.split_bias_column) moves it into dweight (= when not accumulate) and
        adds its bias column into dbias: no pass over dout of its own, which the column-sum
        kernel spends on a (B, T, OC) gradient. An fp32 product keeps the rounding of
        backward()'s: one fp32 sum, with dweight's old value when accumulating, rounded once; so
        writing dweight is bitwise adding to zeros, as with the plain product (a bf16 product
        ran 20 us faster at 124M's fc, but would round twice when accumulating and take
        another algorithm when writing).
        exact_zero = (begin, end): rows of dbias left as they are."""
        op = "matmul_weight_grad_bias_column"
        for name, t in (("dweight", dweight), ("dbias", dbias), ("dout", dout), ("inp_ones", inp_ones)):
            check_tensor(op, name, t)
        OC, C = dweight.shape
        ld = inp_ones.shape[-1]
        N = inp_ones.numel() // ld
        if ld <= C or ld % 8 or dout.numel() != N * OC or dbias.shape != (OC,):
            raise ValueError(f"{op}: inp_ones (..., {ld}), dout (..., {dout.shape[-1]}) and dbias {tuple(dbias.shape)} "
                             f"do not fit dweight {tuple(dweight.shape)}: want ld > C a multiple of 8, N x OC, (OC,)")
        if N == 0:
            return
        self._require_plan(op)
        if product is None:
            if self.bias_column is None or self.bias_column.numel() < OC * ld:
                raise RuntimeError(f"{op}: plan(bias_column_elements=...) planned no scratch for {OC} x {ld}")
            product = self.bias_column[:OC * ld].view(OC, ld)
        # product^T (ld, OC) = inp_ones^T (ld, N) @ dout (N, OC), column-major. All ld rows, the
        # zeros past the ones too: with C + 1 rows (not a multiple of 8) cuBLASLt's answers ran
        # 4-5x slower at every GPT-2 shape (benchmarks/bias_column_probe.py, H100, 2026-12-06)
        key = (int(self.lt.Epilogue.DEFAULT), OP_N, OP_T, ld, OC, N, ld, OC, ld, 0,
               tuple(_alignment(t) for t in (inp_ones, dout, product, product)))
        d_type = CUDA_R_32F if product.dtype == torch.float32 else CUDA_R_16BF
        self._run(self._get(key, {}, types=(CUDA_R_16BF, CUDA_R_16BF, d_type)), inp_ones, dout, product, beta=False)
        split_bias_column(dweight, dbias, product, accumulate, exact_zero)

    def _input_gradient(self, dinp, dout, weight, gelu_inp):
        """dinp = dout @ weight, times gelu'(gelu_inp) when given (the DGELU epilogue on the
        stored weight or on its transpose, or the split form: see _dgelu_form)."""
        OC, C = weight.shape
        N = dout.numel() // OC
        E, A = self.lt.Epilogue, self.lt.MatmulDescAttribute
        # dinp^T (C, N) = W^T-as-stored (C, OC) @ dout^T (OC, N)
        aligns = tuple(_alignment(t) for t in (weight, dout, dinp, dinp))
        plain = (int(E.DEFAULT), OP_N, OP_N, C, N, OC, C, OC, C, 0, aligns)
        if gelu_inp is None:
            self._run(self._get(plain, {}), weight, dout, dinp, beta=False)
            return
        check_tensor("matmul_backward", "gelu_inp", gelu_inp)
        fused = (int(E.DGELU), OP_N, OP_N, C, N, OC, C, OC, C, C, aligns)

        def run_fused():
            self._run(self._get(fused, {A.EPILOGUE_AUX_POINTER: gelu_inp}), weight, dout, dinp, beta=False)

        def run_split():  # the plain product, then gelu' in place (gelu_backward allows dinp is dout)
            self._run(self._get(plain, {}), weight, dout, dinp, beta=False)
            gelu_backward(dinp, gelu_inp, dinp)

        forms = {"fused": run_fused, "split": run_split}
        if self.weight_t is not None and weight.numel() <= self.weight_t.numel():
            weight_t = self.weight_t[:weight.numel()].view(C, OC)
            # dinp^T (C, N) = (W^T stored (C, OC), read as the column-major (OC, C))^T @ dout^T
            transposed = (int(E.DGELU), OP_T, OP_N, C, N, OC, OC, OC, C, C,
                          (_alignment(weight_t),) + aligns[1:])

            def run_transposed():
                transpose(weight_t, weight)
                self._run(self._get(transposed, {A.EPILOGUE_AUX_POINTER: gelu_inp}), weight_t, dout, dinp,
                          beta=False)
            forms["transposed"] = run_transposed
        forms[self._dgelu_form(fused, forms)]()

    @staticmethod
    def dgelu_mode(pinned, deterministic):
        """The dgelu a Matmuls runs with: a pinned form (matmul_dgelu, bench --dgelu) as named,
        else "fused" in a deterministic run (a timed choice could differ between two runs), else
        "auto"."""
        if pinned not in DGELU_FORMS:
            raise ValueError(f"dgelu form {pinned!r}: choose one of {', '.join(DGELU_FORMS)}")
        if pinned != "auto":
            return pinned
        return "fused" if deterministic else "auto"

    def dgelu_report(self):
        """What "auto" chose at each dGELU product it timed: a list of {"rows", "cols", "inner",
        "form", "us": {form: microseconds}} (dinp (rows, cols) = dout (rows, inner) @ W)."""
        return [{"rows": key[4], "cols": key[3], "inner": key[5], "form": self.dgelu_choice[key],
                 "us": {name: round(1000 * ms, 1) for name, ms in times.items()}}
                for key, times in self.dgelu_times.items()]

    def _dgelu_form(self, key, forms):
        """The form (a key of forms: "fused", "split", "transposed" where the scratch was planned)
        for this shape: self.dgelu when it names one, else the measured choice, measured on the
        first call (with the call's own buffers: the forms only write dinp, which the caller's
        run then overwrites, and the transposed form the scratch). Never timed inside a CUDA
        graph capture, which must not synchronise: an unmeasured shape takes the epilogue there."""
        if self.dgelu != "auto":
            if self.dgelu not in forms:
                raise ValueError(f"matmul_backward: dgelu form {self.dgelu!r} is not available here "
                                 f"(one of {', '.join(forms)}; 'transposed' needs plan(transpose_elements=...))")
            return self.dgelu
        form = self.dgelu_choice.get(key)
        if form is None:
            if torch.cuda.is_current_stream_capturing():
                return "fused"
            times = interleaved_median_ms(forms, 1, TIMING_ROUNDS, TIMING_REPEATS)
            fastest = min(times, key=times.get)
            form = fastest if times[fastest] < SPLIT_MARGIN * times["fused"] else "fused"
            self.dgelu_choice[key], self.dgelu_times[key] = form, times
        return form
