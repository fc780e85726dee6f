"""`distgpt bench`: time distgpt's full training step on synthetic tokens, on one GPU or,
under mpirun, on every rank's GPU with NCCL and ZeRO-1.

One step = `accum` micro-steps of forward + backward, then gradient reduction, global norm,
AdamW and the weight all-gather: the calls the trainer makes, and as the trainer does, the
next step is queued before the last one's loss is read. After warm-up each step is timed with
CUDA events; a step's time is the slowest rank's, and the median over steps is
reported with tokens/s (all ranks), MFU as llm.c counts it, and memory per GPU both as the
device sees it (cudaMemGetInfo) and as torch's allocator saw it. With several ranks it also
times the step's collectives alone (reduce-scatter + all-gather of the flat buffers).

With --profile, a few more steps then run under torch.profiler and the kernel time per step is
printed by category and by kernel, with the GPU idle time between launches (distgpt/profile.py).
They run after everything above is measured, so the profiler never touches the timed numbers."""
import argparse
import json
import statistics
import time
from collections import deque
from pathlib import Path

import torch

from distgpt.config import DGELU_FORMS, FP8_SWITCHES, Config, fp8_switch_notes, load_config
from distgpt.gpu_clock import GpuClocks, format_clocks

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)


def model_flops_per_token(num_params, n_layer, n_embd, T):
    """llm.c's count: 6 N for the matmuls plus 6 L C T for attention, per token."""
    return 6 * num_params + 6 * n_layer * n_embd * T


def peak_flops():
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)


def measure_distgpt(model_name, B, T, steps, warmup, recompute, accum=1, zero_stage=1, dist=None,
                    deterministic=False, profile_steps=0, profile_trace=None, cuda_graphs=True,
                    pause_s=0.0, rendezvous="", overlap="auto", bucket_mb=None, gather_in_forward="auto",
                    fp8=False, fp8_gradients="e4m3", tune_matmuls=True, recompute_layers=-1,
                    fp8_weight_gradients=None, fp8_scaling=None, fp8_switches=None, dgelu=None,
                    bias_column=None):
    from distgpt.backends import get_backend
    from distgpt.parallel.bootstrap import bootstrap
    from distgpt.model.gpt2 import GPT2
    from distgpt.model.micro_step import MicroStep
    from distgpt.optim import ShardedAdamW
    from distgpt.parallel.data_parallel import DataParallel, gather_in_forward_wanted, overlap_wanted

    # the fp8 settings left None are the config's defaults (the measured recipe), as in training;
    # fp8_switches: config.FP8_SWITCHES key -> True, False or None
    fp8_settings = {"fp8_weight_gradients": fp8_weight_gradients, "fp8_scaling": fp8_scaling, **(fp8_switches or {})}
    cfg = load_config([f"model={model_name}", f"train.micro_batch={B}", f"train.seq_len={T}",
                       f"train.recompute={recompute}", f"train.recompute_layers={recompute_layers}",
                       "backend=cuda", "device=cuda", "dtype=bfloat16",
                       *(f"{k}={str(v).lower()}" for k, v in fp8_settings.items() if v is not None)])
    fp8_weight_gradients, fp8_scaling = cfg.fp8_weight_gradients, cfg.fp8_scaling
    fp8_switches = {key: getattr(cfg, key) for key in FP8_SWITCHES}
    dist = dist or bootstrap("cuda", comm_timeout_s=cfg.comm_timeout_s, rendezvous=rendezvous)
    backend = get_backend("cuda")
    backend.set_deterministic(deterministic)
    backend.set_bias_column(bias_column or cfg.matmul_bias_column)  # before the model: its plan depends on it
    torch.cuda.reset_peak_memory_stats()
    model = GPT2(cfg.model, backend, B, T, torch.bfloat16, dist.device, recompute,
                 pad_multiple=dist.world, fp8=fp8, fp8_gradients=fp8_gradients, recompute_layers=recompute_layers,
                 fp8_weight_gradients=fp8_weight_gradients, fp8_scaling=fp8_scaling,
                 fp8_amax_history=cfg.fp8_amax_history, fp8_margin=cfg.fp8_margin, **fp8_switches)
    model.init_weights(cfg.seed)
    backend.set_dgelu(dgelu or cfg.matmul_dgelu)  # a pinned dGELU form runs untimed (matmul.py)
    if not tune_matmuls:  # cuBLASLt's first heuristic answer for every matmul (as deterministic runs)
        backend.matmuls.tune = False
    dp = DataParallel(dist.comm, model.layout, zero_stage, bucket_mb or cfg.bucket_mb,
                      model.grads.element_size(), dist.device)
    overlap = overlap_wanted(overlap, dist.nodes)
    gather_in_forward = dp.gather_in_forward = gather_in_forward_wanted(gather_in_forward, dist.nodes)
    optimizer = ShardedAdamW(model, dp, cfg.optim, backend)
    gen = torch.Generator(device=dist.device).manual_seed(1000 + dist.rank)  # each rank its own tokens
    x = torch.randint(0, cfg.model.vocab_size, (accum, B, T), device=dist.device, generator=gen)
    y = torch.randint(0, cfg.model.vocab_size, (accum, B, T), device=dist.device, generator=gen)
    dloss = 1.0 / (accum * B * T * dist.world)

    micro_step = MicroStep(model, use_graph=cuda_graphs)

    def step():
        model.zero_grad(matrices=False)  # as the trainer: the first micro-step's backward writes them
        loss = torch.zeros((), device=dist.device)
        for micro in range(accum):
            loss += micro_step(x[micro], y[micro], dloss, *dp.micro_step_hooks(micro, accum, overlap),
                               fresh_weights=micro == 0, write_matrices=micro == 0)
        dp.reduce_gradients(model.grads)
        optimizer.step(1e-4)
        dp.gather_weights(model.params)
        return loss

    # as the trainer runs: the next step is queued before the last one's loss is read (through a
    # pinned copy and its event, not a read of the device tensor, which would wait for the queued
    # step too), so the host's work between steps does not idle the GPU; each step's time is
    # its own start and end events'
    times, losses = [], []
    clocks = GpuClocks(dist.device)  # the SM clock the timed steps ran at: cards of one kind differ
    host_loss = [torch.zeros((), dtype=torch.float32).pin_memory() for _ in range(2)]
    in_flight = deque()

    def read_oldest():
        i, start, end, slot = in_flight.popleft()
        end.synchronize()
        losses.append(host_loss[slot].item() / accum)
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
            clocks.sample()  # the next step is running meanwhile

    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        host_loss[i % 2].copy_(loss, non_blocking=True)
        end.record()
        in_flight.append((i, start, end, i % 2))
        if pause_s:  # the GPU idles between steps: a step faster this way is held back by power or heat
            read_oldest()
            time.sleep(pause_s)
        elif len(in_flight) == 2:
            read_oldest()
    while in_flight:
        read_oldest()
    comm_s, reduce_s, gather_s = time_collectives(model, dp, dist) if dist.world > 1 else (0.0, 0.0, 0.0)
    # the same step with every collective skipped, on the same GPUs: what the step costs without
    # communication, so (step - this) is the communication the step exposes. Ranks run unsynchronised
    # here, so each times its own steps and the slowest rank's median counts.
    local_s = time_without_collectives(step, dp, steps) if dist.world > 1 else 0.0
    free, total = torch.cuda.mem_get_info()
    torch_peak_gb = torch.cuda.max_memory_allocated() / 1e9
    profile = None
    if profile_steps:  # last, when every number above is taken; every rank steps (collectives)
        from distgpt.profile import profile_step_kernels
        profile = profile_step_kernels(step, profile_steps, profile_trace if dist.is_main else None)
    mine = {"times": times, "device_used_gb": (total - free) / 1e9, "torch_peak_gb": torch_peak_gb,
            "comm_s": comm_s, "reduce_s": reduce_s, "gather_s": gather_s, "local_s": local_s}
    if profile is not None and dist.world > 1:  # every rank's categories: where a straggler spends
        mine["profile"] = {k: profile[k] for k in ("step_ms", "kernel_ms", "idle_ms", "categories")}
    ranks = dist.comm.all_gather_object(mine)
    slowest = [max(r["times"][i] for r in ranks) for i in range(steps)]
    if profile is not None:
        profile["timed_step_ms"] = 1000 * statistics.median(times)  # this rank's, as the profile is
    extra = {} if profile is None else {"profile": profile}
    if profile is not None and dist.world > 1:
        extra["rank_profiles"] = [r["profile"] for r in ranks]
    return {"impl": "distgpt", "model": model_name, "B": B, "T": T, "recompute": recompute,
            "recompute_layers": recompute_layers,
            "accum": accum, "world": dist.world, "zero_stage": zero_stage, "deterministic": deterministic,
            "cuda_graphs": cuda_graphs, "fp8": fp8, "fp8_weight_gradients": fp8_weight_gradients, "fp8_scaling": fp8_scaling, **fp8_switches, "tune_matmuls": backend.matmuls.tune,
            "dgelu": backend.matmuls.dgelu, "dgelu_choices": backend.matmuls.dgelu_report(), "bias_column": model.ones_column, "overlap": overlap, "gather_in_forward": gather_in_forward, "buckets": len(dp.buckets), "step_s": statistics.median(slowest), "steps": steps,
            "step_ms_each": [round(1000 * t, 3) for t in slowest], "pause_s": pause_s,
            "num_params": model.num_parameters, "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
            "device_used_gb": max(r["device_used_gb"] for r in ranks),
            "torch_peak_gb": max(r["torch_peak_gb"] for r in ranks),
            "comm_s": max(r["comm_s"] for r in ranks),
            "reduce_s": max(r["reduce_s"] for r in ranks), "gather_s": max(r["gather_s"] for r in ranks),
            "local_step_s": max(r["local_s"] for r in ranks),
            "rank_step_s": [statistics.median(r["times"]) for r in ranks],
            "first_loss": losses[0], "last_loss": losses[-1], "is_main": dist.is_main, **clocks.summary(), **extra}


def time_collectives(model, dp, dist, repeats=10):
    """Median times of one step's collectives alone, one after the other: (all of them, the
    gradient buckets' reductions (all-reduces at zero_stage 0), the updated weights' way back
    (zero_stage 1))."""
    samples = []
    for _ in range(repeats):
        dist.comm.barrier()
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        dp.reduce_gradients(model.grads)
        middle.record()
        dp.gather_weights(model.params)
        dp.complete_gather(model.params)  # gather_in_forward: what the next forward would gather
        end.record()
        torch.cuda.synchronize()
        samples.append((start.elapsed_time(end) / 1000, start.elapsed_time(middle) / 1000,
                        middle.elapsed_time(end) / 1000))
    return tuple(statistics.median(column) for column in zip(*samples))


def time_without_collectives(step, dp, steps):
    """Median time of `steps` steps with the data-parallel layer's collectives skipped (each
    rank's own; the weights drift apart meanwhile, so this runs after every other measurement
    except the profile, whose steps are timing-only too)."""
    samples = []
    dp.communicate = False
    try:
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1000)
    finally:
        dp.communicate = True
    return statistics.median(samples)


def fp8_label(r):
    """' fp8' and what of the recipe is not the default, for a result printed as one line."""
    if not r["fp8"]:
        return ""
    return (" fp8" + ("" if r["fp8_weight_gradients"] else ", bf16 weight gradients")
            + ("" if r["fp8_scaling"] == "delayed" else f", {r['fp8_scaling']} scaling")
            + "".join(f", {note}" for note in fp8_switch_notes(r)))


def summarize(result):
    tokens = result["B"] * result["T"] * result.get("accum", 1) * result.get("world", 1)
    result["tok_s"] = tokens / result["step_s"]
    result["mfu"] = result["tok_s"] / result.get("world", 1) * model_flops_per_token(
        result["num_params"], result["n_layer"], result["n_embd"], result["T"]) / peak_flops()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="distgpt bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2_124m")
    p.add_argument("--batch", type=int, default=64, help="micro-batch per GPU")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--recompute", type=int, default=0)
    p.add_argument("--recompute-layers", type=int, default=-1, metavar="N",
                   help="only the first N layers recompute at --recompute, the others one level less "
                        "(train.recompute_layers; -1: every layer)")
    p.add_argument("--deterministic", action="store_true", help="the bitwise-reproducible attention backward")
    p.add_argument("--no-graphs", action="store_true", help="launch every kernel from Python (no CUDA graph)")
    p.add_argument("--fp8", action="store_true", help="the blocks' matmuls with fp8 operands (fp8=true)")
    p.add_argument("--fp8-gradients", choices=("e4m3", "e5m2"), default="e4m3", help="with --fp8: fp8_gradients")
    p.add_argument("--fp8-wgrad", action=argparse.BooleanOptionalAction, default=None,
                   help="with --fp8: the block matmuls' weight gradients as fp8 products or not "
                        "(fp8_weight_gradients; default: the config's, true)")
    p.add_argument("--fp8-scaling", choices=("current", "delayed"), default=None,
                   help="with --fp8: fp8_scaling (default: the config's, delayed: scales from past "
                        "amaxes where a cast would need its own amax pass)")
    for key, (does, _, _) in FP8_SWITCHES.items():
        p.add_argument(f"--{key.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                       help=f"with --fp8: {does} ({key}; default: the config's, {str(getattr(Config, key)).lower()})")
    p.add_argument("--no-tune", action="store_true",
                   help="every matmul takes cuBLASLt's first heuristic answer, untimed (as deterministic runs do)")
    p.add_argument("--dgelu", choices=DGELU_FORMS, default=None,
                   help="the fc projection's input gradient with the GELU derivative: cuBLASLt's DGELU "
                        "epilogue on the stored weight (fused), on its transpose (transposed), or the plain "
                        "product and our GELU-derivative kernel (split); default: the config's matmul_dgelu, "
                        "auto: each timed once per shape (fused when --deterministic)")
    p.add_argument("--bias-column", choices=("auto", "true", "false"), default=None,
                   help="the fc and qkv bias gradients from their weight-gradient products over ones "
                        "columns (true) or a column-sum pass (false); default: the config's "
                        "matmul_bias_column, auto: up to 1024 channels (124M, 350M)")
    p.add_argument("--overlap", choices=("auto", "true", "false"), default="auto",
                   help="sum each gradient bucket over ranks during the backward (overlap_comm; auto: "
                        "when the ranks span nodes or NCCL runs over its socket transport)")
    p.add_argument("--bucket-mb", type=float, default=None, help="gradient bucket size (bucket_mb, 25)")
    p.add_argument("--gather-in-forward", choices=("auto", "true", "false"), default="auto", nargs="?",
                   const="true", help="zero_stage=1: all-gather the updated weights during the next forward "
                                      "(gather_in_forward; auto: as --overlap auto; the bare flag: true)")
    p.add_argument("--pause-ms", type=float, default=0.0,
                   help="idle the GPU this long between timed steps (a step that is faster so is "
                        "held back by the GPU's power or clock limits, not by the code)")
    p.add_argument("--rendezvous", default="", metavar="file:DIR|tcp:HOST:PORT",
                   help="ranks started without MPI (RANK/WORLD_SIZE/LOCAL_RANK set) meet here")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile a few more: kernel time per step by category "
                        "and by kernel, and the GPU idle time (rank 0's)")
    p.add_argument("--profile-steps", type=int, default=5, metavar="K", help="steps to profile (default 5)")
    p.add_argument("--profile-trace", metavar="PATH",
                   help="also write rank 0's chrome trace of the profiled steps (implies --profile)")
    a = p.parse_args(argv)
    if a.profile_steps < 1:
        p.error("--profile-steps must be at least 1")
    fp8_switches = {key: getattr(a, key) for key in FP8_SWITCHES}
    if (a.fp8_wgrad is not None or a.fp8_scaling is not None or any(v is not None for v in fp8_switches.values())) \
            and not a.fp8:
        p.error("--fp8-wgrad, --no-fp8-wgrad, --fp8-scaling and "
                + ", ".join(f"--[no-]{key.replace('_', '-')}" for key in FP8_SWITCHES) + " need --fp8")
    if a.profile_trace and not Path(a.profile_trace).resolve().parent.is_dir():
        p.error(f"--profile-trace: no directory {Path(a.profile_trace).resolve().parent}")
    if not torch.cuda.is_available():
        from distgpt.config import ConfigError
        raise ConfigError("distgpt bench times the CUDA step and needs an NVIDIA GPU (none is visible); "
                          "run it on a GPU machine")
    profile_steps = a.profile_steps if a.profile or a.profile_trace else 0
    r = summarize(measure_distgpt(a.model, a.batch, a.seq, a.steps, a.warmup, a.recompute,
                                  a.accum, a.zero_stage, deterministic=a.deterministic,
                                  profile_steps=profile_steps, profile_trace=a.profile_trace,
                                  cuda_graphs=not a.no_graphs, pause_s=a.pause_ms / 1000,
                                  rendezvous=a.rendezvous, overlap=a.overlap,
                                  bucket_mb=a.bucket_mb, gather_in_forward=a.gather_in_forward, fp8=a.fp8,
                                  fp8_gradients=a.fp8_gradients, tune_matmuls=not a.no_tune,
                                  recompute_layers=a.recompute_layers, fp8_weight_gradients=a.fp8_wgrad,
                                  fp8_scaling=a.fp8_scaling, fp8_switches=fp8_switches, dgelu=a.dgelu,
                                  bias_column=a.bias_column))
    if not r.pop("is_main"):
        return 0
    if a.json:
        print(json.dumps(r), flush=True)
    else:
        per_gpu = f" ({r['tok_s'] / r['world']:,.0f} per GPU)" if r["world"] > 1 else ""
        comm = (f", collectives alone {r['comm_s'] * 1000:.1f} ms (gradients {r['reduce_s'] * 1000:.1f}, "
                f"weights {r['gather_s'] * 1000:.1f}), the step without them "
                f"{r['local_step_s'] * 1000:.1f} ms (exposed {1000 * (r['step_s'] - r['local_step_s']):.1f} ms)"
                if r["world"] > 1 else "")
        print(f"{r['model']}{fp8_label(r)} {r['world']} GPU(s) B={r['B']} T={r['T']} accum={r['accum']}: "
              f"{r['step_s'] * 1000:.1f} ms/step, {r['tok_s']:,.0f} tok/s{per_gpu}, MFU {100 * r['mfu']:.1f}%, "
              f"device memory {r['device_used_gb']:.1f} GB/GPU (torch peak {r['torch_peak_gb']:.1f} GB)"
              f"{format_clocks(r)}{comm}, "
              f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
        from distgpt.backends.cuda.matmul import dgelu_line
        for choice in r["dgelu_choices"]:
            print(dgelu_line(choice), flush=True)
        print("fc and qkv bias gradients: " + ("from the weight-gradient products (ones columns)" if r["bias_column"]
                                               else "column sums"), flush=True)
        if "profile" in r:
            from distgpt.profile import format_profile
            rank = " (rank 0)" if r["world"] > 1 else ""
            print(f"\nKernel time per step on {torch.cuda.get_device_name()}{rank}, "
                  f"{r['profile']['steps']} steps under torch.profiler after the timed ones:\n", flush=True)
            print(format_profile(r["profile"]), flush=True)
            for rank, prof in enumerate(r.get("rank_profiles", [])):
                cats = ", ".join(f"{c['category']} {c['ms']:.2f}" for c in prof["categories"])
                print(f"rank {rank}: step {prof['step_ms']:.2f} ms, kernels {prof['kernel_ms']:.2f}, "
                      f"idle {prof['idle_ms']:.2f}: {cats}", flush=True)
            if a.profile_trace:
                print(f"chrome trace: {a.profile_trace}", flush=True)
    return 0
