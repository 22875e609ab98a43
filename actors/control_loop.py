"""The pools' control loop: a thread of the pool manager (actors/pool_manager.py) that sizes the pools.

Every 0.5 s it marks started actors ready and removes drained ones; every `interval_s` it also
- pings the actors (actors/actor_pool.py): one whose ping fails is lost;
- measures the current plan's achieved tokens/s, once all of its actors are up and batches are queueing, for the
  controller (actors/controller.py) to confirm or undo its last change;
- asks the controller for a plan (policy auto, after 30 rounds measured under the current one) and applies it,
  restoring the plan's count of lost actors;
- records a sample of the actors over time (report()["actors_over_time"]) and sets the Prometheus gauges
  (actors/metrics.py).
The measurements the targets bring with their assignment requests come in through `observe`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict

import ray

from actors.actor_pool import Pools
from actors.controller import Budget, Controller, Plan
from actors.event_log import EventLog
from actors.messages import Measurements
from actors.metrics import record_pools
from actors.routing import Routing


def first_plan(budget: Budget, policy: str, fixed: Plan | None) -> tuple[Plan, str]:
    """The plan the pools start with, and why: the fixed policy's, or a probe plan to measure from (half the
    budget on targets, the rest on drafters, k = 4)."""
    if policy == "fixed":
        if fixed is None:
            raise ValueError("autoscaler.policy: fixed needs its plan (targets, drafters, k)")
        return fixed, "fixed policy"
    targets = max(1, int(budget.devices // 2))
    left = budget.devices - targets
    drafters = max(1, min(budget.max_drafters, int(left / budget.drafter_cost) if budget.drafter_cost else targets))
    return Plan("disaggregated", targets, drafters, min(4, budget.max_k)), "probe plan"


class ControlLoop:
    def __init__(self, pools: Pools, routing: Routing, controller: Controller, policy: str, interval_s: float,
                 lock: threading.RLock, log: EventLog):
        self.pools, self.routing, self.controller, self.lock, self.log = pools, routing, controller, lock, log
        self.policy, self.interval_s = policy, interval_s  # policy: auto | fixed
        self.stats = {"verify_s": 0.0, "draft_s": 0.0, "wait_s": 0.0, "rounds": 0, "failovers": 0}
        self.rounds_since_plan = 0  # rounds measured under the current plan (re-plan only on enough of them)
        self.window = {"tokens": 0, "since": None}  # tokens reported since the current plan's actors were all up
        self.counts: list[dict] = []  # the actors over time
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # ---- measurements and plans from outside the loop (the caller holds the lock) -------------------

    def observe(self, m: Measurements) -> None:
        """A target's measurements since its last report."""
        c = self.controller
        for rows, k, seconds in m.verify:
            c.observe_verify(rows, k, seconds)
        for rows, seconds in m.draft_step:
            c.observe_draft_step(rows, seconds)
        if m.drafted:
            c.observe_acceptance(m.accepted, m.drafted)
        for key in ("verify_s", "draft_s", "wait_s", "rounds", "failovers"):
            self.stats[key] += getattr(m, key)
        if self.window["since"] is not None:
            self.window["tokens"] += m.tokens
        self.rounds_since_plan += m.rounds

    def impose(self, plan: Plan) -> None:
        """A plan set by the user: the policy becomes fixed."""
        self.policy = "fixed"
        self.rounds_since_plan = 0
        self.log.add("plan", reason="set by the user", **asdict(plan))
        self.pools.apply(plan)

    # ---- the loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        last_plan = time.time()
        while not self.stop.wait(0.5):
            try:
                with self.lock:
                    self.pools.refresh_ready()
                    self.pools.drain()
                if time.time() - last_plan < self.interval_s:
                    continue
                last_plan = time.time()
                self.health()  # outside the lock: pings may wait on busy actors
                with self.lock:
                    self.measure_rate()
                    self.replan()
                    self.pools.apply()
                    self.sample()
            except Exception as e:  # noqa: BLE001 - the control loop must not die; the error is on the record
                self.log.add("control_error", error=str(e)[:300])

    def health(self) -> None:
        """Ping the ready drafters and the idle targets; wait for the answers (10 s at most) without the lock."""
        with self.lock:
            pings = [pool.ping() for pool in self.pools.each]
        refs = [ref for p in pings for _, ref in p]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=10)
        with self.lock:
            for pool, p in zip(self.pools.each, pings):
                pool.judge(p)

    def measure_rate(self) -> None:
        """The current plan's achieved tokens/s over the last interval, for the controller to confirm a change."""
        w, now = self.window, time.time()
        if not self.pools.settled():
            self.window = {"tokens": 0, "since": None}
            return
        if w["since"] is None:
            self.window = {"tokens": 0, "since": now, "acceptance": self.controller.acceptance}
        elif now - w["since"] >= self.interval_s:
            rate = w["tokens"] / (now - w["since"])
            if self.routing.queue() > 0:  # batches are queueing: the rate is the plan's, not the input's
                self.controller.observe_rate(rate, w["acceptance"])
                self.log.add("measured", tokens_per_s=round(rate, 1), **asdict(self.pools.plan))
            self.window = {"tokens": 0, "since": now, "acceptance": self.controller.acceptance}

    def replan(self) -> None:
        """Policy auto: the controller's plan, once enough rounds were measured under the current one."""
        if self.policy == "auto" and self.rounds_since_plan >= 30 and self.controller.draft.bins:
            before = self.pools.plan
            self.pools.plan = self.controller.decide(self.log.now())
            if self.pools.plan != before:
                self.rounds_since_plan = 0
                self.window = {"tokens": 0, "since": None}

    def sample(self) -> None:
        """One sample of the actors over time, also set as the Prometheus gauges."""
        targets, drafters = self.pools.targets.count(), self.pools.drafters.count()
        plan = self.pools.plan
        self.counts.append({"t": self.log.now(), "targets": targets, "drafters": drafters,
                            "drafters_per_target": round(drafters / targets, 3) if targets else None,
                            "queue": self.routing.queue(), "k": plan.k, "mode": plan.mode})
        record_pools(self.counts[-1])  # Prometheus gauges: actors and queue depth
