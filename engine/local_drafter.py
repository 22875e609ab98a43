"""The part of the drafter interface (engine/drafter.py's docstring) that a drafter in the engine's own process
shares: submit drafts at once and collect hands the result back, so nothing overlaps. ModelDrafter and
NgramDrafter build on it; a remote drafter (actors/drafter_channel.py) has its own."""
from __future__ import annotations

from engine.device_io import Clock, Span
from engine.request import SamplingParams


class LocalDrafter:
    """submit/collect for a drafter in the engine's own process: it drafts at once (nothing overlaps). Its time is
    a Span (engine/device_io.py), read after the round's readback: timing it makes the host wait for nothing."""
    remote = False
    device = "cpu"  # where its drafts are made (a subclass on CUDA sets its own)

    def submit(self, histories: list[list[int]], k: int, params: SamplingParams):
        clock = Clock(self.device)
        start = clock.mark()
        drafts, num, probs = self.propose(histories, k, params)
        return drafts, num, probs, Span(clock, start, clock.mark())

    def collect(self, handle):
        return handle
