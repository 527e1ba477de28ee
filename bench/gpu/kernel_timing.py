"""GPU time of one kernel-sized call, for the kernel benchmarks (attention.py, quantize_kernels.py).
Whole requests are timed by wall clock instead (runtime_bench.timed)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def cuda_ms(fn: Callable[[], object], calls: int = 20, repeats: int = 7, warmup: int = 3) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back calls, in milliseconds, by
    CUDA events: calls this short are launched faster than they run, so the events time the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)
