"""Where a job's first seconds go: each generate actor's start-up, recorded for metrics.json and the summary.

An actor notes wall-clock times: when its module's imports began (the Ray worker process is up by then) and
ended, when its engine was loaded, and when its first batch began and ended. It publishes them in Ray's
internal key-value store under the job's run id; the driver collects them when the job ends
(`phases`), and reports each phase of the first actor to get going, relative to the job's start.
"""
from __future__ import annotations

import json
import time
import uuid

IMPORT_START = time.time()  # imported first by actors/generate_actor.py, before torch and transformers

PREFIX = "specray-startup"


class StartupLog:
    """One actor's start-up times, published once its first batch is done (a no-op without a run id)."""

    def __init__(self, run_id: str | None, imports_done: float):
        self.run_id = run_id
        self.key = uuid.uuid4().hex
        self.times = {"import_start": IMPORT_START, "imports_done": imports_done, "load_start": time.time()}

    def loaded(self, parity_s: float | None = None) -> None:
        """The engine is loaded; `parity_s`: what its parity check at load (engine/parity.py) cost of that."""
        self.times.update(load_done=time.time(), parity_s=parity_s)

    def batch(self, started: float, compiled: dict | None = None) -> None:
        """A batch that began at `started` just ended: the first one is published, and published again after a
        later batch whenever `compiled` changed (the engine's compiled steps, engine/captured_step.py: seconds and
        buckets so far, which later batches may add to)."""
        if self.run_id is None or ("first_batch_start" in self.times and compiled == self.times.get("compiled")):
            return
        if "first_batch_start" not in self.times:
            self.times.update(first_batch_start=started, first_batch_done=time.time())
        self.times["compiled"] = compiled
        try:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_put(f"{PREFIX}/{self.run_id}/{self.key}", json.dumps(self.times), overwrite=True)
        except Exception:  # noqa: BLE001 - a record that cannot be kept must never fail the batch
            pass


def collect(run_id: str) -> list[dict]:
    """Every actor's record of this run (driver side)."""
    from ray.experimental import internal_kv

    out = []
    for key in internal_kv._internal_kv_list(f"{PREFIX}/{run_id}/"):
        value = internal_kv._internal_kv_get(key)
        if value:
            out.append(json.loads(value))
            internal_kv._internal_kv_del(key)
    return out


def phases(job_start: float, ray_called: float | None, ray_ready: float | None, first_row: float | None,
           actors: list[dict]) -> dict:
    """metrics.json's `startup`: seconds of each phase up to the first output row, for the first actor to finish
    its first batch (the one that produced the first row), and the spread over all actors. `driver_s`: the
    driver's own work before Ray (imports, config and model checks, listing the shards); `ray_s`: joining or
    starting Ray. `compiled`: the seconds and shape buckets the actors' compiled steps took, summed over actors
    (engine/captured_step.py; None when none compiled)."""
    compiled = [a["compiled"] for a in actors if a.get("compiled")]
    out: dict = {"driver_s": None if ray_called is None else ray_called - job_start,
                 "ray_s": None if ray_ready is None else ray_ready - ray_called,
                 "first_row_s": None if first_row is None else first_row - job_start, "actors": len(actors),
                 "compiled": {"seconds": sum(c["seconds"] for c in compiled),
                              "buckets": sum(c["buckets"] for c in compiled)} if compiled else None}
    done = [a for a in actors if "first_batch_done" in a]
    if done and ray_ready is not None:
        a = min(done, key=lambda a: a["first_batch_done"])
        out.update(
            actor_start_s=max(0.0, a["import_start"] - ray_ready),  # worker process, Ray's set-up, scheduling
            imports_s=a["imports_done"] - a["import_start"],
            model_load_s=a["load_done"] - a["load_start"],
            parity_check_s=a.get("parity_s"),  # part of model_load_s (None: no check ran)
            wait_first_batch_s=max(0.0, a["first_batch_start"] - a["load_done"]),  # read + preprocess not yet there
            first_batch_s=a["first_batch_done"] - a["first_batch_start"],
            model_load_spread_s=[min(x["load_done"] - x["load_start"] for x in done),
                                 max(x["load_done"] - x["load_start"] for x in done)],
        )
    return out
