"""The pools of `resources.mode: disaggregated`: target actors and drafter actors, sized by the controller.

    Ray Data generate stage (routers) ──acquire──► PoolManager ──► target actors (actors/target_actor.py)
                                                        │              │  each group of sequences: a channel
                                                        └──► drafter actors (actors/drafter_server.py)

The manager is one threaded Ray actor. Routers ask it for a target per batch (the least busy ready one) and
hand it back when done; targets ask it for their assignment (mode, k, which drafters serve which of their
groups) about once a second, bringing their measurements (verify and draft times, acceptance, overlap), which
feed the controller (actors/controller.py). Every `interval_s` it checks its actors' health, replaces lost
ones, re-plans and scales:

- up: new actors are started (and Ray's autoscaler is asked for their resources with request_resources);
  routers and targets use an actor only once it has answered a ping (its model is loaded);
- down: an actor is drained before it is removed: a draining target gets no new batch and is killed when its
  batches are done; a draining drafter leaves every assignment at once (its channels move to another drafter
  or go on without drafts at their next round) and is killed when it holds no channel, or after
  `drain_timeout_s`;
- lost (killed, or its node removed): dropped at once; its batches are retried by their routers on another
  target, its channels fail over (actors/drafter_server.py), and the plan's count is restored when there
  is capacity.

Placement: targets and drafters may ask for custom node resources (`autoscaler.target_resources`,
`drafter_resources`), e.g. nodes labelled for drafters. Everything the manager did, and why, is in `report()`.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import asdict, dataclass, field

import ray

from actors.controller import Budget, Controller, Plan
from actors.metrics import record_pools


class TargetShell:
    """The shell of a target actor: the manager starts it without importing torch (which costs it seconds of a
    busy CPU before the first actor could start); the engine is imported and built in the actor."""

    def __init__(self, **kwargs):
        from actors.target_actor import TargetActor
        self.impl = TargetActor(**kwargs)

    def ping(self) -> str:
        return self.impl.ping()

    def generate_batch(self, batch):
        return self.impl(batch)


class DrafterShell:
    """The shell of a drafter actor (actors/drafter_server.py's DrafterServer), for the same reason."""

    def __init__(self, **kwargs):
        from actors.drafter_server import DrafterServer
        self.impl = DrafterServer(**kwargs)

    def ping(self) -> str:
        return self.impl.ping()

    def step(self, channel: str, ops: list, histories: list, k: int, params):
        return self.impl.step(channel, ops, histories, k, params)

    def release(self, channel: str) -> None:
        self.impl.release(channel)

    def active_channels(self) -> int:
        return self.impl.active_channels()


@dataclass
class _Member:
    id: str
    handle: object
    ready_ref: object | None
    started: float
    ready: bool = False
    draining: bool = False
    drain_since: float = 0.0
    inflight: int = 0
    batches: int = 0
    node: str = ""


@dataclass
class PoolSpec:
    """What the manager needs to start actors (plain data, so it crosses to the manager actor)."""
    target_kwargs: dict  # actors.target_actor.TargetActor's constructor (engine, params, evaluate), less its id and
                         # the manager's name
    target_options: dict  # ray actor options: num_cpus, num_gpus, resources
    drafter_kwargs: dict  # actors.drafter_server.DrafterServer's constructor (config)
    drafter_options: dict
    budget: dict  # actors.controller.Budget
    policy: str = "auto"  # auto | fixed
    fixed: dict = field(default_factory=dict)  # targets, drafters, k (policy fixed)
    groups: int = 2
    group_rows: int = 16
    interval_s: float = 5.0
    drain_timeout_s: float = 60.0


class PoolManager:
    def __init__(self, spec: PoolSpec, name: str, namespace: str | None = None):
        self.spec, self.name, self.namespace = spec, name, namespace
        self.budget = Budget(**spec.budget)
        self.controller = Controller(self.budget, group_rows=spec.group_rows, groups=spec.groups)
        self.lock = threading.RLock()
        self.t0 = time.time()
        self.targets: dict[str, _Member] = {}
        self.drafters: dict[str, _Member] = {}
        self.ids = itertools.count()
        self.events: list[dict] = []
        self.counts: list[dict] = []
        self.stats = {"verify_s": 0.0, "draft_s": 0.0, "wait_s": 0.0, "rounds": 0, "failovers": 0}
        self.waiting = 0  # routers waiting for a target (queue depth)
        self.rounds_since_plan = 0  # rounds measured under the current plan (re-plan only on enough of them)
        if spec.policy == "fixed":
            f = spec.fixed
            self.plan = Plan("disaggregated", f["targets"], f["drafters"] if f["k"] else 0, f["k"])
        else:  # a probe plan to measure from: half the budget on targets, the rest on drafters, k = 4
            b = self.budget
            targets = max(1, int(b.devices // 2))
            left = b.devices - targets
            drafters = max(1, min(b.max_drafters, int(left / b.drafter_cost) if b.drafter_cost else targets))
            self.plan = Plan("disaggregated", targets, drafters, min(4, b.max_k))
        self.controller.plan = self.plan
        self._event("plan", reason="probe plan" if spec.policy == "auto" else "fixed policy", **asdict(self.plan))
        self.window = {"tokens": 0, "since": None}  # tokens reported since the current plan's actors were all up
        self.stop = threading.Event()
        with self.lock:
            self._apply()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    # ---- helpers -----------------------------------------------------------------------------------

    def _now(self) -> float:
        return round(time.time() - self.t0, 3)

    def _event(self, kind: str, **info) -> None:
        self.events.append({"t": self._now(), "event": kind, **info})

    def _start(self, kind: str) -> _Member:
        mid = f"{kind}-{next(self.ids)}"
        if kind == "target":
            handle = ray.remote(TargetShell).options(max_restarts=0, **self.spec.target_options).remote(
                target_id=mid, manager=self.name, namespace=self.namespace, **self.spec.target_kwargs)
        else:
            handle = ray.remote(DrafterShell).options(max_restarts=0, **self.spec.drafter_options).remote(
                **self.spec.drafter_kwargs)
        member = _Member(mid, handle, handle.ping.remote(), time.time())
        (self.targets if kind == "target" else self.drafters)[mid] = member
        self._event("start", actor=mid)
        return member

    def _kill(self, pool: dict, member: _Member, why: str) -> None:
        pool.pop(member.id, None)
        try:
            ray.kill(member.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._event("remove", actor=member.id, reason=why)

    def _resize(self, pool: dict, want: int, kind: str) -> None:
        live = [m for m in pool.values() if not m.draining]
        for m in [m for m in pool.values() if m.draining][:max(0, want - len(live))]:
            m.draining = False  # cheaper than a new actor
            live.append(m)
            self._event("undrain", actor=m.id)
        for _ in range(want - len(live)):
            live.append(self._start(kind))
        extra = len(live) - want
        if extra > 0:  # drain the least busy, newest first
            for m in sorted(live, key=lambda m: (m.inflight, -m.started))[:extra]:
                m.draining, m.drain_since = True, time.time()
                self._event("drain", actor=m.id)

    def _apply(self) -> None:
        p = self.plan
        drafters = p.drafters if p.mode == "disaggregated" and p.k > 0 else 0
        self._resize(self.targets, p.targets, "target")
        self._resize(self.drafters, drafters, "drafter")
        bundles = [self._bundle(self.spec.target_options)] * p.targets
        bundles += [self._bundle(self.spec.drafter_options)] * drafters
        try:  # a hint to Ray's autoscaler (on a fixed cluster it changes nothing)
            from ray.autoscaler.sdk import request_resources
            request_resources(bundles=bundles)
        except Exception as e:  # noqa: BLE001
            self._event("request_resources_failed", error=str(e)[:200])

    @staticmethod
    def _bundle(options: dict) -> dict:
        out = {"CPU": options.get("num_cpus", 1)}
        if options.get("num_gpus"):
            out["GPU"] = options["num_gpus"]
        out.update(options.get("resources") or {})
        return out

    def _refresh_ready(self) -> None:
        for pool in (self.targets, self.drafters):
            for m in list(pool.values()):
                if m.ready:
                    continue
                done, _ = ray.wait([m.ready_ref], timeout=0)
                if done:
                    try:
                        m.node = ray.get(done[0])
                        m.ready = True
                        self._event("ready", actor=m.id, node=m.node[:12],
                                    startup_s=round(time.time() - m.started, 2))
                    except Exception as e:  # noqa: BLE001 - it died while starting
                        self._lost(pool, m, e)

    def _lost(self, pool: dict, member: _Member, err: Exception | str) -> None:
        pool.pop(member.id, None)
        self._event("lost", actor=member.id, error=str(err).splitlines()[0][:200] if str(err) else type(err).__name__)

    def _health(self) -> None:
        """Ping the ready drafters and the idle targets (a busy target answers only between batches; its
        routers notice if it dies); an actor whose ping fails is lost, one that is merely slow is not."""
        with self.lock:
            members = [(pool, m) for pool in (self.targets, self.drafters) for m in pool.values()
                       if m.ready and (pool is self.drafters or m.inflight == 0)]
        refs = [m.handle.ping.remote() for _, m in members]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=10)
        for (pool, m), ref in zip(members, refs):
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    ray.get(done[0])
                except Exception as e:  # noqa: BLE001
                    with self.lock:
                        self._lost(pool, m, e)

    def _drain(self) -> None:
        for m in [m for m in self.targets.values() if m.draining and m.inflight == 0]:
            self._kill(self.targets, m, "drained")
        for m in [m for m in self.drafters.values() if m.draining]:
            try:
                idle = not m.ready or ray.get(m.handle.active_channels.remote(), timeout=10) == 0
            except Exception:  # noqa: BLE001
                idle = True
            if idle or time.time() - m.drain_since > self.spec.drain_timeout_s:
                self._kill(self.drafters, m, "drained" if idle else "drain timeout")

    def _loop(self) -> None:
        last_plan = time.time()
        while not self.stop.wait(0.5):
            try:
                with self.lock:
                    self._refresh_ready()
                    self._drain()
                if time.time() - last_plan < self.spec.interval_s:
                    continue
                last_plan = time.time()
                self._health()  # outside the lock: pings may wait on busy actors
                with self.lock:
                    self._measure_rate()
                    if self.spec.policy == "auto" and self.rounds_since_plan >= 30 and self.controller.draft.bins:
                        before = self.plan
                        self.plan = self.controller.decide(self._now())
                        if self.plan != before:
                            self.rounds_since_plan = 0
                            self.window = {"tokens": 0, "since": None}
                    self._apply()
                    targets, drafters = self._count(self.targets), self._count(self.drafters)
                    self.counts.append({"t": self._now(), "targets": targets, "drafters": drafters,
                                        "drafters_per_target": round(drafters / targets, 3) if targets else None,
                                        "queue": self._queue(), "k": self.plan.k, "mode": self.plan.mode})
                    record_pools(self.counts[-1])  # Prometheus gauges: actors and queue depth
            except Exception as e:  # noqa: BLE001 - the control loop must not die; the error is on the record
                self._event("control_error", error=str(e)[:300])

    def _settled(self) -> bool:
        """All of the plan's actors are up, none is starting or draining."""
        p = self.plan
        drafters = p.drafters if p.mode == "disaggregated" and p.k > 0 else 0
        members = [*self.targets.values(), *self.drafters.values()]
        return (all(m.ready and not m.draining for m in members) and len(self.targets) == p.targets
                and len(self.drafters) == drafters)

    def _measure_rate(self) -> None:
        """The current plan's achieved tokens/s over the last interval, for the controller to confirm a change."""
        w, now = self.window, time.time()
        if not self._settled():
            self.window = {"tokens": 0, "since": None}
            return
        if w["since"] is None:
            self.window = {"tokens": 0, "since": now, "acceptance": self.controller.acceptance}
        elif now - w["since"] >= self.spec.interval_s:
            rate = w["tokens"] / (now - w["since"])
            if self._queue() > 0:  # batches are queueing: the rate is the plan's, not the input's
                self.controller.observe_rate(rate, w["acceptance"])
                self._event("measured", tokens_per_s=round(rate, 1), **asdict(self.plan))
            self.window = {"tokens": 0, "since": now, "acceptance": self.controller.acceptance}

    def _queue(self) -> int:
        """Batches waiting: routers waiting for a target, and batches queued behind a target's current one."""
        return self.waiting + sum(max(0, m.inflight - 1) for m in self.targets.values())

    @staticmethod
    def _count(pool: dict) -> int:
        return sum(1 for m in pool.values() if m.ready and not m.draining)

    # ---- routers -----------------------------------------------------------------------------------

    def acquire(self, timeout_s: float = 3600.0) -> tuple[str, object]:
        """The least busy ready target (waits while none is ready)."""
        deadline = time.time() + timeout_s
        with self.lock:
            self.waiting += 1
        try:
            while True:
                with self.lock:
                    self._refresh_ready()
                    ready = [m for m in self.targets.values() if m.ready and not m.draining]
                    if not ready and not self.targets:
                        self._apply()  # every target was lost: start the plan's count again
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
        with self.lock:
            m = self.targets.get(target_id)
            if m is None:
                return
            m.inflight -= 1
            if failed:
                self._lost(self.targets, m, failed)
                self._apply()

    # ---- targets -----------------------------------------------------------------------------------

    def assignment(self, target_id: str, measured: dict | None = None) -> dict:
        """A target's orders: mode, k, and for each of its groups the drafters to use (preferred first)."""
        with self.lock:
            if measured:
                self._observe(measured)
            p = self.plan
            ready = sorted((m for m in self.drafters.values() if m.ready and not m.draining), key=lambda m: m.id)
            speculate = p.k > 0 and (p.mode == "colocated" or ready)
            groups = self.spec.groups if p.mode == "disaggregated" and speculate else 1
            order = sorted(self.targets).index(target_id) if target_id in self.targets else 0
            lanes = []
            for g in range(groups):
                first = (order * groups + g) % len(ready) if ready else 0
                lanes.append([(m.id, m.handle) for m in ready[first:] + ready[:first]])
            return {"mode": p.mode if speculate else "plain", "k": p.k if speculate else 0, "groups": groups,
                    "drafters": lanes, "max_k": self.budget.max_k}

    def _observe(self, m: dict) -> None:
        c = self.controller
        for rows, k, seconds in m.get("verify", []):
            c.observe_verify(rows, k, seconds)
        for rows, seconds in m.get("draft_step", []):
            c.observe_draft_step(rows, seconds)
        if m.get("drafted"):
            c.observe_acceptance(m["accepted"], m["drafted"])
        for key in ("verify_s", "draft_s", "wait_s", "rounds", "failovers"):
            self.stats[key] += m.get(key, 0)
        if self.window["since"] is not None:
            self.window["tokens"] += m.get("tokens", 0)
        self.rounds_since_plan += m.get("rounds", 0)

    # ---- control and record ------------------------------------------------------------------------

    def set_plan(self, targets: int, drafters: int, k: int, mode: str = "disaggregated") -> None:
        """Impose a plan (the fixed policy's way to change mid-job; tests use it to scale up and down)."""
        with self.lock:
            self.spec.policy = "fixed"
            self.plan = Plan(mode, targets, drafters, k)
            self.rounds_since_plan = 0
            self._event("plan", reason="set by the user", **asdict(self.plan))
            self._apply()

    def actors(self) -> dict:
        with self.lock:
            self._refresh_ready()
            return {"targets": {m.id: {"ready": m.ready, "draining": m.draining, "batches": m.batches}
                                for m in self.targets.values()},
                    "drafters": {m.id: {"ready": m.ready, "draining": m.draining} for m in self.drafters.values()}}

    def node_of(self, actor_id: str) -> str | None:
        with self.lock:
            m = self.targets.get(actor_id) or self.drafters.get(actor_id)
            return m.node if m is not None else None

    def report(self) -> dict:
        with self.lock:
            s = self.stats
            overlap = max(0.0, 1 - s["wait_s"] / s["draft_s"]) if s["draft_s"] else None
            return {"plan": asdict(self.plan), "policy": self.spec.policy, "budget": asdict(self.budget),
                    "groups_per_target": self.spec.groups,
                    "decisions": list(self.controller.timeline), "events": list(self.events),
                    "model": self.controller.model(),
                    "actors_over_time": list(self.counts), "acceptance": round(self.controller.acceptance, 4),
                    "overlap": None if overlap is None else round(overlap, 4),
                    "target_verify_s": round(s["verify_s"], 3), "draft_s": round(s["draft_s"], 3),
                    "target_wait_s": round(s["wait_s"], 3), "rounds": s["rounds"], "failovers": s["failovers"]}

    def shutdown(self) -> dict:
        self.stop.set()
        self.thread.join(timeout=10)
        out = self.report()
        with self.lock:
            for pool in (self.targets, self.drafters):
                for m in list(pool.values()):
                    self._kill(pool, m, "job done")
        return out
