"""The part of the drafter interface (engine/drafter.py's docstring) that a drafter in the engine's own process
shares: submit drafts at once and collect hands the result back, so nothing overlaps. ModelDrafter and
NgramDrafter build on it; a remote drafter (actors/drafter_channel.py) has its own."""
from __future__ import annotations

import time

import torch

from engine.request import SamplingParams


class LocalDrafter:
    """submit/collect for a drafter in the engine's own process: it drafts at once (nothing overlaps)."""
    remote = False

    def submit(self, histories: list[list[int]], k: int, params: SamplingParams):
        t0 = time.perf_counter()
        drafts, num, probs = self.propose(histories, k, params)
        if drafts.device.type == "cuda":
            torch.cuda.synchronize()
        return drafts, num, probs, time.perf_counter() - t0

    def collect(self, handle):
        return handle
