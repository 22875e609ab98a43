"""Which target actor a batch goes to: the least busy ready one (actors/router.py's routers acquire and release).

A router waits while no target is ready; a target released as failed is lost, and the plan's count is restored.
The queue depth (routers waiting, and batches queued behind a target's current one) is what the control loop
(actors/control_loop.py) records and what tells it a measured rate is the plan's and not the input's.
"""
from __future__ import annotations

import threading
import time

from actors.actor_pool import Pools


class Routing:
    def __init__(self, pools: Pools, lock: threading.RLock):
        self.pools, self.lock = pools, lock
        self.waiting = 0  # routers waiting for a target

    def acquire(self, timeout_s: float = 3600.0) -> tuple[str, object]:
        """The least busy ready target (waits while none is ready)."""
        deadline = time.time() + timeout_s
        with self.lock:
            self.waiting += 1
        try:
            while True:
                with self.lock:
                    self.pools.refresh_ready()
                    ready = self.pools.targets.ready()
                    if not ready and not self.pools.targets.members:
                        self.pools.apply()  # every target was lost: start the plan's count again
                    if ready:
                        m = min(ready, key=lambda m: (m.inflight, m.batches))
                        m.inflight += 1
                        m.batches += 1
                        return m.id, m.handle
                if time.time() > deadline:
                    raise TimeoutError("no target actor became ready")
                time.sleep(0.05)
        finally:
            with self.lock:
                self.waiting -= 1

    def release(self, target_id: str, failed: str | None = None) -> None:
        """A batch is done on `target_id`; `failed`: the target was lost during it (the router redoes it)."""
        with self.lock:
            m = self.pools.targets.members.get(target_id)
            if m is None:
                return
            m.inflight -= 1
            if failed:
                self.pools.targets.lost(m, failed)
                self.pools.apply()

    def queue(self) -> int:
        """Batches waiting: routers waiting for a target, and batches queued behind a target's current one."""
        return self.waiting + sum(max(0, m.inflight - 1) for m in self.pools.targets.members.values())
