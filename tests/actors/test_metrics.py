"""The job's Prometheus metrics (actors/metrics.py): recorded with their tags, nothing outside Ray, the pool gauges
set by the control loop, and the export through Ray's metrics agent."""
from __future__ import annotations

import re
import threading
import time
import urllib.request
from types import SimpleNamespace

import pyarrow as pa

import actors.metrics as metrics


class FakeMetric:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags=None):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags))


def fake_metrics(monkeypatch) -> dict:
    fakes = {k: FakeMetric() for k in ("rows", "output_tokens", "drafted", "accepted", "acceptance", "targets",
                                       "drafters", "queue")}
    monkeypatch.setattr(metrics, "_METRICS", fakes)
    return fakes


def out_row(error=None, tokens=5, drafted=8, accepted=6) -> dict:
    return {"error": error, "num_output_tokens": tokens, "num_drafted_tokens": drafted, "num_accepted_tokens": accepted}


def test_metrics_are_recorded_with_their_tags(monkeypatch):
    m = fake_metrics(monkeypatch)
    metrics.record_batch([out_row(), out_row(), out_row("bad image: x", 0, 0, 0)])
    assert m["rows"].calls == [("inc", 2, {"status": "ok"}), ("inc", 1, {"status": "error"})]
    assert m["output_tokens"].calls == [("inc", 10, None)]
    assert m["drafted"].calls == [("inc", 16, None)] and m["accepted"].calls == [("inc", 12, None)]
    assert m["acceptance"].calls == [("set", 0.75, None)]
    metrics.record_batch([out_row(drafted=0, accepted=0)])  # no drafts: no zero increments, acceptance kept
    assert len(m["drafted"].calls) == 1 and len(m["acceptance"].calls) == 1
    metrics.record_pools({"t": 1.0, "targets": 2, "drafters": 5, "queue": 7})
    assert (m["targets"].calls, m["drafters"].calls, m["queue"].calls) == ([("set", 2, None)], [("set", 5, None)],
                                                                          [("set", 7, None)])


def test_metrics_do_nothing_outside_ray(monkeypatch):
    import ray

    monkeypatch.setattr(metrics, "_METRICS", None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    metrics.record_batch([out_row()])
    metrics.record_pools({"targets": 1, "drafters": 1, "queue": 0})
    assert metrics._METRICS is None


def test_pool_manager_control_loop_sets_the_gauges(monkeypatch):
    import itertools

    from actors.actor_pool import ActorPool, Member, Pools
    from actors.control_loop import ControlLoop
    from actors.controller import Plan
    from actors.event_log import EventLog
    from actors.routing import Routing

    m = fake_metrics(monkeypatch)
    log, ids, lock = EventLog(), itertools.count(), threading.RLock()  # no actors: one round of the control loop
    targets, drafters = ActorPool("target", {}, ids, log), ActorPool("drafter", {}, ids, log)
    targets.members = {"target-0": Member("target-0", None, None, 0.0, ready=True)}
    drafters.members = {f"drafter-{i}": Member(f"drafter-{i}", None, None, 0.0, ready=True) for i in range(3)}
    pools = Pools(targets, drafters, Plan("disaggregated", 1, 3, 4), log)
    routing = Routing(pools, lock)
    routing.waiting = 2
    loop = ControlLoop(pools, routing, controller=None, policy="fixed", interval_s=0.0, lock=lock, log=log)
    for part, step in ((pools, "refresh_ready"), (pools, "drain"), (loop, "health"), (loop, "measure_rate"),
                       (pools, "apply")):
        setattr(part, step, lambda: None)
    rounds = iter([False, True])
    loop.stop = SimpleNamespace(wait=lambda _: next(rounds))
    loop.run()
    assert log.events == [] and loop.counts[0]["drafters_per_target"] == 3.0
    assert (m["targets"].calls, m["drafters"].calls, m["queue"].calls) == ([("set", 1, None)], [("set", 3, None)],
                                                                          [("set", 2, None)])


def scrape(port: int) -> list[tuple[str, dict, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = []
    for name, labels, value in re.findall(r"^(\w+)\{(.*)\} (\S+)$", text, re.M):
        out.append((name, dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)), float(value)))
    return out


def test_metrics_are_exported_by_ray(ray_address):
    """A generate batch and a pool sample in a Ray actor reach Prometheus (names prefixed ray_, one series per
    worker: this actor's are picked by WorkerId, so other tests' jobs in this Ray session do not count)."""
    import ray

    from actors.generate_rows import tensor_entries
    from actors.row_schemas import PREPROCESSED

    @ray.remote(num_cpus=0)
    class Probe:
        def run(self, batch):
            from actors.generate_actor import GenerateActor
            from actors.metrics import record_pools
            from engine.request import Result, SamplingParams

            class Engine:  # every row: 5 tokens, 8 drafted, 6 accepted
                def generate(self, requests, params):
                    return [Result("a cat", "stop", 5, 8, 6, token_ids=[1] * 5) for _ in requests]

            g = GenerateActor.__new__(GenerateActor)
            g.engine, g.params, g.mixed_shapes, g.reference, g.evaluate = Engine(), SamplingParams(), True, None, None
            out = g.run_batch(batch)
            record_pools({"t": 1.0, "targets": 2, "drafters": 5, "queue": 7})
            return out.num_rows, ray.get_runtime_context().get_worker_id()

    import numpy as np

    inputs = tensor_entries({"pixel_values": np.zeros((1, 3, 2, 2), np.float32)})
    batch = pa.Table.from_pylist(
        [{"shard": "s", "key": f"k{i}", "num_prompt_tokens": 3, "input_ids": [1, 2, 3], "model_inputs": inputs,
          "error": None, "carried": f'{{"caption": "c{i}"}}'} for i in range(3)]
        + [{"shard": "s", "key": "k3", "num_prompt_tokens": 0, "input_ids": [], "model_inputs": None,
            "error": "bad image: truncated", "carried": '{"caption": "c3"}'}], schema=PREPROCESSED)
    probe = Probe.remote()
    rows, worker = ray.get(probe.run.remote(batch))
    assert rows == 4
    node = next(n for n in ray.nodes() if n["Alive"])
    port = node.get("MetricsExportPort", -1)
    assert port and port > 0, "Ray runs no metrics agent: install ray[default] (see pyproject.toml)"
    want = {("ray_specray_rows_total", "ok"): 3.0, ("ray_specray_rows_total", "error"): 1.0,
            ("ray_specray_output_tokens_total", None): 15.0, ("ray_specray_drafted_tokens_total", None): 24.0,
            ("ray_specray_accepted_tokens_total", None): 18.0, ("ray_specray_acceptance_rate", None): 0.75,
            ("ray_specray_target_actors", None): 2.0, ("ray_specray_drafter_actors", None): 5.0,
            ("ray_specray_queue_depth", None): 7.0}
    got, seen = {}, []
    deadline = time.time() + 90  # the core worker pushes its metrics every metrics_report_interval_ms (10 s)
    while time.time() < deadline:
        try:
            seen = [s for s in scrape(port) if s[0].startswith("ray_specray_")]
        except OSError as e:  # the metrics agent is still starting
            seen = [("unreachable", {}, str(e))]
        # gathered over scrapes: a gauge not set again drops out of the export after 2 report intervals
        got.update({(name, labels.get("status")): value for name, labels, value in seen
                    if labels.get("WorkerId") == worker})
        if got == want:
            break
        time.sleep(1)
    assert got == want, f"worker {worker}: gathered {got}; last scrape {seen}"
    ray.kill(probe)
