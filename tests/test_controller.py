"""The drafter:target controller, run inside the discrete-event simulator of benchmarks/disaggregation_sim.py."""
from __future__ import annotations

import sys

import pytest

from actors.controller import Budget, Controller, Plan
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from disaggregation_sim import Costs, best_k, fixed_plans, simulate  # noqa: E402

BUDGET = Budget(devices=2, drafter_cost=0.5, max_k=6)


def _best_fixed(costs, acceptance, duration=20.0):
    plans = fixed_plans(BUDGET) + [Plan("colocated", 2, 0, 0)]
    return max(best_k(costs, BUDGET, 16, duration, acceptance, p, range(0, BUDGET.max_k + 1))[0] for p in plans)


@pytest.mark.parametrize("costs", [
    Costs(),  # memory-bound verify (large fixed cost): speculation pays, co-location wins
    Costs(v0=0.0005, v1=0.00015, d0=0.0012, d1=0.00002),  # compute-bound verify, costly drafter: plain decoding wins
], ids=["memory-bound", "compute-bound"])
def test_controller_finds_within_5_percent_of_the_best_fixed_configuration(costs):
    best = _best_fixed(costs, lambda t: 0.8)
    ctl = Controller(BUDGET, group_rows=16)
    run = simulate(costs, BUDGET, 16, 40.0, lambda t: 0.8, controller=ctl, interval=4.0, startup=2.0)
    second_half = run["per_second"][20:39]
    assert sum(second_half) / len(second_half) >= 0.95 * best, (ctl.timeline, best)
    assert ctl.plan.devices(BUDGET.drafter_cost) <= BUDGET.devices


def test_controller_follows_an_acceptance_drop_and_logs_why():
    costs = Costs()
    best_after = _best_fixed(costs, lambda t: 0.3)
    ctl = Controller(BUDGET, group_rows=16)
    run = simulate(costs, BUDGET, 16, 60.0, lambda t: 0.9 if t < 30 else 0.3, controller=ctl, interval=4.0,
                   startup=2.0)
    assert ctl.timeline[0]["k"] > ctl.plan.k  # it drafted long while drafts were good, shorter afterwards
    late = run["per_second"][40:59]  # two re-planning intervals after the drop
    assert sum(late) / len(late) >= 0.95 * best_after, ctl.timeline
    assert all({"t", "mode", "targets", "drafters", "k", "acceptance", "reason"} <= set(d) for d in ctl.timeline)


def test_every_candidate_plan_fits_the_budget_and_stable_measurements_do_not_churn():
    ctl = Controller(Budget(devices=4, drafter_cost=0.25, max_k=4), group_rows=8)
    assert all(p.devices(0.25) <= 4 for p in ctl.candidates())
    for _ in range(20):
        ctl.observe_verify(8, 1, 0.010)
        ctl.observe_verify(8, 4, 0.012)
        ctl.observe_draft_step(8, 0.0005)
        ctl.observe_acceptance([3, 4, 2, 4], [4, 4, 4, 4])
    for t in range(10):
        ctl.decide(float(t))
    assert len(ctl.timeline) == 1
