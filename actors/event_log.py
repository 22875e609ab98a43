"""The pools' record of what they did and why: events stamped with the seconds since the pools started.

Every part of the pool manager (actors/pool_manager.py) writes to the one log, so `report()["events"]` is a single
timeline: plan, start, ready, drain, undrain, remove, lost, measured, request_resources_failed, control_error.
"""
from __future__ import annotations

import time


class EventLog:
    def __init__(self) -> None:
        self.t0 = time.time()
        self.events: list[dict] = []

    def now(self) -> float:
        """Seconds since the pools started (the time axis of events and samples)."""
        return round(time.time() - self.t0, 3)

    def add(self, kind: str, **info) -> None:
        self.events.append({"t": self.now(), "event": kind, **info})
