"""A target actor of the disaggregated pools (actors/pools.py): the generate stage's engine, with its drafts
coming from drafter actors.

Per batch it asks the manager for its orders (mode, k, the drafters of each of its groups); the engine then
keeps `groups` groups of sequences in flight, each with a channel to a drafter server
(actors/remote_drafter.py), so that drafting one group overlaps verifying another. During the batch it
brings its measurements to the manager about once a second and picks up new orders (k, drafters) on the way
back, so a drained or lost drafter is left within a round or two. With mode `colocated` it drafts with its own
copy of the drafter (loaded on first use); with `plain`, it decodes without speculation.
"""
from __future__ import annotations

import random
import time

import ray

from actors.controller import explore_k
from actors.generator import Generator
from actors.remote_drafter import RemoteDrafter
from actors.request import Request, Result


class _Orders:
    """The engine's draft-length policy in the pools: k is the manager's, measurements go back to it."""

    def __init__(self, target: "Target"):
        self.target = target
        self.max_k = target.orders["max_k"]
        self.rng = random.Random(hash(target.target_id) & 0xFFFF)

    def choose(self) -> int:
        self.target.sync()
        o = self.target.orders
        return explore_k(o["k"], self.rng.random(), o["max_k"]) if o["k"] else 0

    def record(self, k: int, verify_s: float, draft_s: float, accepted: list[int], num_drafts: list[int],
               rows: int = 0) -> None:
        m = self.target.measured
        m["verify"].append((rows, k, verify_s))
        m["verify_s"] += verify_s
        m["rounds"] += 1
        if k > 0 and draft_s > 0:
            m["draft_step"].append((rows, draft_s / k))
            m["accepted"].extend(accepted)
            m["drafted"].extend(num_drafts)


class Target(Generator):
    def __init__(self, target_id: str, manager: str, namespace: str | None, drafter: str | None, **kwargs):
        engine = kwargs["engine"]
        self.drafter_args = (engine.get("trust_remote_code", False), engine.get("decoder", "lean") == "lean")
        kwargs["engine"] = dict(engine, drafter=None)
        super().__init__(**kwargs)
        self.target_id = target_id
        self.drafter_spec = drafter
        self.manager = ray.get_actor(manager, namespace=namespace)
        self.measured = self._fresh()
        self.pending = None
        self.last_sync = 0.0
        self._seen = (0.0, 0.0, 0)  # engine draft_s, wait_s, tokens at the last report
        self.orders = ray.get(self.manager.assignment.remote(target_id))

    @staticmethod
    def _fresh() -> dict:
        return {"verify": [], "draft_step": [], "accepted": [], "drafted": [], "verify_s": 0.0, "draft_s": 0.0,
                "wait_s": 0.0, "rounds": 0, "failovers": 0}

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def generate_batch(self, batch):
        return self(batch)

    def sync(self, wait: bool = False, now: bool = False) -> None:
        """Hand the measurements to the manager and pick up new orders (without waiting, unless asked)."""
        if self.pending is not None:
            done, _ = ray.wait([self.pending], timeout=None if wait else 0)
            if done:
                self.orders, self.pending = ray.get(done[0]), None
        if self.pending is None and (wait or now or time.time() - self.last_sync > 1.0):
            e = self.engine.stats
            m, self.measured = self.measured, self._fresh()
            m["draft_s"], m["wait_s"] = e.draft_s - self._seen[0], e.wait_s - self._seen[1]
            m["tokens"] = e.tokens - self._seen[2]
            self._seen = (e.draft_s, e.wait_s, e.tokens)
            self.pending = self.manager.assignment.remote(self.target_id, m)
            self.last_sync = time.time()
            if wait:
                self.orders, self.pending = ray.get(self.pending), None

    def _lanes(self, mode: str, groups: int) -> list | None:
        if mode == "colocated":
            if self.engine.drafter is None:
                self.engine.drafter = self.engine._drafter(self.drafter_spec, *self.drafter_args)
            return None  # the engine's own drafter, one group
        if mode != "disaggregated":
            return [None]
        return [RemoteDrafter(f"{self.target_id}/{g}", (lambda g=g: self._servers(g)), self.engine.device)
                for g in range(groups)]

    def _servers(self, group: int) -> list:
        lanes = self.orders["drafters"]
        return lanes[group % len(lanes)] if lanes else []

    def _generate(self, requests: list[Request]) -> list[Result]:
        self.sync(wait=True)
        o = self.orders
        channels = self._lanes(o["mode"], o["groups"])
        try:
            return self.engine.generate(requests, self.params, drafters=channels, policy=_Orders(self))
        finally:
            for c in channels or []:
                if c is not None:
                    self.measured["failovers"] += c.failovers
                    c.close()
            self.sync(now=True)  # the batch's last measurements, without waiting for the answer
