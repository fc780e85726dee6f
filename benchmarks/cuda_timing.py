"""Timing one GPU call for the kernel benchmarks: CUDA events around each call, after warm-up
calls (compilation, plans, caches), the median of the repeats in milliseconds."""
import statistics

import torch


def median_ms(fn, warmup=5, repeats=20):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
