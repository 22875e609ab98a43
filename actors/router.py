"""The generate stage of a disaggregated job (a Ray Data UDF, pipeline/stages.py): routers handing each batch to
a target actor the pool manager (actors/pool_manager.py) picks."""
from __future__ import annotations

import ray


class Router:
    """Each batch goes to a target actor the pool manager picks. A target lost mid-batch (killed, node removed) is
    reported and the batch is redone on another one, so every row comes out exactly once."""

    def __init__(self, manager, attempts: int = 8):
        self.manager, self.attempts = manager, attempts

    def __call__(self, batch):
        for _ in range(self.attempts):
            target_id, target = ray.get(self.manager.acquire.remote())
            try:
                out = ray.get(target.generate_batch.remote(batch))
            except ray.exceptions.RayActorError as e:
                ray.get(self.manager.release.remote(target_id, failed=str(e).splitlines()[0][:200] or "lost"))
                continue
            self.manager.release.remote(target_id)
            return out
        raise RuntimeError(f"no target actor completed the batch in {self.attempts} attempts")
