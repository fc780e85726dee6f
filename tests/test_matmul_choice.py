"""The check a timed cuBLASLt candidate passes before it replaces the heuristic's first answer
(backends/cuda/matmul.py, _agrees): pure torch on the host, so it runs on CPU."""
import torch

from distgpt.backends.cuda.matmul import _agrees


def bf16_neighbour(x, ulps):
    """x rounded to bf16, moved by `ulps` units in the last place (bf16 bit patterns as int16)."""
    bits = x.to(torch.bfloat16).view(torch.int16)
    return (bits + ulps).view(torch.bfloat16).float()


def test_results_one_ulp_apart_agree():
    torch.manual_seed(0)
    want = torch.randn(4096).to(torch.bfloat16).float()
    assert _agrees(bf16_neighbour(want, 1), want)
    assert _agrees(bf16_neighbour(want, -1), want)


def test_an_element_off_by_more_than_one_ulp_disagrees():
    torch.manual_seed(0)
    want = torch.randn(4096).to(torch.bfloat16).float()
    got = want.clone()
    big = int(want.abs().argmax())
    got[big] = bf16_neighbour(want[big:big + 1], 6)[0]  # 6 ulps: 2^-5 to 2^-4 relative
    assert not _agrees(got, want)
    got[big] = bf16_neighbour(want[big:big + 1], 2)[0]  # 2 ulps: what a less exact epilogue moves
    assert not _agrees(got, want)


def test_near_zero_results_are_judged_against_the_rms():
    """After cancellation an element can be tiny; a difference small next to the result's rms
    agrees, however large relative to the element itself."""
    want = torch.tensor([1.0, -1.0, 1e-6, 0.5])
    got = want.clone()
    got[2] = 3e-4  # 300x the element, 0.04% of the rms
    assert _agrees(got, want)
    got[2] = 0.05  # 6% of the rms
    assert not _agrees(got, want)


def test_non_finite_elements_must_match_in_place():
    want = torch.tensor([1.0, float("inf"), 2.0])
    assert _agrees(want.clone(), want)
    assert not _agrees(torch.tensor([1.0, float("nan"), 2.0]), want)
    assert not _agrees(torch.tensor([float("nan"), float("inf"), 2.0]), want)
