"""The pools of `resources.mode: disaggregated`: target actors and drafter actors, sized by the controller.

    routers (actors/router.py) ──acquire──► PoolManager ──► target actors (actors/target_actor.py)
                                                 │              │  each group of sequences: a channel
                                                 └──► drafter actors (actors/drafter_server.py)

    PoolManager (this file): the Ray actor and its remote methods, composed of
        actors/routing.py       which target a batch goes to (acquire, release, queue depth)
        actors/orders.py        a target's orders: mode, k, the drafters of each of its groups
        actors/control_loop.py  the periodic loop: health, achieved rate, re-plan (actors/controller.py), scale
        actors/actor_pool.py    the two pools: start, ready, drain, kill, resize (actors/shells.py: the actors)
        actors/event_log.py     the record of what they did, and why

The manager is one threaded Ray actor; its parts share one RLock. Routers ask it for a target per batch (the least
busy ready one) and hand it back when done; targets ask it for their assignment (mode, k, which drafters serve
which of their groups) about once a second, bringing their measurements (verify and draft times, acceptance,
overlap), which feed the controller (actors/controller.py). Every `interval_s` the control loop checks the
actors' health, replaces lost ones, re-plans and scales:

- up: new actors are started (and Ray's autoscaler is asked for their resources with request_resources);
  routers and targets use an actor only once it has answered a ping (its model is loaded);
- down: an actor is drained before it is removed: a draining target gets no new batch and is killed when its
  batches are done; a draining drafter leaves every assignment at once (its channels move to another drafter
  or go on without drafts at their next round) and is killed when it holds no channel, or after
  `drain_timeout_s`;
- lost (killed, or its node removed): dropped at once; its batches are retried by their routers on another
  target, its channels fail over (actors/drafter_channel.py), and the plan's count is restored when there
  is capacity.

Placement: targets and drafters may ask for custom node resources (`autoscaler.target_resources`,
`drafter_resources`), e.g. nodes labelled for drafters. Everything the manager did, and why, is in `report()`.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import asdict, dataclass
from typing import Literal

from actors.actor_pool import DrafterPool, Pools, TargetPool
from actors.control_loop import ControlLoop, first_plan
from actors.controller import Budget, Controller, Plan
from actors.event_log import EventLog
from actors.messages import Measurements, Orders
from actors.orders import orders
from actors.routing import Routing
from engine.config import EngineConfig
from engine.request import SamplingParams


@dataclass
class PoolSpec:
    """What the manager needs to start actors (plain data, so it crosses to the manager actor)."""
    engine: EngineConfig  # the target actors' engine (actors/target_actor.py; its drafter runs on the drafters)
    params: SamplingParams
    evaluate: float | None  # the fraction of rows to evaluate compression on, or None
    drafter_engine: EngineConfig  # the drafter servers' (actors/drafter_server.py): the job's, own gpus and threads
    target_options: dict  # ray actor options: num_cpus, num_gpus, resources
    drafter_options: dict
    budget: Budget
    policy: Literal["auto", "fixed"] = "auto"
    fixed: Plan | None = None  # the plan of policy fixed
    groups: int = 2
    group_rows: int = 16
    interval_s: float = 5.0
    drain_timeout_s: float = 60.0


class PoolManager:
    def __init__(self, spec: PoolSpec, name: str, namespace: str | None = None):
        self.spec, self.budget = spec, spec.budget
        self.lock = threading.RLock()
        self.log = EventLog()
        plan, reason = first_plan(self.budget, spec.policy, spec.fixed)
        ids = itertools.count()  # one numbering for both pools
        self.pools = Pools(
            TargetPool(spec.target_options, ids, self.log, name, namespace, spec.engine, spec.params, spec.evaluate),
            DrafterPool(spec.drafter_options, ids, self.log, spec.drafter_engine, spec.drain_timeout_s),
            plan, self.log)
        self.routing = Routing(self.pools, self.lock)
        controller = Controller(self.budget, group_rows=spec.group_rows, groups=spec.groups)
        controller.plan = plan
        self.loop = ControlLoop(self.pools, self.routing, controller, spec.policy, spec.interval_s, self.lock,
                                self.log)
        self.log.add("plan", reason=reason, **asdict(plan))
        with self.lock:
            self.pools.apply()
        self.loop.start()

    # ---- routers -----------------------------------------------------------------------------------

    def acquire(self, timeout_s: float = 3600.0) -> tuple[str, object]:
        """The least busy ready target (waits while none is ready)."""
        return self.routing.acquire(timeout_s)

    def release(self, target_id: str, failed: str | None = None) -> None:
        self.routing.release(target_id, failed)

    # ---- targets -----------------------------------------------------------------------------------

    def assignment(self, target_id: str, measured: Measurements | None = None) -> Orders:
        """A target's orders (actors/orders.py); `measured`: what it measured since its last call."""
        with self.lock:
            if measured:
                self.loop.observe(measured)
            return orders(self.pools.plan, target_id, list(self.pools.targets.members),
                          self.pools.drafters.ready(), self.spec.groups, self.budget.max_k)

    # ---- control and record ------------------------------------------------------------------------

    def set_plan(self, targets: int, drafters: int, k: int, mode: str = "disaggregated") -> None:
        """Impose a plan (the fixed policy's way to change mid-job; tests use it to scale up and down)."""
        with self.lock:
            self.loop.impose(Plan(mode, targets, drafters, k))

    def actors(self) -> dict:
        with self.lock:
            self.pools.refresh_ready()
            return {"targets": {m.id: {"ready": m.ready, "draining": m.draining, "batches": m.batches}
                                for m in self.pools.targets.members.values()},
                    "drafters": {m.id: {"ready": m.ready, "draining": m.draining}
                                 for m in self.pools.drafters.members.values()}}

    def node_of(self, actor_id: str) -> str | None:
        with self.lock:
            m = self.pools.find(actor_id)
            return m.node if m is not None else None

    def report(self) -> dict:
        with self.lock:
            s, c = self.loop.stats, self.loop.controller
            overlap = max(0.0, 1 - s["wait_s"] / s["draft_s"]) if s["draft_s"] else None
            return {"plan": asdict(self.pools.plan), "policy": self.loop.policy, "budget": asdict(self.budget),
                    "groups_per_target": self.spec.groups,
                    "decisions": list(c.timeline), "events": list(self.log.events),
                    "model": c.model(),
                    "actors_over_time": list(self.loop.counts), "acceptance": round(c.acceptance, 4),
                    "overlap": None if overlap is None else round(overlap, 4),
                    "target_verify_s": round(s["verify_s"], 3), "draft_s": round(s["draft_s"], 3),
                    "target_wait_s": round(s["wait_s"], 3), "rounds": s["rounds"], "failovers": s["failovers"]}

    def shutdown(self) -> dict:
        self.loop.close()
        out = self.report()
        with self.lock:
            self.pools.kill_all("job done")
        return out
