"""Probe: the fc and qkv bias gradients from their weight-gradient products, over an input with a
column of ones appended, against the product plus our column-sum kernel (bias.cu).

The bias gradient of out = inp @ W^T + b is the column sums of dout, a pass over a (B, T, OC)
gradient of its own (1558M's fc: 210 MB a layer). With the layer's input stored beside a column
of ones at C (rows C + pad apart), the weight-gradient product inp_ones^T @ dout gives those sums
as one more row, for the product's extra rows of work and a pass over the (OC, C) result
(Matmuls.weight_grad_bias_column). Timed here at the step's shapes, each form in turns, tuned as the
step tunes them, with the product in fp32 (as the step runs it) or bf16, and the bf16 product
alone; the forward products that read the input (fc with its GELU epilogue, qkv with its bias)
are also timed from rows C + pad apart. Prints a table (us a call) and the largest difference of
each form's dW and dbias from the column-sum form's.

    python3 benchmarks/bias_column_probe.py [--models gpt2_124m:64 gpt2_350m:32 gpt2_1558m:16] [--pads 8 64]

Measured on an H100 (2026-12-06, --pads 8 64 128; one run, about +-30 us between runs): at 124M
B=64 the fc form 672 us with the column sums against 582 (fp32) / 560 (bf16) with the ones at
pad 8, qkv 530 (the step's form) against 435 / 471; at 1558M B=16 fc 645 against 700 / 642, and
in the step itself the ones lost there (layout.py, backends/cuda/__init__.py's
BIAS_COLUMN_MAX_C). With C + 1 rows (no padding) every product ran 4-5x slower.
"""
import argparse

import torch


def shapes(models):
    from distgpt.config import load_config
    for spec in models:
        name, B = spec.split(":")
        C = load_config([f"model={name}"]).model.n_embd
        N = int(B) * 1024
        yield f"{name} B={B} fc", N, C, 4 * C
        yield f"{name} B={B} qkv", N, C, 3 * C


def relative(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def probe(label, N, C, OC, device, pads):
    from distgpt.backends.cuda import matmul as mm
    from distgpt.backends.cuda.bias import BiasGradients
    from distgpt.backends.cuda.runtime import interleaved_median_ms

    gen = torch.Generator(device=device).manual_seed(0)
    inp = torch.randn(N, C, generator=gen, device=device).to(torch.bfloat16)
    lds = [C + pad for pad in pads]
    with_ones = {}
    for ld in lds:
        with_ones[ld] = torch.zeros(N, ld, dtype=torch.bfloat16, device=device)
        with_ones[ld][:, :C], with_ones[ld][:, C] = inp, 1
    dout = (torch.randn(N, OC, generator=gen, device=device) * 0.01).to(torch.bfloat16)
    weight = (torch.randn(OC, C, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    bias = torch.zeros(OC, dtype=torch.bfloat16, device=device)
    out = torch.empty(N, OC, dtype=torch.bfloat16, device=device)
    gelu_out = torch.empty_like(out) if OC == 4 * C else None
    grads = {}
    matmuls = mm.Matmuls(BiasGradients(C, device))
    matmuls.plan(device, bias_column_elements=OC * max(lds))
    bf16_products = {ld: torch.zeros(OC, ld, dtype=torch.bfloat16, device=device) for ld in lds}
    dproj_sum = torch.randn(C, generator=gen, device=device)  # qkv: the attention projection's bias sums
    attproj_w = (torch.randn(C, C, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    def fresh(name):
        grads[name] = (torch.zeros(OC, C, dtype=torch.bfloat16, device=device),
                       torch.zeros(OC, dtype=torch.bfloat16, device=device))
        return grads[name]

    def column_sums():
        dW, db = fresh("column sums")
        matmuls.backward(None, dW, db, dout, inp, weight, accumulate=False)

    def bias_column(ld, product=None, name=None, split=True):
        inp_ones = with_ones[ld]

        def run():
            dW, db = fresh(name)
            if split:
                matmuls.weight_grad_bias_column(dW, db, dout, inp_ones, accumulate=False, product=product)
            else:  # the product alone, for where the time goes
                split_bias_column = mm.split_bias_column
                mm.split_bias_column = lambda *args: None
                try:
                    matmuls.weight_grad_bias_column(dW, db, dout, inp_ones, accumulate=False, product=product)
                finally:
                    mm.split_bias_column = split_bias_column
        return run

    def model_qkv():  # the step's qkv form: the queries' column sums and the values' through the projection
        dW, db = fresh("model qkv")
        matmuls.backward(None, dW, None, dout, inp, weight, accumulate=False)
        matmuls.bias_gradients.qkv_backward(db, dout, dproj_sum, attproj_w)

    def forward(ldb):
        E = matmuls.lt.Epilogue
        epilogue = E.GELU_AUX_BIAS if gelu_out is not None else E.BIAS
        result = gelu_out if gelu_out is not None else out
        operand = inp if ldb == C else with_ones[ldb]
        key = (int(epilogue), mm.OP_T, mm.OP_N, OC, N, C, C, ldb, OC, OC if gelu_out is not None else 0,
               tuple(mm._alignment(t) for t in (weight, operand, result, result)))
        A = matmuls.lt.MatmulDescAttribute
        pointers = {A.BIAS_POINTER: bias}
        if gelu_out is not None:
            pointers[A.EPILOGUE_AUX_POINTER] = out

        def run():
            matmuls._run(matmuls._get(key, pointers), weight, operand, result, beta=False)
        return run

    forms = {"column sums": column_sums, f"fwd rows {C}": forward(C)}
    for ld in lds:
        forms[f"ones f32 {ld}"] = bias_column(ld, name=f"ones f32 {ld}")
        forms[f"ones bf16 {ld}"] = bias_column(ld, bf16_products[ld], name=f"ones bf16 {ld}")
        forms[f"product alone {ld}"] = bias_column(ld, bf16_products[ld], name=f"product alone {ld}", split=False)
        forms[f"fwd rows {ld}"] = forward(ld)
    if OC == 3 * C:
        forms["model qkv"] = model_qkv
    times = {k: 1000 * v for k, v in interleaved_median_ms(forms, 2, 3, 10).items()}
    dW0, db0 = grads["column sums"]
    errors = {name: (relative(dW, dW0), relative(db, db0)) for name, (dW, db) in grads.items()
              if "alone" not in name and "model" not in name}
    return times, errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2_124m:64", "gpt2_350m:32", "gpt2_1558m:16"])
    parser.add_argument("--pads", nargs="+", type=int, default=[8, 64],
                        help="columns past C: the ones column and zeros (rows C + pad apart)")
    args = parser.parse_args()
    device = torch.device("cuda")
    print("| product | N | C | OC | column sums us (the step's qkv form) | rows apart: ones f32, ones bf16, bf16 "
          "product alone | forward product from rows C apart, C + pad | ones f32: dW / db rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for label, N, C, OC in shapes(args.models):
        t, e = probe(label, N, C, OC, device, args.pads)
        model = f" ({t['model qkv']:.1f})" if "model qkv" in t else ""
        lds = [C + pad for pad in args.pads]
        ones = "; ".join(f"{ld}: {t[f'ones f32 {ld}']:.1f}, {t[f'ones bf16 {ld}']:.1f}, "
                         f"{t[f'product alone {ld}']:.1f}" for ld in lds)
        fwd = ", ".join(f"{t[f'fwd rows {ld}']:.1f}" for ld in [C] + lds)
        err = ", ".join(f"{e[f'ones f32 {ld}'][0]:.1e} / {e[f'ones f32 {ld}'][1]:.1e}" for ld in lds)
        print(f"| {label} | {N} | {C} | {OC} | {t['column sums']:.1f}{model} | {ones} | {fwd} | {err} |", flush=True)

if __name__ == "__main__":
    main()
