"""The messages between the pool manager (its controller) and the target actors, typed: a target's Orders (what
the manager's assignment answers) and its Measurements (what it brings with its next request, about once a second).
Plain dataclasses, so they cross between actors as they are."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Orders:
    """A target actor's orders (actors/orders.py makes them): how it decodes, with which k, and which drafter
    servers serve each of its groups of sequences, preferred first."""
    mode: Literal["colocated", "disaggregated", "plain"]  # plain: no speculation
    k: int  # draft tokens per round (0 with mode plain)
    groups: int  # groups of sequences in flight (1 unless it drafts on drafter servers)
    drafters: tuple[tuple[tuple[str, Any], ...], ...]  # per group: (drafter id, its actor handle), preferred first
    max_k: int  # the largest k the controller may order


@dataclass
class Measurements:
    """What a target measured since its last report (actors/target_actor.py): the controller's cost model and
    acceptance estimate learn from them (actors/control_loop.py's observe)."""
    verify: list[tuple[int, int, float]] = field(default_factory=list)  # (rows, k, seconds) of each verify forward
    draft_step: list[tuple[int, float]] = field(default_factory=list)  # (rows, seconds per draft token)
    accepted: list[int] = field(default_factory=list)  # per drafting row of each round: tokens accepted
    drafted: list[int] = field(default_factory=list)  # ... and tokens drafted
    verify_s: float = 0.0
    draft_s: float = 0.0
    wait_s: float = 0.0  # waiting on drafter servers
    rounds: int = 0
    failovers: int = 0  # channels that moved to another drafter server
    tokens: int = 0  # output tokens
