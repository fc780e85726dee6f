"""The choices backends/cuda/matmul.py makes by timing, on the host (so they run on CPU): the check a
timed cuBLASLt candidate passes before it replaces the heuristic's first answer (_agrees), and
which dGELU form a shape takes (_dgelu_form, with the GPU timing stood in for)."""
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


def dgelu_choice(monkeypatch, times, dgelu="auto", capturing=False):
    """What Matmuls._dgelu_form picks when each form's timed run takes `times[form]` ms (the GPU
    timing stood in for), and how often each form was timed."""
    import distgpt.backends.cuda.matmul as matmul
    timed = []

    def fake_median_ms(run, warmup, repeats):
        timed.append(run.form)
        return times[run.form]

    def form(name):
        def run():
            raise AssertionError("choosing a form times it, it does not run it")
        run.form = name
        return run

    monkeypatch.setattr(matmul, "median_ms", fake_median_ms)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    mm = matmul.Matmuls(dgelu=dgelu)
    forms = {name: form(name) for name in times}
    first = mm._dgelu_form("shape", forms)
    again = mm._dgelu_form("shape", forms)
    assert again == first, "a shape keeps the form it was given"
    return first, timed


def test_dgelu_auto_takes_the_fastest_form_once_per_shape(monkeypatch):
    """At 350M the transposed weight's epilogue ran in 485 us against 771 for the stored
    layout's (H200, dgelu_layout_probe.py): "auto" takes it, having timed each form once."""
    chosen, timed = dgelu_choice(monkeypatch, {"fused": 0.771, "transposed": 0.49, "split": 0.65})
    assert chosen == "transposed" and sorted(timed) == ["fused", "split", "transposed"]
    chosen, _ = dgelu_choice(monkeypatch, {"fused": 0.771, "transposed": 0.80, "split": 0.65})
    assert chosen == "split"


def test_dgelu_auto_keeps_the_epilogue_unless_another_form_is_clearly_faster(monkeypatch):
    """Another form must time under SPLIT_MARGIN of the stored layout's epilogue: a 2% lead is
    timing noise, and the epilogue is what a deterministic run computes."""
    from distgpt.backends.cuda.matmul import SPLIT_MARGIN
    near = 0.5 * (1 + SPLIT_MARGIN)  # between the margin and even
    assert dgelu_choice(monkeypatch, {"fused": 1.0, "transposed": near, "split": 1.2})[0] == "fused"
    assert dgelu_choice(monkeypatch, {"fused": 1.0, "split": near})[0] == "fused"


def test_dgelu_named_form_is_taken_untimed_and_a_missing_one_refused(monkeypatch):
    import pytest
    chosen, timed = dgelu_choice(monkeypatch, {"fused": 1.0, "transposed": 0.5, "split": 0.6}, dgelu="split")
    assert chosen == "split" and timed == []
    with pytest.raises(ValueError, match="transpose_elements"):
        dgelu_choice(monkeypatch, {"fused": 1.0, "split": 0.6}, dgelu="transposed")


def test_dgelu_auto_inside_a_graph_capture_takes_the_epilogue_untimed(monkeypatch):
    """A capture must not synchronise, so nothing is timed there; the shape stays unmeasured."""
    chosen, timed = dgelu_choice(monkeypatch, {"fused": 1.0, "transposed": 0.5, "split": 0.6}, capturing=True)
    assert chosen == "fused" and timed == []
