"""A target actor of the disaggregated pools: the generate stage's engine, with its drafts coming from drafter
servers. The target pool (actors/actor_pool.py) starts it; routers (actors/router.py) hand it batches.

Per batch it takes the pool manager's orders (actors/pool_manager.py's assignment, made by actors/orders.py: mode,
k, the drafters of each of its groups); the engine then keeps `groups` groups of sequences in flight, each with a
channel to a drafter server (actors/drafter_channel.py), so that drafting one group overlaps verifying another.
Between rounds (never inside one) it brings its measurements to the manager about once a second (they feed
actors/control_loop.py and the controller) and applies the orders that came back on the previous exchange (k,
drafters), so a drained or lost drafter is left within a round or two. With mode `colocated` it drafts with its
own copy of the drafter (loaded on first use); with `plain`, it decodes without speculation.
"""
from __future__ import annotations

import random
import time
from dataclasses import replace

import ray

from actors.controller import explore_k
from actors.drafter_channel import DrafterChannel
from actors.generate_actor import GenerateActor
from actors.messages import Measurements, Orders
from engine.config import EngineConfig
from engine.draft_length import DraftPolicy
from engine.request import Request, Result, SamplingParams


class OrderedDraftLength(DraftPolicy):
    """The draft-length policy under the pools: k is the manager's latest order (set between rounds), and the
    measurements are kept for the next report to the manager."""

    def __init__(self, orders: Orders, seed: int):
        self.orders = orders
        self.max_k = orders.max_k
        self.rng = random.Random(seed)
        self.measured = Measurements()

    def choose(self) -> int:
        o = self.orders
        return explore_k(o.k, self.rng.random(), o.max_k) if o.k else 0

    def record(self, k: int, verify_s: float, draft_s: float, accepted: list[int], num_drafts: list[int],
               rows: int = 0) -> None:
        m = self.measured
        m.verify.append((rows, k, verify_s))
        m.verify_s += verify_s
        m.rounds += 1
        if k > 0 and draft_s > 0:
            m.draft_step.append((rows, draft_s / k))
            m.accepted.extend(accepted)
            m.drafted.extend(num_drafts)


class TargetActor(GenerateActor):
    def __init__(self, target_id: str, manager: str, namespace: str | None, engine: EngineConfig,
                 params: SamplingParams, evaluate: float | None = None):
        super().__init__(replace(engine, drafter=None), params, evaluate)
        self.target_id = target_id
        self.drafter_spec = engine.drafter
        self.manager = ray.get_actor(manager, namespace=namespace)
        self.orders = ray.get(self.manager.assignment.remote(target_id))
        self.policy = OrderedDraftLength(self.orders, hash(target_id) & 0xFFFF)
        self.pending = None  # the manager's answer to the last report, while in flight
        self.last_sync = 0.0
        self._seen = (0.0, 0.0, 0)  # engine draft_s, wait_s, tokens at the last report

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def sync(self, wait: bool = False, now: bool = False) -> None:
        """Hand the measurements to the manager and take up the orders it answered (without waiting, unless
        asked). Called between rounds and batches only."""
        if self.pending is not None:
            done, _ = ray.wait([self.pending], timeout=None if wait else 0)
            if done:
                self._apply(ray.get(done[0]))
                self.pending = None
        if self.pending is None and (wait or now or time.time() - self.last_sync > 1.0):
            e = self.engine.stats
            m, self.policy.measured = self.policy.measured, Measurements()
            m.draft_s, m.wait_s = e.draft_s - self._seen[0], e.wait_s - self._seen[1]
            m.tokens = e.tokens - self._seen[2]
            self._seen = (e.draft_s, e.wait_s, e.tokens)
            self.pending = self.manager.assignment.remote(self.target_id, m)
            self.last_sync = time.time()
            if wait:
                self._apply(ray.get(self.pending))
                self.pending = None

    def _apply(self, orders: Orders) -> None:
        self.orders = self.policy.orders = orders

    def _drafters(self, mode: str, groups: int) -> list | None:
        """One drafter per group for the engine: its own (colocated), channels to servers, or none (plain)."""
        if mode == "colocated":
            if self.engine.drafter is None:
                self.engine.drafter = self.engine.load_drafter(self.drafter_spec)
            return None  # the engine's own drafter, one group
        if mode != "disaggregated":
            return [None]
        return [DrafterChannel(f"{self.target_id}/{g}", (lambda g=g: self._servers(g)), self.engine.device)
                for g in range(groups)]

    def _servers(self, group: int) -> list:
        assigned = self.orders.drafters
        return assigned[group % len(assigned)] if assigned else []

    def _generate(self, requests: list[Request]) -> list[Result]:
        self.sync(wait=True)
        o = self.orders
        channels = self._drafters(o.mode, o.groups)
        try:
            return self.engine.generate(requests, self.params, drafters=channels, policy=self.policy,
                                        between_rounds=self.sync)
        finally:
            for c in channels or []:
                if c is not None:
                    self.policy.measured.failovers += c.failovers
                    c.close()
            self.sync(now=True)  # the batch's last measurements, without waiting for the answer
