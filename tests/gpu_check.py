"""Helpers for tests marked `gpu`: skip cleanly without a GPU and CuPy, and compare a CUDA
result with the reference under a named tolerance, reporting the worst element."""
import pytest
import torch


def cuda_available():
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


requires_gpu = pytest.mark.skipif(not cuda_available(), reason="needs an NVIDIA GPU and CuPy (cuda extra)")


def assert_close(name, got, want, atol, rtol):
    """|got - want| <= atol + rtol * |want| element-wise; on failure, name the tensor, the worst
    element and how much of its budget it used. NaN (an unwritten poisoned output) never passes."""
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite elements"
    budget = atol + rtol * want.abs()
    used = (got - want).abs() / budget
    worst = int(used.argmax())
    assert used.max() <= 1.0, (f"{name}: worst element {worst} got {got.flatten()[worst]:.6g} want "
                               f"{want.flatten()[worst]:.6g}, {used.max():.2f}x its budget "
                               f"(atol {atol}, rtol {rtol})")
    return float(used.max())


def planned_backend(B, T, C, n_head):
    """A CudaBackend with every op's scratch planned for (B, T, C, n_head), as a model plans it."""
    from distgpt.backends.cuda import CudaBackend
    backend = CudaBackend()
    backend.plan(B, T, C, n_head, "cuda")
    return backend


def twice_equal(fn, buffers):
    """Run fn on two clones of the same starting buffers: every result bitwise equal."""
    runs = []
    for _ in range(2):
        clones = [b.clone() for b in buffers]
        fn(*clones)
        runs.append(clones)
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"buffer {i} differs between two identical runs"
