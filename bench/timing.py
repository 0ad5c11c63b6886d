"""Timing helpers for the benchmark: wall clock around synchronised device work, medians, GPU-busy time."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable, *args, **kwargs) -> tuple[float, object]:
    """Seconds `fn` takes including the device work it queued, and its result."""
    sync(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - start, result


def repeat(device: str, fn: Callable, *, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        timed(device, fn)
    return [timed(device, fn)[0] for _ in range(repeats)]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def gpu_kernel_seconds(device: str, fn: Callable) -> tuple[float, float | None]:
    """(wall seconds, seconds the GPU spent in kernels) for one call; kernel time is None off CUDA.

    wall much larger than kernel time means the GPU waits on Python and launches: overhead-bound, not compute-bound.
    """
    if not device.startswith("cuda"):
        return timed(device, fn)[0], None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = timed(device, fn)
    kernel_us = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    return wall, kernel_us / 1e6


def peak_memory(device: str) -> dict | None:
    """Peak bytes the torch allocator held since the last reset (GB), or None off CUDA."""
    if not device.startswith("cuda"):
        return None
    import torch

    return {"allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
            "reserved_gb": torch.cuda.max_memory_reserved() / 1e9}


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
