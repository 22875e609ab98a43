"""The actors of the disaggregated pools: one pool per kind (targets, drafters), and the two sized to a plan.

An ActorPool holds the members of one kind and their lifecycle:

    start ──ping answered──► ready ──(resize down)──► draining ──idle, or drain timeout──► removed
                                  ◄──(resize up)─────┘
    any state ──ping or batch failed, died while starting──► lost (dropped at once)

TargetPool and DrafterPool say how their actors are started (actors/shells.py) and when a draining one is idle;
Pools sizes both to the current plan and asks Ray's autoscaler for the resources. None of this locks: the
caller (actors/pool_manager.py, actors/routing.py, actors/control_loop.py) holds the manager's lock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import ray

from actors.controller import Plan
from actors.event_log import EventLog
from actors.shells import DrafterShell, TargetShell
from engine.config import EngineConfig
from engine.request import SamplingParams


@dataclass
class Member:
    """One actor of a pool, as the manager sees it."""
    id: str
    handle: object
    ready_ref: object | None  # its first ping: answered once its model is loaded
    started: float
    ready: bool = False
    draining: bool = False
    drain_since: float = 0.0
    inflight: int = 0  # batches routed to it and not yet released (targets)
    batches: int = 0  # batches routed to it in all (targets)
    node: str = ""


class ActorPool:
    """The members of one kind. Subclasses say how one is started (`shell`, `_kwargs`) and when a draining one
    may go (`_idle`, `drain_timeout_s`)."""
    shell: type | None = None
    drain_timeout_s: float | None = None  # None: a draining member waits until it is idle

    def __init__(self, kind: str, options: dict, ids: Iterator[int], log: EventLog):
        """`options`: Ray actor options (num_cpus, num_gpus, resources); `ids`: the numbering shared by the pools."""
        self.kind, self.options, self.ids, self.log = kind, options, ids, log
        self.members: dict[str, Member] = {}

    def _kwargs(self, actor_id: str) -> dict:
        """The shell's constructor arguments."""
        raise NotImplementedError

    def _idle(self, member: Member) -> bool:
        """A draining member holds no more work (it may be killed)."""
        raise NotImplementedError

    def _answers_ping(self, member: Member) -> bool:
        """Whether a ping now tells whether it is alive (not merely busy)."""
        return True

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Member:
        mid = f"{self.kind}-{next(self.ids)}"
        handle = ray.remote(self.shell).options(max_restarts=0, **self.options).remote(**self._kwargs(mid))
        member = Member(mid, handle, handle.ping.remote(), time.time())
        self.members[mid] = member
        self.log.add("start", actor=mid)
        return member

    def kill(self, member: Member, why: str) -> None:
        self.members.pop(member.id, None)
        try:
            ray.kill(member.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.log.add("remove", actor=member.id, reason=why)

    def kill_all(self, why: str) -> None:
        for m in list(self.members.values()):
            self.kill(m, why)

    def lost(self, member: Member, err: Exception | str) -> None:
        """Dropped at once: its work is redone elsewhere (targets) or its channels fail over (drafters)."""
        self.members.pop(member.id, None)
        self.log.add("lost", actor=member.id,
                     error=str(err).splitlines()[0][:200] if str(err) else type(err).__name__)

    def resize(self, want: int) -> None:
        """`want` live members: undrain draining ones first, then start new ones; or drain the extra ones."""
        live = [m for m in self.members.values() if not m.draining]
        for m in [m for m in self.members.values() if m.draining][:max(0, want - len(live))]:
            m.draining = False  # cheaper than a new actor
            live.append(m)
            self.log.add("undrain", actor=m.id)
        for _ in range(want - len(live)):
            live.append(self.start())
        extra = len(live) - want
        if extra > 0:  # drain the least busy, newest first
            for m in sorted(live, key=lambda m: (m.inflight, -m.started))[:extra]:
                m.draining, m.drain_since = True, time.time()
                self.log.add("drain", actor=m.id)

    def refresh_ready(self) -> None:
        """Mark the members whose first ping has come back ready (and drop those that died starting)."""
        for m in list(self.members.values()):
            if m.ready:
                continue
            done, _ = ray.wait([m.ready_ref], timeout=0)
            if done:
                try:
                    m.node = ray.get(done[0])
                    m.ready = True
                    self.log.add("ready", actor=m.id, node=m.node[:12], startup_s=round(time.time() - m.started, 2))
                except Exception as e:  # noqa: BLE001 - it died while starting
                    self.lost(m, e)

    def drain(self) -> None:
        """Kill the draining members that are idle, or that have drained for longer than the drain timeout."""
        for m in [m for m in self.members.values() if m.draining]:
            idle = self._idle(m)
            overdue = self.drain_timeout_s is not None and time.time() - m.drain_since > self.drain_timeout_s
            if idle or overdue:
                self.kill(m, "drained" if idle else "drain timeout")

    # ---- health ------------------------------------------------------------------------------------

    def ping(self) -> list[tuple[Member, object]]:
        """Ping the ready members that can answer now: (member, ref) to wait on, without the lock."""
        return [(m, m.handle.ping.remote()) for m in self.members.values() if m.ready and self._answers_ping(m)]

    def judge(self, pings: list[tuple[Member, object]]) -> None:
        """A member whose ping failed is lost; one that has not answered yet is merely slow."""
        for m, ref in pings:
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    ray.get(done[0])
                except Exception as e:  # noqa: BLE001
                    self.lost(m, e)

    # ---- views -------------------------------------------------------------------------------------

    def ready(self) -> list[Member]:
        """The members that take work: ready and not draining."""
        return [m for m in self.members.values() if m.ready and not m.draining]

    def count(self) -> int:
        return len(self.ready())

    def settled(self, want: int) -> bool:
        """Exactly `want` members, all ready, none draining."""
        return len(self.members) == want and all(m.ready and not m.draining for m in self.members.values())

    def bundle(self) -> dict:
        """One member's resources, as a request_resources bundle."""
        out = {"CPU": self.options.get("num_cpus", 1)}
        if self.options.get("num_gpus"):
            out["GPU"] = self.options["num_gpus"]
        out.update(self.options.get("resources") or {})
        return out


class TargetPool(ActorPool):
    """Target actors (actors/target_actor.py): each takes its orders from the manager, by name."""
    shell = TargetShell

    def __init__(self, options: dict, ids: Iterator[int], log: EventLog, manager: str, namespace: str | None,
                 engine: EngineConfig, params: SamplingParams, evaluate: float | None):
        super().__init__("target", options, ids, log)
        self.manager, self.namespace = manager, namespace
        self.engine, self.params, self.evaluate = engine, params, evaluate

    def _kwargs(self, actor_id: str) -> dict:
        return {"target_id": actor_id, "manager": self.manager, "namespace": self.namespace, "engine": self.engine,
                "params": self.params, "evaluate": self.evaluate}

    def _idle(self, member: Member) -> bool:
        return member.inflight == 0

    def _answers_ping(self, member: Member) -> bool:
        return member.inflight == 0  # a busy target answers only between batches; its routers notice if it dies


class DrafterPool(ActorPool):
    """Drafter servers (actors/drafter_server.py). A draining one is idle when it holds no channel; it is killed
    after `drain_timeout_s` regardless (its channels fail over)."""
    shell = DrafterShell

    def __init__(self, options: dict, ids: Iterator[int], log: EventLog, config: EngineConfig,
                 drain_timeout_s: float):
        super().__init__("drafter", options, ids, log)
        self.config, self.drain_timeout_s = config, drain_timeout_s

    def _kwargs(self, actor_id: str) -> dict:
        return {"config": self.config}

    def _idle(self, member: Member) -> bool:
        try:
            return not member.ready or ray.get(member.handle.active_channels.remote(), timeout=10) == 0
        except Exception:  # noqa: BLE001
            return True


def drafters_wanted(plan: Plan) -> int:
    """The drafter actors a plan runs (none when it does not draft on drafter actors)."""
    return plan.drafters if plan.mode == "disaggregated" and plan.k > 0 else 0


class Pools:
    """The target pool and the drafter pool, sized to `plan`."""

    def __init__(self, targets: ActorPool, drafters: ActorPool, plan: Plan, log: EventLog):
        self.targets, self.drafters, self.plan, self.log = targets, drafters, plan, log
        self.each = (targets, drafters)

    def apply(self, plan: Plan | None = None) -> None:
        """Size both pools to `plan` (or to the current plan again, replacing lost actors) and ask Ray's autoscaler
        for the resources."""
        if plan is not None:
            self.plan = plan
        targets, drafters = self.plan.targets, drafters_wanted(self.plan)
        self.targets.resize(targets)
        self.drafters.resize(drafters)
        bundles = [self.targets.bundle()] * targets + [self.drafters.bundle()] * drafters
        try:  # a hint to Ray's autoscaler (on a fixed cluster it changes nothing)
            from ray.autoscaler.sdk import request_resources
            request_resources(bundles=bundles)
        except Exception as e:  # noqa: BLE001
            self.log.add("request_resources_failed", error=str(e)[:200])

    def refresh_ready(self) -> None:
        for pool in self.each:
            pool.refresh_ready()

    def drain(self) -> None:
        for pool in self.each:
            pool.drain()

    def settled(self) -> bool:
        """All of the plan's actors are up, none is starting or draining."""
        return self.targets.settled(self.plan.targets) and self.drafters.settled(drafters_wanted(self.plan))

    def find(self, actor_id: str) -> Member | None:
        return self.targets.members.get(actor_id) or self.drafters.members.get(actor_id)

    def kill_all(self, why: str) -> None:
        for pool in self.each:
            pool.kill_all(why)
