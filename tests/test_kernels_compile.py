"""Every kernels/*.cu compiles for Hopper with the launch constants its Python module hands it,
on a machine without a GPU: nvcc (the CUDA toolkit, where installed) catches a kernel that
would only fail on the GPU machine, at NVRTC's first compile there. Skipped without nvcc."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distgpt.backends.cuda.runtime import kernels_dir

NVCC = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
KERNELS = sorted(p.stem for p in kernels_dir().glob("*.cu"))


def test_every_kernel_file_is_compiled_by_a_python_module():
    """The flags come from `python -m distgpt.backends.cuda NAME`: every .cu has its module."""
    from distgpt.backends.cuda.__main__ import MODULES
    assert KERNELS and set(KERNELS) == set(MODULES)


@pytest.mark.skipif(NVCC is None, reason="no nvcc (the CUDA toolkit) on this machine")
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_for_sm90(name, tmp_path):
    flags = subprocess.run([sys.executable, "-m", "distgpt.backends.cuda", name], capture_output=True,
                           text=True, check=True).stdout.split()
    assert flags, f"{name}.cu: its module hands it no launch constants"
    result = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", f"-I{kernels_dir()}", "-DNDEBUG", *flags, "-c",
                             "-o", str(tmp_path / f"{name}.o"), str(kernels_dir() / f"{name}.cu")],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{name}.cu does not compile:\n{result.stderr[-3000:]}"
    assert (tmp_path / f"{name}.o").stat().st_size > 0


class _Function:
    """Stands in for a compiled kernel: its static shared memory, and each opt-in it is given."""

    def __init__(self, static_bytes):
        self.shared_size_bytes = static_bytes
        self.opt_ins = []

    @property
    def max_dynamic_shared_size_bytes(self):
        return self.opt_ins[-1] if self.opt_ins else 0

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self.opt_ins.append(value)


def test_shared_memory_opt_in_counts_the_static_part():
    """48 KiB of dynamic shared memory plus a few hundred static bytes needs the opt-in (the
    layernorm backward at C = 1024 failed its launch on an H100 without it); 48 KiB alone does
    not; each function is opted in once per larger size, not at every launch."""
    from distgpt.backends.cuda.runtime import SMEM_WITHOUT_OPT_IN, KernelModule
    module = KernelModule("layernorm")
    with_static, without_static = _Function(448), _Function(0)
    module._opt_in_shared_memory("with_static", with_static, SMEM_WITHOUT_OPT_IN)
    module._opt_in_shared_memory("without_static", without_static, SMEM_WITHOUT_OPT_IN)
    assert with_static.opt_ins == [SMEM_WITHOUT_OPT_IN] and without_static.opt_ins == []
    for _ in range(3):
        module._opt_in_shared_memory("with_static", with_static, SMEM_WITHOUT_OPT_IN)
    module._opt_in_shared_memory("without_static", without_static, 64 * 1024)
    module._opt_in_shared_memory("without_static", without_static, 32 * 1024)
    assert with_static.opt_ins == [SMEM_WITHOUT_OPT_IN] and without_static.opt_ins == [64 * 1024]
