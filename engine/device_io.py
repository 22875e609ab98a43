"""The few values a round moves between the host and the device, and the timing of its phases, done so that the
host waits for the device once a round at most.

A speculative round needs, on the host, what each row accepted (to extend its tokens, check EOS and stop strings,
and plan the next round), and, on the device, each row's last token and cache length. The host knows the lengths
from its own bookkeeping, so nothing is read back to size a forward; the last tokens and lengths go up as one
pinned, non-blocking copy (the host does not wait for it); and the round's results come back as one packed copy:
the round's single wait. Phases are timed with CUDA events on CUDA (read once that wait is over, so timing adds no
wait of its own), and with the host's clock elsewhere, where the work is done when the call returns.
"""
from __future__ import annotations

import time

import torch


def upload(rows: list[list[int]], device: str) -> torch.Tensor:
    """Host ints, rows of equal length -> a long tensor [rows, n] on `device`; on CUDA from pinned memory, without
    the host waiting for the copy."""
    t = torch.tensor(rows, dtype=torch.long)
    if device == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def readback(*tensors: torch.Tensor) -> list[list[int]]:
    """Integer tensors on the device -> a flat list of ints per tensor, in one device-to-host copy."""
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).tolist()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()])
        i += t.numel()
    return out


class Clock:
    """Marks in the device's stream of work; the seconds between two marks are read once their work is done."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


class Span:
    """Two marks of a Clock: the seconds between them, read once their work is done."""

    def __init__(self, clock: Clock, start, end):
        self.clock, self.start, self.end = clock, start, end

    @property
    def seconds(self) -> float:
        return self.clock.seconds(self.start, self.end)
