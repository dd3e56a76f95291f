"""Timing helper shared by the model-level benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of `fn()` over `reps` runs after `warmup` runs (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpu_kernel_ms(step: Callable[[], object], steps: int = 5) -> float:
    """Milliseconds of CUDA kernel time per `step()` (torch.profiler sum), without host launch gaps.

    Where a call is short enough that the host's launch cost exceeds the GPU's work (small shapes on
    a slow host), event timings measure the host; this measures what the GPU spent.
    """
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return total_us / steps / 1e3
