"""`distgpt bench --profile`'s aggregation, on synthetic profiler events (CPU only)."""
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from distgpt.bench import main as bench_main
from distgpt.profile import (CATEGORIES, OTHER, categorize, device_events, format_profile, short_name,
                             summarize_kernels)

# names as CUPTI reports them (demangled) on an H100, one or more per category
NAMES = {
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_"
    "segment_k_off_kernel__5x_cublas": "matmul",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>"
    "(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8::Params)": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n_tilesize128x128x64_epilogue_bias_gelu_aux": "matmul",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0":
        "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7_64x64x64_4x1x1_kernel0_0":
        "attention",
    "void flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128>, true>"
    "(Flash_bwd_params)": "attention",
    "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "nccl",
    "layernorm_forward_kernel_6": "layernorm",
    "layernorm_backward_reduce_kernel": "layernorm",
    "gelu_forward_kernel": "gelu",
    "gelu_backward_kernel": "gelu",
    "bias_backward_kernel": "bias gradients",
    "bias_backward_reduce_kernel": "bias gradients",
    "fused_classifier_kernel": "classifier",
    "adamw_kernel_bf16": "adamw",
    "global_norm_squared_reduce_kernel": "global norm",
    "clip_scale_kernel": "global norm",
    "encoder_backward_wte_kernel": "encoder",
    "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::"
    "DeviceRadixSortPolicy<int, long, unsigned int>::Policy900, false, int, long>(int*)": "encoder",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
    "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>(at::TensorIteratorBase&)>": "copies",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
    "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)": "copies",
    "Memcpy DtoD (Device -> Device)": "copies",
    "Memset (Device)": "copies",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>(at::native::ReduceOp<float>)":
        OTHER,
}


@pytest.mark.parametrize("name,category", NAMES.items())
def test_kernels_fall_in_their_category(name, category):
    assert categorize(name) == category


def test_category_table_is_ordered_pairs_of_distinct_names():
    names = [c for c, _ in CATEGORIES]
    assert len(names) == len(set(names)) and OTHER not in names
    assert names.index("attention") < names.index("matmul") < names.index("gelu")  # see CATEGORIES


def test_per_step_division_categories_and_idle():
    steps = 4
    events = []
    for _ in range(steps):
        events += [("nvjet_a", 1000.0), ("nvjet_a", 1000.0), ("nvjet_b", 500.0),
                   ("gelu_forward_kernel", 300.0), ("Memset (Device)", 2.0), ("mystery", 198.0)]
    prof = summarize_kernels(events, steps, step_ms=4.0)
    assert prof["steps"] == steps and prof["events"] == 6 * steps and prof["distinct_kernels"] == 5
    assert prof["kernel_ms"] == pytest.approx(3.0)
    assert prof["idle_ms"] == pytest.approx(1.0) and prof["idle_pct"] == pytest.approx(25.0)
    cats = {c["category"]: c for c in prof["categories"]}
    assert cats["matmul"]["ms"] == pytest.approx(2.5) and cats["matmul"]["pct"] == pytest.approx(62.5)
    assert cats["gelu"]["ms"] == pytest.approx(0.3)
    assert cats[OTHER]["ms"] == pytest.approx(0.198) and cats["copies"]["ms"] == pytest.approx(0.002)
    assert [c["category"] for c in prof["categories"]] == ["matmul", "gelu", OTHER, "copies"]  # by time
    top = prof["kernels"][0]
    assert top["name"] == "nvjet_a" and top["ms"] == pytest.approx(2.0)
    assert top["calls"] == pytest.approx(2.0) and top["mean_us"] == pytest.approx(1000.0)
    assert [k["name"] for k in prof["kernels"]] == ["nvjet_a", "nvjet_b", "gelu_forward_kernel", "mystery",
                                                  "Memset (Device)"]


def test_top_keeps_the_largest_and_ties_sort_by_name():
    events = [(f"k{i:02d}", float(i)) for i in range(40)] + [("b_tie", 7.0), ("a_tie", 7.0)]
    prof = summarize_kernels(events, 1, step_ms=1.0, top=15)
    names = [k["name"] for k in prof["kernels"]]
    assert names == [f"k{i:02d}" for i in range(39, 24, -1)]
    tie = summarize_kernels([("b_tie", 7.0), ("a_tie", 7.0)], 1, step_ms=1.0)
    assert [k["name"] for k in tie["kernels"]] == ["a_tie", "b_tie"]


def test_idle_goes_negative_rather_than_hiding_overlap():
    prof = summarize_kernels([("nvjet", 3000.0)], 1, step_ms=2.0)
    assert prof["idle_ms"] == pytest.approx(-1.0)


def test_collectives_beside_the_compute_are_not_counted_as_busy():
    """NCCL kernels run on the communication stream: the compute stream's idle time is the step
    less the other kernels."""
    events = [("nvjet", 3000.0), ("ncclDevKernel_Reduce_Sum_bf16_RING_LL", 1500.0)]
    prof = summarize_kernels(events, 1, step_ms=3.5)
    assert prof["kernel_ms"] == pytest.approx(4.5) and prof["comm_ms"] == pytest.approx(1.5)
    assert prof["idle_ms"] == pytest.approx(0.5)
    assert "NCCL 1.50 ms of them on the communication stream" in format_profile(prof)


def test_no_events_and_bad_step_count():
    prof = summarize_kernels([], 2, step_ms=5.0)
    assert prof["kernel_ms"] == 0 and prof["idle_ms"] == 5.0 and prof["categories"] == []
    with pytest.raises(ValueError):
        summarize_kernels([("x", 1.0)], 0, step_ms=1.0)


def test_short_names_keep_the_start():
    assert short_name("gelu_forward_kernel") == "gelu_forward_kernel"
    assert short_name("void  foo<int>(\n int)") == "foo<int>( int)"
    long = "void at::native::elementwise_kernel<128, 4, " + "x" * 300
    s = short_name(long, width=60)
    assert len(s) == 60 and s.startswith("at::native::elementwise_kernel<128, 4, ") and s.endswith("...")
    assert short_name("a" * 60, width=60) == "a" * 60


def test_format_has_both_tables_and_the_idle_line():
    name = "void at::native::elementwise_kernel<128, 4, a|b>(" + "y" * 200 + ")"
    prof = summarize_kernels([("nvjet_a", 3000.0), (name, 500.0), ("gelu_forward_kernel", 500.0)] * 2, 2,
                             step_ms=5.0)
    prof["timed_step_ms"] = 4.9
    text = format_profile(prof)
    assert "| category | ms/step | % of step |" in text
    assert "| matmul | 3.00 | 60.0% |" in text and "| GPU idle | 1.00 | 20.0% |" in text
    assert "| nvjet_a | matmul | 3.00 | 1 | 3000.0 |" in text
    row = next(line for line in text.splitlines() if "elementwise_kernel" in line)
    assert row.count("|") == 6 and "y" * 100 not in row  # escaped '|', truncated name
    assert "step 5.00 ms (timed median 4.9 ms), kernels 4.00 ms, GPU idle 1.00 ms (20.0%)" in text


def test_device_events_keep_kernels_memcpy_memset_only():
    def ev(name, kind, device=DeviceType.CUDA, dur=10.0, annotation=False):
        return SimpleNamespace(name=name, activity_type=kind, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: dur))
    events = [ev("nvjet_a", "kernel", dur=12.5), ev("Memcpy DtoD", "gpu_memcpy"), ev("Memset (Device)", "gpu_memset"),
              ev("Stream Sync", "cuda_sync"), ev("ProfilerStep#3", "gpu_user_annotation", annotation=True),
              ev("aten::mm", "cpu_op", device=DeviceType.CPU), ev("cudaLaunchKernel", "cuda_runtime", DeviceType.CPU)]
    assert device_events(events) == [("nvjet_a", 12.5), ("Memcpy DtoD", 10.0), ("Memset (Device)", 10.0)]
    old = [ev("nvjet_a", None), ev("Context Sync", None), ev("ProfilerStep*", None)]  # torch without activity_type
    assert device_events(old) == [("nvjet_a", 10.0)]


def test_bench_help_lists_the_profile_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--profile" in out and "--profile-steps" in out and "--profile-trace" in out


def test_bench_rejects_a_bad_profile_request_before_running(tmp_path, capsys):
    for argv in (["--profile", "--profile-steps", "0"], ["--profile-trace", str(tmp_path / "no" / "t.json")]):
        with pytest.raises(SystemExit) as exit_:
            bench_main(argv)
        assert exit_.value.code == 2


@pytest.mark.parametrize("argv", [["--fp8-scaling", "current"], ["--no-fp8-wgrad"], ["--fp8-wgrad"]])
def test_bench_fp8_settings_need_fp8(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        bench_main(argv)
    assert exit_.value.code == 2
    assert "need --fp8" in capsys.readouterr().err


def test_bench_fp8_label_names_what_departs_from_the_recipe():
    from distgpt.bench import fp8_label
    from distgpt.config import Config
    recipe = {"fp8": True, "fp8_weight_gradients": Config.fp8_weight_gradients, "fp8_scaling": Config.fp8_scaling}
    assert fp8_label(recipe) == " fp8"
    assert fp8_label({**recipe, "fp8": False}) == ""
    assert fp8_label({**recipe, "fp8_weight_gradients": False, "fp8_scaling": "current"}) == \
        " fp8, bf16 weight gradients, current scaling"
    assert Config.fp8_fuse_gelu and fp8_label({**recipe, "fp8_fuse_gelu": True}) == " fp8"
    assert fp8_label({**recipe, "fp8_fuse_gelu": False}) == " fp8, fc's gradient cast apart from the GELU derivative"
