"""Checks of the GPU stack distgpt stands on, run once on a new machine kind: versions,
NVRTC compiling kernels/common.cuh through CuPy on torch's stream, cuDNN attention (our
wrappers) against the reference, and whether cuDNN's attention backward is bitwise repeatable."""
import torch

import importlib.util
from pathlib import Path

from distgpt.backends import reference


def _load(name):
    """Load one file of backends/cuda alone, so this check runs before every kernel exists."""
    path = Path(reference.__file__).parent / "cuda" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"check_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


attention_module, runtime = _load("attention"), _load("runtime")
attention = attention_module.Attention()  # unplanned: cuDNN through ATen, the simplest path
kernels_dir, ptr, i32 = runtime.kernels_dir, runtime.ptr, runtime.i32

print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      torch.cuda.get_device_name())
import cupy  # noqa: E402
print("cupy", cupy.__version__)

probe = kernels_dir() / "zz_probe.cu"
probe.write_text('#include "common.cuh"\nextern "C" __global__ void twice(floatX* x, int n) {\n'
                 '  int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8; if (i >= n) return;\n'
                 '  x128 v = load128(x + i); for (int k = 0; k < 8; k++) v[k] = (floatX)((float)v[k] * 2.0f);\n'
                 '  store128(x + i, v); }\n')
x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
want = x * 2
runtime.KernelModule("zz_probe").launch("twice", 4096 // 8 // 128, 128, (ptr(x), i32(4096)))
torch.cuda.synchronize()
probe.unlink()
print("nvrtc kernel over torch bf16 on torch's stream:", "OK" if torch.equal(x, want) else "WRONG")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


for B, T, NH, HS in [(2, 256, 2, 64), (4, 1024, 12, 64), (2, 1024, 25, 64)]:
    C = NH * HS
    qkv = torch.randn(B, T, 3 * C, device="cuda").bfloat16()
    out, lse = torch.empty(B, T, C, device="cuda", dtype=torch.bfloat16), torch.empty(B, NH, T, device="cuda")
    attention.forward(out, lse, qkv, NH)
    rout, rlse = torch.empty(B, T, C, device="cuda"), torch.empty(B, NH, T, device="cuda")
    reference.attention_forward(rout, rlse, qkv.float(), NH)
    dout = torch.randn(B, T, C, device="cuda").bfloat16()
    dqkv = torch.empty_like(qkv)
    attention.backward(dqkv, dout, qkv, out, lse, NH)
    dqkv2 = torch.empty_like(qkv)
    attention.backward(dqkv2, dout, qkv, out, lse, NH)
    rd = torch.empty(B, T, 3 * C, device="cuda")
    reference.attention_backward(rd, dout.float(), qkv.float(), rout, rlse, NH)
    print(f"attention B={B} T={T} NH={NH}: out rel {rel(out, rout):.2e}, lse rel {rel(lse, rlse):.2e}, "
          f"dqkv rel {rel(dqkv, rd):.2e}, backward bitwise repeatable: {torch.equal(dqkv, dqkv2)}")
