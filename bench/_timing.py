"""Shared CUDA timing for the benchmarks (imported by the bench scripts, which run as ``python bench/<name>.py``)."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def time_calls(fn: Callable[[], object], warmup: int, iters: int) -> dict[str, float]:
    """Median / min milliseconds per call (CUDA events) and peak memory (GiB) over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms_median": statistics.median(times), "ms_min": min(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def time_us(fn: Callable[[], object], iters: int) -> float:
    """Mean microseconds per call over ``iters`` replays of a CUDA graph of ``fn`` (launch overhead not counted)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()  # compile / choose kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters
