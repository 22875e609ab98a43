"""A target actor's orders (what PoolManager.assignment answers): its mode, k, and the drafters of each of its
groups of sequences, preferred first.

Groups are spread over the ready drafters round-robin (target order × groups + group), and each group's list goes
on through every other ready drafter, so a channel that loses its drafter fails over to the next one. Without a
ready drafter (or with k = 0) the target decodes plainly, in one group.
"""
from __future__ import annotations

from actors.actor_pool import Member
from actors.controller import Plan
from actors.messages import Orders


def orders(plan: Plan, target_id: str, targets: list[str], drafters: list[Member], groups: int,
           max_k: int) -> Orders:
    """`targets`: the target ids, `drafters`: the ready drafters, `groups`: a target's groups when it drafts on
    drafter actors."""
    ready = sorted(drafters, key=lambda m: m.id)
    speculate = plan.k > 0 and (plan.mode == "colocated" or bool(ready))
    groups = groups if plan.mode == "disaggregated" and speculate else 1
    order = sorted(targets).index(target_id) if target_id in targets else 0
    per_group = []
    for g in range(groups):
        first = (order * groups + g) % len(ready) if ready else 0
        per_group.append(tuple((m.id, m.handle) for m in ready[first:] + ready[:first]))
    return Orders(mode=plan.mode if speculate else "plain", k=plan.k if speculate else 0, groups=groups,
                  drafters=tuple(per_group), max_k=max_k)
