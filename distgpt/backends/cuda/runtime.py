"""Compiling and launching our kernels from Python.

Each kernels/<name>.cu is compiled once per process by NVRTC through CuPy's RawModule for the
current device's architecture (CuPy caches the binary on disk, so later processes skip the
compile). Kernels run on torch's current stream over torch-allocated memory: arguments are
raw device pointers, so no copy and no CuPy allocation is involved.

Launch constants (threads per block, warps per block, ...) are numbers both sides must agree
on: the Python module that launches a .cu file declares them once, in its KernelModule, and they
reach the compiler as -D defines; the .cu files do not define them (and refuse to compile
without them). Constants of the math itself (GELU's, the layernorm epsilon) come from the
reference backend the same way. To compile a file by hand:
`nvcc -arch=sm_90 -Ikernels -c kernels/layernorm.cu $(python -m distgpt.backends.cuda layernorm)`;
tests/test_kernels_compile.py does so for every file wherever nvcc is installed (no GPU needed).

DISTGPT_CUDA_DEBUG=1 synchronises after every launch and names the kernel that failed.
"""
import functools
import math
import os
import statistics
from importlib import resources
from pathlib import Path

import numpy as np
import torch

SMEM_WITHOUT_OPT_IN = 48 * 1024  # shared memory (static + dynamic) a block may use without opting in
DEBUG = os.environ.get("DISTGPT_CUDA_DEBUG", "0") not in ("", "0")


def kernels_dir() -> Path:
    packaged = resources.files("distgpt") / "kernels"
    if packaged.is_dir() and any(Path(str(packaged)).glob("*.cu")):
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "kernels"


@functools.lru_cache(maxsize=None)
def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(f"backend=cuda needs CuPy ({exc}); pip install the cuda12 or cuda13 extra") from None
    return cupy


@functools.lru_cache(maxsize=None)
def _compiled(name, defines):
    """The RawModule of kernels/<name>.cu compiled with `defines` ((NAME, value) pairs)."""
    cupy = _cupy()
    major, minor = torch.cuda.get_device_capability()
    source = (kernels_dir() / f"{name}.cu").read_text()
    options = ("-std=c++17", f"-arch=sm_{major}{minor}", f"-I{kernels_dir()}", "-DNDEBUG",
               *(f"-D{key}={value}" for key, value in defines))
    mod = cupy.RawModule(code=source, options=options, name_expressions=None)
    mod.compile()
    return mod


class KernelModule:
    """One kernels/<name>.cu and its launch constants: compiled on first use, functions looked up
    once, launched on torch's current stream."""

    def __init__(self, name, **constants):
        self.name = name
        self.constants = constants
        self._defines = tuple(sorted(constants.items()))
        self._functions = {}
        self._dynamic_smem = {}  # function -> the dynamic shared memory it has been opted in to

    def compiler_flags(self):
        return [f"-D{key}={value}" for key, value in self._defines]

    def function(self, name):
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = _compiled(self.name, self._defines).get_function(name)
        return fn

    def _opt_in_shared_memory(self, function, fn, shared_mem):
        """Past 48 KiB a block, its static and dynamic shared memory together, a launch needs the
        function's opt-in to that much dynamic memory (without it: CUDA_ERROR_INVALID_VALUE). The
        static part counts: the layernorm backward's 48 KiB of staged rows at C = 1024 plus its
        static row sums failed on an H100 while the dynamic part alone looked allowed. Set once
        per function and size, not at every launch."""
        if shared_mem <= self._dynamic_smem.get(function, 0):
            return
        if shared_mem + fn.shared_size_bytes > SMEM_WITHOUT_OPT_IN:
            fn.max_dynamic_shared_size_bytes = shared_mem
        self._dynamic_smem[function] = shared_mem

    def launch(self, function, grid, block, args, shared_mem=0):
        """Launch kernels/<name>.cu:<function> on torch's current stream."""
        fn = self.function(function)
        self._opt_in_shared_memory(function, fn, shared_mem)
        stream = _stream(torch.cuda.current_stream().cuda_stream)
        grid = grid if isinstance(grid, tuple) else (grid,)
        block = block if isinstance(block, tuple) else (block,)
        fn(grid, block, args, shared_mem=shared_mem, stream=stream)
        if DEBUG:
            try:
                torch.cuda.synchronize()
            except RuntimeError as exc:
                raise RuntimeError(f"CUDA kernel {self.name}.cu:{function} failed: {exc}") from None


def ptr(tensor):
    """A tensor's device address as a kernel argument (None -> a null pointer)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def i32(x):
    return np.int32(x)


def u32(x):
    return np.uint32(x & 0xFFFFFFFF)


def f32(x):
    return np.float32(x)


@functools.lru_cache(maxsize=64)
def _stream(handle):
    """CuPy's view of a torch stream, made once per stream (not once per launch)."""
    return _cupy().cuda.ExternalStream(handle)


def check_tensor(op, name, t, dtype=torch.bfloat16):
    """One-line errors for what the kernels assume: dtype, a contiguous CUDA tensor, and a
    16-byte aligned start (128-bit loads)."""
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if not t.is_cuda or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous CUDA tensor")
    if t.data_ptr() % 16:
        raise ValueError(f"{op}: {name} must be 16-byte aligned for 128-bit access")


def row_stride(op, name, t):
    """Elements between t's rows: t (..., C) bf16 on the GPU, its last dimension contiguous and
    its rows evenly spaced (contiguous, or a column slice of a contiguous tensor: the queries'
    part of dqkv, a layernorm output beside its ones column), 16-byte aligned."""
    if t.dtype != torch.bfloat16 or not t.is_cuda:
        raise ValueError(f"{op}: {name} must be a bf16 CUDA tensor, got {t.dtype} on {t.device}")
    if t.dim() < 2:
        check_tensor(op, name, t)
        return t.shape[-1]
    ld = t.stride(-2)
    evenly = t.stride(-1) == 1 and all(t.stride(d - 1) == t.stride(d) * t.shape[d]
                                       for d in range(-2, -t.dim(), -1))
    if not evenly or ld < t.shape[-1] or t.data_ptr() % 16 or ld % 8:
        raise ValueError(f"{op}: {name} must be contiguous, or a column slice of a contiguous tensor with "
                         f"16-byte aligned rows, got shape {tuple(t.shape)}, strides {t.stride()}")
    return ld


def check_scalars(op, **tensors):
    """Device scalars the kernels read or merge into (fp8 amaxes, scales, inverse scales): each
    one fp32 CUDA element."""
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.numel() != 1 or not t.is_cuda:
            raise ValueError(f"{op}: {name} must be one fp32 CUDA element, got {t.dtype} {tuple(t.shape)}")


def ceil_div(a, b):
    return -(-a // b)


def sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def event_ms(fn):
    """One call of fn, timed on the GPU between two CUDA events, in ms (waits for it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(fn, warmup=1, repeats=5):
    """fn's median time on the GPU in ms over `repeats` calls after `warmup` calls (compilation,
    plans, caches stay out), each between CUDA events."""
    for _ in range(warmup):
        fn()
    return statistics.median(event_ms(fn) for _ in range(repeats))


def interleaved_median_ms(fns, warmup=1, rounds=3, repeats=5):
    """The median time in ms of each of fns (a dict: name -> fn), timed in turns: after `warmup`
    calls of each, `rounds` rounds in which every fn in turn runs `repeats` timed calls. A slow
    stretch of the GPU (a clock step under its power cap, another process) then falls on every
    fn alike instead of on the one being timed at that moment."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].extend(event_ms(fn) for _ in range(repeats))
    return {name: statistics.median(times) for name, times in samples.items()}


def sustained_median_ms(fns, isolated_ms, burst_ms, rounds=3):
    """Each of fns' (a list) time in ms a call in bursts back to back, where the GPU sits at its
    power cap and its clock follows the energy a kernel spends (median_ms times calls alone,
    after an idle GPU). In `rounds` rounds, every fn in turn runs for about burst_ms untimed (the
    clock settles), then as long again timed between two events; its call count comes from
    isolated_ms (its time alone; inf: it does not run, and stays inf). benchmarks/
    matmul_algo_probe.py --sustained ranks cuBLASLt's answers so; the tuner does not (matmul.py)."""
    counts = [max(5, int(burst_ms / t)) if math.isfinite(t) and t > 0 else 0 for t in isolated_ms]
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, count, times in zip(fns, counts, samples):
            if not count:
                continue

            def burst(fn=fn, count=count):
                for _ in range(count):
                    fn()
            burst()
            times.append(event_ms(burst) / count)
    return [statistics.median(times) if times else float("inf") for times in samples]
