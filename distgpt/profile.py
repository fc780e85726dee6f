"""`distgpt bench --profile`: where one training step's GPU time goes, kernel by kernel.

After bench's timed steps, a few more steps run under torch.profiler with CUDA activity on. CUPTI
traces every kernel in the CUDA context, whoever launched it: our CuPy RawModule kernels, cuBLASLt
matmuls, cuDNN attention, NCCL collectives, ATen copies. Each step is also timed with CUDA events,
as bench times it. The step's compute runs on torch's current stream (CuPy launches included), so
its kernels never overlap one another, and

    GPU idle = step time - sum of compute kernel (and memcpy/memset) times

is the time the compute stream waited: on the host between launches, or on a collective it
needs. NCCL's kernels run on the data-parallel layer's communication stream, beside the compute,
so they are reported (category nccl, and comm_ms) but not counted in the compute time.

The aggregation below is pure Python over (name, duration_us) pairs, so it is tested on CPU."""
import statistics

import torch

# (category, substrings of the kernel name); the first row with a matching substring wins, so the
# order matters: cuDNN's attention kernels carry GEMM-like words ('xmma', 'wgmma') and cuBLASLt's
# epilogue kernels can carry 'gelu'/'bias', hence attention, then matmul, before our own kernels.
CATEGORIES = (
    ("attention", ("fmha", "flash", "sdpa", "cudnn", "attention")),
    ("matmul", ("gemm", "gemv", "nvjet", "sm90_xmma", "cutlass", "Kernel2", "cublas", "splitKreduce")),
    ("nccl", ("nccl",)),
    ("layernorm", ("layernorm",)),
    ("gelu", ("gelu_",)),
    ("bias gradients", ("bias_backward",)),
    ("classifier", ("fused_classifier",)),
    ("fp8 casts", ("fp8_",)),  # fp8=true: the amax and cast passes (kernels/fp8.cu)
    ("adamw", ("adamw",)),
    ("global norm", ("global_norm", "clip_scale")),  # the norm and the clipping factor from it
    # the dwte scatter: our encoder kernels plus torch.sort's CUB radix sort of the tokens
    ("encoder", ("encoder", "RadixSort", "sortKeyValue")),
    ("copies", ("copy_", "Copy", "elementwise", "Memcpy", "Memset", "fill", "Fill")),
)
OTHER = "other"
NAME_WIDTH = 90  # characters of a kernel's name shown in the table (the JSON keeps all of it)


def categorize(name, table=CATEGORIES):
    """The first category in `table` whose pattern is a substring of `name` (case-sensitive)."""
    for category, patterns in table:
        if any(p in name for p in patterns):
            return category
    return OTHER


def short_name(name, width=NAME_WIDTH):
    """A kernel name for a table cell: demangled C++ names lose the leading 'void ', whitespace
    runs become one space, and a name past `width` keeps its start (where the kernel's identity
    is; template arguments and parameter lists come last) and ends in '...'."""
    name = " ".join(name.split())
    if name.startswith("void "):
        name = name[len("void "):]
    return name if len(name) <= width else name[:width - 3] + "..."


def summarize_kernels(events, n_steps, step_ms, top=15):
    """Per-step kernel time from profiler events.

    events: (name, duration_us) for every kernel/memcpy/memset of `n_steps` steps; step_ms: the
    mean step time on the GPU (CUDA events). Returns a JSON-ready dict: kernel_ms and idle_ms per
    step, categories sorted by time (ms per step, % of step), and the `top` kernels by total time
    (ms per step, calls per step, mean us per call)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}")
    by_name = {}  # name -> [total_us, calls]
    for name, dur_us in events:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += dur_us
        entry[1] += 1
    by_category = {}
    for name, (total_us, _) in by_name.items():
        category = categorize(name)
        by_category[category] = by_category.get(category, 0.0) + total_us
    kernel_ms = sum(total for total, _ in by_name.values()) / 1000 / n_steps
    comm_ms = by_category.get("nccl", 0.0) / 1000 / n_steps
    idle_ms = step_ms - (kernel_ms - comm_ms)

    def pct(ms):
        return 100 * ms / step_ms if step_ms > 0 else 0.0

    categories = [{"category": c, "ms": us / 1000 / n_steps, "pct": pct(us / 1000 / n_steps)}
                  for c, us in sorted(by_category.items(), key=lambda kv: (-kv[1], kv[0]))]
    ranked = sorted(by_name.items(), key=lambda kv: (-kv[1][0], kv[0]))
    kernels = [{"name": name, "category": categorize(name), "ms": total / 1000 / n_steps,
                "calls": calls / n_steps, "mean_us": total / calls}
               for name, (total, calls) in ranked[:top]]
    return {"steps": n_steps, "step_ms": step_ms, "kernel_ms": kernel_ms, "comm_ms": comm_ms,
            "idle_ms": idle_ms, "idle_pct": pct(idle_ms), "events": len(events), "distinct_kernels": len(by_name),
            "categories": categories, "kernels": kernels}


def _calls(x):
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def format_profile(prof):
    """Two markdown tables (per category; top kernels) and the step / kernel / idle line."""
    lines = ["| category | ms/step | % of step |", "|---|---:|---:|"]
    lines += [f"| {c['category']} | {c['ms']:.2f} | {c['pct']:.1f}% |" for c in prof["categories"]]
    lines += [f"| GPU idle | {prof['idle_ms']:.2f} | {prof['idle_pct']:.1f}% |", "",
              f"| top {len(prof['kernels'])} kernels | category | ms/step | calls/step | mean us |",
              "|---|---|---:|---:|---:|"]
    lines += [f"| {short_name(k['name']).replace('|', '/')} | {k['category']} | {k['ms']:.2f} | "
              f"{_calls(k['calls'])} | {k['mean_us']:.1f} |" for k in prof["kernels"]]
    timed = f" (timed median {prof['timed_step_ms']:.1f} ms)" if "timed_step_ms" in prof else ""
    comm = prof.get("comm_ms", 0.0)
    beside = (f" (NCCL {comm:.2f} ms of them on the communication stream, beside the compute)"
              if comm else "")
    lines += ["", f"step {prof['step_ms']:.2f} ms{timed}, kernels {prof['kernel_ms']:.2f} ms{beside}, "
              f"GPU idle {prof['idle_ms']:.2f} ms ({prof['idle_pct']:.1f}%) per step, mean of "
              f"{prof['steps']} profiled steps; idle is the compute stream's wait (host or collectives)"]
    return "\n".join(lines)


# what CUPTI reports as time on the GPU; everything else on a CUDA row (cuda_sync waits,
# gpu_user_annotation spans such as ProfilerStep#) would count a span twice or count waiting
DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_events(function_events):
    """(name, duration_us) for each kernel, memcpy and memset among torch.profiler's events."""
    from torch.autograd import DeviceType
    out = []
    for e in function_events:
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        kind = getattr(e, "activity_type", None) or None  # torch releases without it: by name
        if kind is not None and str(kind).lower() not in DEVICE_ACTIVITIES:
            continue
        if kind is None and (e.name.startswith("ProfilerStep") or e.name.endswith(" Sync")):
            continue
        out.append((e.name, e.time_range.elapsed_us()))
    return out


def profile_step_kernels(step_fn, n_steps, trace_path=None, top=15):
    """Run step_fn n_steps + 1 times under torch.profiler; the first run is the profiler's
    warm-up (CUPTI's start-up cost lands there and its events are dropped). Each step ends in a
    synchronize, so the recorded window holds exactly n_steps steps' kernels."""
    from torch.profiler import ProfilerActivity, profile, schedule

    times_ms = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=0, warmup=1, active=n_steps, repeat=1)) as prof:
        for i in range(n_steps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step_fn()
            end.record()
            torch.cuda.synchronize()
            if i >= 1:
                times_ms.append(start.elapsed_time(end))
            prof.step()
    if trace_path:
        prof.export_chrome_trace(str(trace_path))
    events = device_events(prof.events())
    if not events:
        raise RuntimeError("distgpt bench --profile: the profiler recorded no CUDA kernels; CUPTI may "
                           "be missing or in use by another profiler (nsys, ncu): run without them")
    result = summarize_kernels(events, n_steps, statistics.mean(times_ms), top)
    result["step_ms_each"] = times_ms
    return result
