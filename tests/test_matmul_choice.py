"""The choices backends/cuda/matmul.py makes by timing, on the host (so they run on CPU): the check a
timed cuBLASLt candidate passes before it replaces the heuristic's first answer (_agrees), and
which dGELU form a shape takes (_dgelu_form, with the GPU timing stood in for)."""
import pytest
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


def dgelu_choice(monkeypatch, times, dgelu="auto", capturing=False, report=None):
    """What Matmuls._dgelu_form picks when each form's timed runs take `times[form]` ms (the GPU
    timing stood in for), and which forms were timed. report: a list that gets dgelu_report()."""
    import distgpt.backends.cuda.matmul as matmul
    timed = []

    def fake_interleaved_median_ms(fns, warmup, rounds, repeats):
        assert rounds >= 2, "the forms are timed in turns, over more than one round"
        timed.extend(run.form for run in fns.values())
        return {name: times[run.form] for name, run in fns.items()}

    def form(name):
        def run():
            raise AssertionError("choosing a form times it, it does not run it")
        run.form = name
        return run

    monkeypatch.setattr(matmul, "interleaved_median_ms", fake_interleaved_median_ms)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    mm = matmul.Matmuls(dgelu=dgelu)
    forms = {name: form(name) for name in times}
    key = (0, 0, 0, 6400, 16384, 1600)  # a plan key's (..., cols, rows, inner) as matmul.py makes it
    first = mm._dgelu_form(key, forms)
    again = mm._dgelu_form(key, forms)
    assert again == first, "a shape keeps the form it was given"
    if report is not None:
        report.extend(mm.dgelu_report())
    return first, timed


def test_dgelu_auto_takes_the_fastest_form_once_per_shape(monkeypatch):
    """At 350M the transposed weight's epilogue ran in 485 us against 771 for the stored
    layout's (H200, dgelu_layout_probe.py): "auto" takes it, having timed each form once."""
    chosen, timed = dgelu_choice(monkeypatch, {"fused": 0.771, "transposed": 0.49, "split": 0.65})
    assert chosen == "transposed" and sorted(timed) == ["fused", "split", "transposed"]
    chosen, _ = dgelu_choice(monkeypatch, {"fused": 0.771, "transposed": 0.80, "split": 0.60})
    assert chosen == "split"


def test_dgelu_auto_keeps_the_epilogue_at_1558m_and_takes_the_transpose_at_350m(monkeypatch):
    """The forms' times alone on an H100 (2026-12-05): at 1558M split and transposed ran 1.15x and
    1.10x the epilogue, whose step was the fastest; at 350M transposed 0.65x, split 0.80x, and
    the transposed form's step the fastest of the three."""
    assert dgelu_choice(monkeypatch, {"fused": 0.604, "split": 0.695, "transposed": 0.664})[0] == "fused"
    assert dgelu_choice(monkeypatch, {"fused": 0.800, "split": 0.644, "transposed": 0.520})[0] == "transposed"


def test_dgelu_report_names_the_shape_the_choice_and_every_forms_time(monkeypatch):
    report = []
    dgelu_choice(monkeypatch, {"fused": 0.604, "split": 0.695, "transposed": 0.664}, report=report)
    assert report == [{"rows": 16384, "cols": 6400, "inner": 1600, "form": "fused",
                       "us": {"fused": 604.0, "split": 695.0, "transposed": 664.0}}]


def test_dgelu_auto_keeps_the_epilogue_unless_another_form_is_clearly_faster(monkeypatch):
    """Another form must time under SPLIT_MARGIN of the stored layout's epilogue: a lead of a few
    percent timed alone did not hold inside the step on a power-capped H100, and the epilogue is
    what a deterministic run computes."""
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
    report = []
    chosen, timed = dgelu_choice(monkeypatch, {"fused": 1.0, "transposed": 0.5, "split": 0.6}, capturing=True,
                                 report=report)
    assert chosen == "fused" and timed == [] and report == []


def test_interleaved_timing_spreads_a_slow_stretch_over_every_function(monkeypatch):
    """A slow stretch of the GPU as long as one function's repeats: timed one after the other it
    would land on a single function (its median then 1.5x its time); timed in turns over three
    rounds it is a third of that function's samples, and every median is its true time."""
    import distgpt.backends.cuda.runtime as runtime
    true_ms = {"a": 1.0, "b": 0.9}
    calls = []

    def fake_event_ms(fn):
        calls.append(fn.name)
        slow = 5 <= len(calls) <= 9  # calls 5-9 run at 1.5x
        return true_ms[fn.name] * (1.5 if slow else 1.0)

    def fn(name):
        def run():
            pass
        run.name = name
        return run

    monkeypatch.setattr(runtime, "event_ms", fake_event_ms)
    got = runtime.interleaved_median_ms({"a": fn("a"), "b": fn("b")}, warmup=1, rounds=3, repeats=5)
    assert got == true_ms
    assert calls[:10] == ["a"] * 5 + ["b"] * 5 and len(calls) == 30  # in turns: a, b, a, b, a, b


def test_dgelu_mode_a_pinned_form_wins_else_deterministic_runs_take_the_epilogue():
    import pytest
    from distgpt.backends.cuda.matmul import Matmuls
    assert Matmuls.dgelu_mode("auto", deterministic=False) == "auto"
    assert Matmuls.dgelu_mode("auto", deterministic=True) == "fused"
    # a pinned form is one fixed computation, so a deterministic run may take it too
    assert Matmuls.dgelu_mode("split", deterministic=True) == "split"
    assert Matmuls.dgelu_mode("transposed", deterministic=False) == "transposed"
    with pytest.raises(ValueError, match="choose one of auto, fused, transposed, split"):
        Matmuls.dgelu_mode("epilogue", deterministic=False)


def test_cuda_backend_keeps_a_pinned_dgelu_form_across_plan_and_the_deterministic_switch(monkeypatch):
    """matmul_dgelu reaches the Matmuls whether it is set before plan() (the trainer) or after,
    and set_deterministic no longer undoes it; auto goes back to timing (or fused when
    deterministic). The backend is made with CUDA faked as present: nothing here touches a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from distgpt.backends.cuda import CudaBackend
    backend = CudaBackend()
    backend.set_dgelu("split")  # before plan(), as the trainer sets it
    backend.matmuls = backend.make_matmuls()  # what plan() makes
    assert backend.matmuls.dgelu == "split" and backend.matmuls.tune is True
    backend.set_deterministic(True)
    assert backend.matmuls.dgelu == "split" and backend.matmuls.tune is False
    backend.set_dgelu("auto")
    assert backend.matmuls.dgelu == "fused"
    backend.set_deterministic(False)
    assert backend.matmuls.dgelu == "auto" and backend.matmuls.tune is True


def test_cuda_backend_takes_the_bias_column_up_to_its_width(monkeypatch):
    """matmul_bias_column=auto: ones columns up to 1024 channels (124M and 350M at any batch, not
    1558M); true and false pin it either way, and the scratch estimate follows (the fp32 product
    of fc's weight gradient, 4C x (C + 8)). No GPU is touched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import distgpt.backends.cuda as cuda
    monkeypatch.setattr(cuda, "sm_count", lambda device: 132)  # the estimate's partials: an H100's SMs
    from distgpt.backends.cuda import CudaBackend
    backend = CudaBackend()
    assert backend.takes_bias_column(8 * 1024, 768) and backend.takes_bias_column(32 * 1024, 1024)
    assert not backend.takes_bias_column(16 * 1024, 1600) and not backend.takes_bias_column(64 * 1024, 1280)

    def planned(B, C):
        return dict(backend.estimate_scratch(B, 1024, C, 12, "cuda")).get("bias-column products", 0)
    assert planned(64, 768) == 4 * 4 * 768 * (768 + 8) and planned(16, 1600) == 0
    backend.set_bias_column("true")
    assert backend.takes_bias_column(1, 1600) and planned(16, 1600) == 4 * 4 * 1600 * 1608
    backend.set_bias_column(False)  # Hydra may hand over a bool
    assert not backend.takes_bias_column(64 * 1024, 768) and planned(64, 768) == 0
    with pytest.raises(ValueError, match="matmul_bias_column=sometimes: choose one of auto, true, false"):
        backend.set_bias_column("sometimes")


def test_cuda_backend_reports_the_timed_dgelu_choice_as_one_line(monkeypatch):
    import distgpt.backends.cuda.matmul as matmul
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(matmul, "interleaved_median_ms",
                        lambda fns, warmup, rounds, repeats: {"fused": 0.6093, "split": 0.7376})
    from distgpt.backends.cuda import CudaBackend
    backend = CudaBackend()
    assert backend.timed_choices() == []  # before plan()
    backend.matmuls = backend.make_matmuls()
    assert backend.timed_choices() == []  # nothing timed yet
    backend.matmuls._dgelu_form((0, 0, 0, 6400, 16384, 1600), {"fused": None, "split": None})
    assert backend.timed_choices() == ["dGELU product (16384 x 6400 from 1600): fused "
                                       "(timed: fused 609 us, split 738 us)"]


def test_sustained_timing_runs_each_function_in_bursts_in_turns_and_skips_what_does_not_run(monkeypatch):
    """Each function runs burst_ms / its isolated time calls untimed, then as many timed, in turns
    over the rounds; the result is its time a call in the timed bursts (here a clock that each call
    advances by the function's time under load, unlike its isolated time), and a function whose
    isolated time is inf is never called."""
    import distgpt.backends.cuda.runtime as runtime
    clock, calls = [0.0], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    def fn(name, loaded_ms):
        def run():
            calls.append(name)
            clock[0] += loaded_ms
        return run

    monkeypatch.setattr(runtime.torch.cuda, "Event", FakeEvent)
    fns = [fn("a", 0.6), fn("b", 0.45), fn("c", 9.0)]
    got = runtime.sustained_median_ms(fns, [0.5, 0.5, float("inf")], burst_ms=10.0, rounds=3)
    assert got[0] == pytest.approx(0.6) and got[1] == pytest.approx(0.45) and got[2] == float("inf")
    assert calls == (["a"] * 40 + ["b"] * 40) * 3  # 10 / 0.5 = 20 untimed, then 20 timed, each round
