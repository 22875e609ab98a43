"""Milliseconds a call takes on a CUDA device: warmed up, then timed with CUDA events over `reps` calls (the host
waits once, at the end)."""
from __future__ import annotations

import torch


def cuda_ms(f, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
